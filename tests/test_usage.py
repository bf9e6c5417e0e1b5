"""The app snippet (USAGE.md) convert writes: dtypes per device from the folder's files, the runtimes recorded in
config.json (default Transformers.js 4.x), valid JavaScript. (It runs unchanged in Chromium in test_serve.py.)"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from graphkit import console as gk_console
from graphkit.usage import extract_snippet, folder_targets, usage_markdown, write_usage


def _folder(root: Path, files: list[str], config: dict | None = None) -> Path:
    folder = root / "my-model"
    (folder / "onnx").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "qwen2"}))
    for f in files:
        (folder / "onnx" / f).write_bytes(b"")
    return folder


def test_default_targets_and_dtype_per_device(tmp_path):
    folder = _folder(tmp_path, ["model.onnx", "model_fp16.onnx", "model_q4.onnx", "model_q4f16.onnx", "model_quantized.onnx"])
    assert folder_targets(folder) == ["transformers.js@4"]
    md, code = usage_markdown(folder)
    assert "@huggingface/transformers@^4.3.1" in code and "^3" not in code
    assert "env.localModelPath = '/models/'" in code and "env.allowRemoteModels = false" in code
    assert "const MODEL = 'my-model'" in code
    assert "adapter.features.has('shader-f16') ? 'q4f16' : 'q4'" in code
    assert "{ device: 'wasm', dtype: 'q8' }" in code
    assert extract_snippet(md) == code


def test_targets_from_config_and_missing_files(tmp_path):
    folder = _folder(tmp_path, ["model.onnx", "model_quantized.onnx"],
                     {"graphkit": {"targets": ["transformers.js@3", "transformers.js@4"]}})
    assert folder_targets(folder) == ["transformers.js@3", "transformers.js@4"]
    _, code = usage_markdown(folder)
    assert "@huggingface/transformers@^3.8.1 or @huggingface/transformers@^4.3.1" in code
    # no f16 or 4-bit file: WebGPU falls back to fp32 either way, wasm keeps q8
    assert "? 'fp32' : 'fp32'" in code and "{ device: 'wasm', dtype: 'q8' }" in code
    folder2 = _folder(tmp_path / "b", ["model_q4.onnx"], {"transformers.js_config": {"target": "transformers.js@3"}})
    assert folder_targets(folder2) == ["transformers.js@3"]
    assert "{ device: 'wasm', dtype: 'q4' }" in usage_markdown(folder2)[1]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_snippet_is_valid_javascript(tmp_path):
    folder = _folder(tmp_path, ["model.onnx", "model_q4.onnx", "model_quantized.onnx"])
    code = write_usage(folder, ["fp32", "q4", "q8"], output=tmp_path / "renamed-folder")
    assert (folder / "USAGE.md").is_file() and "const MODEL = 'renamed-folder'" in code
    js = tmp_path / "snippet.mjs"
    js.write_text(code)
    res = subprocess.run(["node", "--check", str(js)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    js.write_text(code.replace("export async function chat", "export async function chat(("))  # the check can fail
    assert subprocess.run(["node", "--check", str(js)], capture_output=True, timeout=60).returncode != 0


def test_convert_summary_prints_the_snippet(tmp_path, monkeypatch):
    from graphkit.convert import render
    folder = _folder(tmp_path, ["model.onnx", "model_quantized.onnx"])
    write_usage(folder, ["fp32", "q8"])
    buf = io.StringIO()
    monkeypatch.setattr(gk_console, "out", gk_console.FittingConsole(file=buf, width=80, force_terminal=False))
    render({"output": str(folder), "total_s": 1.0, "ok": True, "dtypes": [
        dict(dtype="q8", file="onnx/model_quantized.onnx", ok=True, bytes=10, seconds=0.1, peak_rss=None,
             top1_vs_fp32=0.99, kl_vs_fp32=0.001, passes=["matmul-int8"], error=None, agreement_note=None)]})
    text = buf.getvalue()
    assert "USAGE.md" in text and f"graphkit serve {folder}" in text
    assert "from '@huggingface/transformers'" in text and "AutoModelForCausalLM.from_pretrained(MODEL, { device, dtype })" in text


def test_a_folder_without_transformersjs_dtypes_gets_a_note_not_a_crash(tmp_path):
    """`convert --dtypes w4` writes only model_w4.onnx (no Transformers.js dtype): USAGE.md says how to load it
    instead of indexing an empty dtype list (which failed at the end of a 1.5B convert)."""
    folder = _folder(tmp_path, ["model_w4.onnx"])
    code = write_usage(folder, ["w4"])
    md = (folder / "USAGE.md").read_text()
    assert code == "" and "docs/w4.md" in md and "--dtypes q8,w4" in md
