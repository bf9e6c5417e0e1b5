"""logits-to-keep (passes/logits_to_keep.py): every dtype's pipeline with the pass in front gives, at
num_logits_to_keep = 0, the same logits as the same pipeline without it, and at 1 (and 3) the last rows;
Transformers.js 4.x feeds the input (Node and Chromium wasm) with tokens equal to Python onnxruntime's."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE
from graphkit.convert import PIPELINES, pipeline_spec, without_calibration
from graphkit.errors import PreconditionError
from graphkit.modelio import load_model
from graphkit.ortrun import DecoderRunner
from graphkit.pipeline import parse_spec, run_passes
from passes.logits_to_keep import INPUT, LogitsToKeepPass

PROMPT = [3, 17, 99, 250, 7, 42, 11, 5]


def _variant(export, spec: str, path):
    model = load_model(export, load_external="lazy")
    if spec:
        model, _ = run_passes(model, parse_spec(spec))
    onnx.save(model, str(path))
    return DecoderRunner.from_file(path)


def _prefill(runner: DecoderRunner, keep: int | None):
    ids = np.array([PROMPT], np.int64)
    kw = {} if keep is None else {"logits_to_keep": keep}
    return runner.step(ids, np.ones_like(ids), runner.empty_past(1), **kw)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "q4", "q4f16", "q8"])
def test_parity_at_0_and_1_every_dtype(exported_example, tmp_path, dtype):
    # the dtype's default form (its default fusions, graphkit.convert.DEFAULT_FUSION) without calibration statistics
    spec = without_calibration(pipeline_spec(dtype, None, EXAMPLE / "base"))
    base = _variant(exported_example, spec, tmp_path / "base.onnx")
    kept = _variant(exported_example, ",".join(p for p in ("logits-to-keep", spec) if p), tmp_path / "kept.onnx")
    assert INPUT in kept.inputs and INPUT not in base.inputs
    full = _prefill(base, None)
    at0 = _prefill(kept, 0)
    # k = 0: every position, the same computation as the graph without the input
    assert at0.logits.shape == full.logits.shape
    np.testing.assert_array_equal(at0.logits, full.logits)
    for k in (1, 3, 100):  # 100 > the prompt: Slice clamps, every position
        out = _prefill(kept, k)
        want = full.logits[:, -k:]
        assert out.logits.shape == want.shape, (k, out.logits.shape)
        # fewer GEMM rows may change the float accumulation order; the argmax must not move
        np.testing.assert_allclose(out.logits, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))
        assert (out.logits.argmax(-1) == want.argmax(-1)).all()
    # the KV cache is untouched, so a decode step after a k = 1 prefill equals the full graph's
    p1 = _prefill(kept, 1)
    for name, v in full.present.items():
        np.testing.assert_array_equal(p1.present[name], v)
    nxt = np.array([[int(full.logits[0, -1].argmax())]], np.int64)
    mask = np.ones((1, len(PROMPT) + 1), np.int64)
    d_full = base.step(nxt, mask, full.present)
    d_kept = kept.step(nxt, mask, p1.present, logits_to_keep=1)
    np.testing.assert_allclose(d_kept.logits, d_full.logits, rtol=0, atol=1e-4 * max(1.0, float(np.abs(d_full.logits).max())))


def test_refuses_a_rewritten_lm_head_and_runs_once(exported_example):
    model = load_model(exported_example, load_external="lazy")
    q8, _ = run_passes(model, parse_spec(PIPELINES["q8"]))
    with pytest.raises(PreconditionError, match="before passes that rewrite the lm_head"):
        LogitsToKeepPass()(q8)
    model = load_model(exported_example, load_external="lazy")
    once = LogitsToKeepPass()(model).model
    again = LogitsToKeepPass()(once)
    assert not again.modified and "already has" in again.summary


@pytest.fixture(scope="module")
def kept_folder(converted):
    """The default folder: `convert` (target transformers.js@4) adds num_logits_to_keep to every file."""
    folder, summary = converted
    assert summary["logits_to_keep"] is True and summary["target"] == "transformers.js@4"
    return folder


def _inputs(path) -> set[str]:
    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def test_on_by_default_for_4x_only(kept_folder, converted_tjs3, fused):
    """Every default file has the input; no --target transformers.js@3 file (3.x never feeds it) and no
    --no-logits-to-keep file has it."""
    from graphkit.tjs import variant_path
    for dtype in ("fp32", "fp16", "q4", "q4f16", "q8"):
        assert INPUT in _inputs(variant_path(kept_folder, dtype)), dtype
        assert INPUT not in _inputs(variant_path(converted_tjs3, dtype)), dtype
        assert INPUT not in _inputs(variant_path(fused, dtype)), dtype


@pytest.mark.slow
@pytest.mark.js
@pytest.mark.parametrize("client,device,dtype", [("node", "cpu", "q4"), ("node", "cpu", "q8"), ("chromium", "wasm", "q8")])
def test_transformersjs_feeds_it_tokens_equal_python(kept_folder, golden, client, device, dtype):
    from graphkit.tjs import compare_tokens, python_reference, run_client, variant_path
    path = variant_path(kept_folder, dtype)
    assert INPUT in {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    prompts = golden["prompts"][:2]
    gen = json.loads((kept_folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    result = run_client(kept_folder, dtype, [p["messages"] for p in prompts], 32, client, device=device)
    assert result["returncode"] == 0 and "error" not in result, result.get("error")
    ref = python_reference(path, [p["prompt_ids"] for p in prompts], 32, eos)
    comps = compare_tokens(ref, result["results"])
    assert all(c.equal for c in comps), [(c.prompt, c.first_divergence) for c in comps]
