"""`graphkit export`: the ONNX decoder equals PyTorch (fp32), on tiny random qwen2/qwen3/llama models."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from graphkit.export import export_model
from graphkit.hfmodel import load_causal_lm
from graphkit.ortrun import DecoderRunner
from tiny_decoder import build_tiny_model

TOL = 1e-4


def _torch_logits(model, ids, mask, past=None):
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    pos = pos[:, -ids.shape[1]:]
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                    cache=past, use_cache=True)
    return out.logits.numpy(), out.past_key_values


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def tiny_export(request, tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    out = folder / "model.onnx"
    exporter = "dynamo" if request.param == "qwen2" else "torchscript"
    export_model(folder, out, exporter=exporter)
    model, _ = load_causal_lm(folder)
    return model, DecoderRunner.from_file(out), out


def test_io_contract(tiny_export):
    model, runner, path = tiny_export
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ins = {i.name: i for i in runner.session.get_inputs()}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["input_ids"].shape == ["batch_size", "sequence_length"]
    assert ins["attention_mask"].shape == ["batch_size", "total_sequence_length"]
    for i in range(cfg.num_hidden_layers):
        for k in ("key", "value"):
            assert ins[f"past_key_values.{i}.{k}"].shape == ["batch_size", cfg.num_key_value_heads, "past_sequence_length", head_dim]
    outs = [o.name for o in runner.session.get_outputs()]
    assert outs[0] == "logits" and f"present.{cfg.num_hidden_layers - 1}.value" in outs
    assert all(i.type == "tensor(int64)" for n, i in ins.items() if not n.startswith("past"))


def test_prefill_empty_past_matches_torch(tiny_export):
    model, runner, _ = tiny_export
    ids = np.array([[3, 17, 42, 99, 7, 250, 11]], np.int64)
    mask = np.ones_like(ids)
    ref, _ = _torch_logits(model, ids, mask)
    got = runner.step(ids, mask, runner.empty_past(1)).logits
    assert np.abs(got - ref).max() <= TOL


def test_decode_step_with_past_matches_torch(tiny_export):
    model, runner, _ = tiny_export
    ids = np.array([[5, 6, 7, 8, 9, 10]], np.int64)
    mask = np.ones_like(ids)
    ref_prefill, cache = _torch_logits(model, ids, mask)
    out = runner.step(ids, mask, runner.empty_past(1))
    nxt = np.array([[int(np.argmax(ref_prefill[0, -1]))]], np.int64)
    mask2 = np.ones((1, 7), np.int64)
    ref, _ = _torch_logits(model, nxt, mask2, cache)
    got = runner.step(nxt, mask2, out.present).logits
    assert got.shape == (1, 1, model.config.vocab_size)
    assert np.abs(got - ref).max() <= TOL


def test_batch2_left_padding_matches_torch(tiny_export):
    model, runner, _ = tiny_export
    ids = np.array([[0, 0, 0, 21, 22, 23], [31, 32, 33, 34, 35, 36]], np.int64)
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    ref, cache = _torch_logits(model, ids, mask)
    out = runner.step(ids, mask, runner.empty_past(2))
    valid = mask.astype(bool)
    assert np.abs(out.logits[valid] - ref[valid]).max() <= TOL
    # one decode step for both rows
    nxt = np.array([[40], [41]], np.int64)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    ref2, _ = _torch_logits(model, nxt, mask2, cache)
    got2 = runner.step(nxt, mask2, out.present).logits
    assert np.abs(got2 - ref2).max() <= TOL


def test_rope_parameters_only_config(tmp_path):
    """A transformers-5 config with only `rope_parameters` exports with its rope_theta (not 10000)."""
    folder = build_tiny_model(tmp_path / "m", "qwen2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    export_model(folder, tmp_path / "m.onnx", exporter="torchscript")
    model, _ = load_causal_lm(folder)
    assert model.config.rope_parameters["rope_theta"] == 1000.0
    runner = DecoderRunner.from_file(tmp_path / "m.onnx")
    ids = np.arange(1, 60, dtype=np.int64)[None]
    ref, _ = _torch_logits(model, ids, np.ones_like(ids))
    got = runner.step(ids, np.ones_like(ids), runner.empty_past(1)).logits
    assert np.abs(got - ref).max() <= TOL
    # and it really differs from the default theta, so the check above has teeth
    cfg["rope_parameters"]["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(cfg))
    other, _ = load_causal_lm(folder)
    ref_default, _ = _torch_logits(other, ids, np.ones_like(ids))
    assert np.abs(ref_default - got).max() > 1e-2


def test_external_data_naming(tmp_path):
    folder = build_tiny_model(tmp_path / "m", "qwen2")
    export_model(folder, tmp_path / "out" / "m.onnx", exporter="torchscript", external_data=True)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["m.onnx", "m.onnx_data"]
    m = onnx.load(str(tmp_path / "out" / "m.onnx"), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"m.onnx_data"}
    DecoderRunner.from_file(tmp_path / "out" / "m.onnx")


# ------------------------------------------------------------------ bad input


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphkit", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def _assert_clean_error(res, *needles, out=None):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(out.name + "*")) if out.parent.exists() else True


def test_missing_folder(tmp_path):
    res = _cli("export", tmp_path / "nope", "-o", tmp_path / "m.onnx")
    _assert_clean_error(res, "no such folder", out=tmp_path / "m.onnx")


def test_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    res = _cli("export", tmp_path / "m", "-o", tmp_path / "m.onnx")
    _assert_clean_error(res, "config.json", out=tmp_path / "m.onnx")


def test_truncated_safetensors(tmp_path):
    folder = build_tiny_model(tmp_path / "m", "qwen2")
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    res = _cli("export", folder, "-o", tmp_path / "m.onnx")
    _assert_clean_error(res, "model.safetensors", "truncated", out=tmp_path / "m.onnx")


def test_unsupported_model_type(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    res = _cli("export", folder, "-o", tmp_path / "m.onnx")
    _assert_clean_error(res, "gpt2", "qwen2, qwen3, llama", out=tmp_path / "m.onnx")


def test_pickle_checkpoint_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    res = _cli("export", folder, "-o", tmp_path / "m.onnx")
    _assert_clean_error(res, "pickle", "--allow-pickle", out=tmp_path / "m.onnx")


def test_adapter_for_another_base(tmp_path):
    from peft import LoraConfig, get_peft_model
    base = build_tiny_model(tmp_path / "base", "qwen2")
    other = build_tiny_model(tmp_path / "other", "qwen2", hidden_size=96, intermediate_size=192)
    model, _ = load_causal_lm(other)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    res = _cli("export", base, "--adapter", tmp_path / "adapter", "-o", tmp_path / "m.onnx")
    _assert_clean_error(res, "adapter", "different base", out=tmp_path / "m.onnx")


def test_adapter_with_foreign_target_modules(tmp_path):
    base = build_tiny_model(tmp_path / "base", "qwen2")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    from safetensors.numpy import save_file
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "x"}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((4, 64), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    res = _cli("export", base, "--adapter", adapter, "-o", tmp_path / "m.onnx")
    _assert_clean_error(res, "adapter", out=tmp_path / "m.onnx")


def test_unwritable_output(tmp_path):
    folder = build_tiny_model(tmp_path / "m", "qwen2")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("export", folder, "-o", blocker / "m.onnx", "--exporter", "torchscript")
    _assert_clean_error(res, "not a folder")
