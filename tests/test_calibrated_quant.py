"""Calibrated and searched 4-bit (passes/_gptq.py, passes/_quant.py method=search), calibration statistics
(graphkit/calibration.py), mixed precision under a size budget (graphkit/mixed.py), and the shipped
example's figures with the default pipelines (which must beat round-to-nearest)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graphkit.errors import GraphkitError
from passes._gptq import gptq_quantize
from passes._quant import dequantize_blockwise, quantize_blockwise

ROOT = Path(__file__).resolve().parents[1]


def _correlated_inputs(K: int, T: int, seed: int) -> np.ndarray:
    """Activations like a transformer's: correlated channels, a few with large magnitude."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(K, K)) / np.sqrt(K)
    x = rng.normal(size=(T, K)) @ (np.eye(K) + mix)
    x[:, rng.choice(K, 4, replace=False)] *= 8.0
    return x.astype(np.float32)


def _out_err(X, W, packed, scales, zp, bs):
    D = dequantize_blockwise(packed, scales, zp, 4, bs, W.shape[0]).astype(np.float64) - W
    return float(((X.astype(np.float64) @ D) ** 2).sum())


@pytest.mark.parametrize("symmetric,bs", [(True, 32), (False, 128), (False, 32)])
def test_gptq_lowers_layer_output_error(symmetric, bs):
    """Tolerance of method=gptq: on the calibration inputs, the layer output error ||X (dequant(W) - W)||^2 is
    at most 0.8x round-to-nearest's (measured 0.33-0.55x here), and the result is a valid MatMulNBits weight
    (levels in range, dequantizable, same shapes as RTN)."""
    K, N = 256, 96
    rng = np.random.default_rng(1)
    W = (rng.normal(size=(K, N)) * 0.05).astype(np.float32)
    X_all = _correlated_inputs(K, 3072, 2)
    X, Xh = X_all[:2048], X_all[2048:]  # calibration / held-out rows of the same distribution
    H = X.T.astype(np.float64) @ X / len(X)
    rtn = quantize_blockwise(W, 4, bs, symmetric)
    g = gptq_quantize(W, H, 4, bs, symmetric)
    assert [a.shape for a in g if a is not None] == [a.shape for a in rtn if a is not None]
    e_rtn, e_g = _out_err(X, W, *rtn, bs), _out_err(X, W, *g, bs)
    assert e_g <= 0.8 * e_rtn, (e_g / e_rtn)
    # on held-out inputs of the same distribution the gain holds
    assert _out_err(Xh, W, *g, bs) <= 0.8 * _out_err(Xh, W, *rtn, bs)


def test_gptq_factor_is_the_cholesky_factor_of_the_inverse():
    """inverse_factor (Cholesky of H in reversed order + blocked triangular inverse) gives the upper factor U of
    the dampened H^-1: U^T U H = I, U upper with a positive diagonal, a dead input (all-zero channel) set to 1;
    and sharing the factor (q/k/v, gate/up) gives the same bytes as computing it per weight."""
    from passes._gptq import DAMP, gptq_factor, inverse_factor
    K = 300  # above the blocked inverse's leaf size: the recursion runs
    X = _correlated_inputs(K, 1024, 5)
    X[:, 7] = 0.0
    H = X.T.astype(np.float64) @ X / len(X)
    U, dead = inverse_factor(H)
    Hd = H.copy()
    Hd[7, 7] = 1.0
    Hd[np.diag_indices(K)] += DAMP * np.mean(np.diag(Hd))
    assert dead.sum() == 1 and dead[7]
    assert np.array_equal(U, np.triu(U)) and (np.diag(U) > 0).all()
    assert np.abs(U.T @ U @ Hd - np.eye(K)).max() < 1e-8
    W = (np.random.default_rng(4).normal(size=(K, 40)) * 0.05).astype(np.float32)
    a = gptq_quantize(W, H, 4, 32, False)
    b = gptq_quantize(W, None, 4, 32, False, factor=gptq_factor(H))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("symmetric,bs", [(True, 32), (False, 128)])
def test_search_never_worse_than_rtn_in_its_weighted_error(symmetric, bs):
    """Tolerance of method=search: per tensor, sum imp_k (dequant - w)^2 <= round-to-nearest's (RTN's own
    choice is one of the candidates); the stored form is RTN's."""
    rng = np.random.default_rng(3)
    W = (rng.standard_t(4, size=(256, 64)) * 0.03).astype(np.float32)
    imp = rng.uniform(0.1, 10, size=256).astype(np.float32)
    for importance in (None, imp):
        c = np.ones(256) if importance is None else imp
        r = quantize_blockwise(W, 4, bs, symmetric)
        s = quantize_blockwise(W, 4, bs, symmetric, method="search", importance=importance)
        err = lambda q: float((c[:, None] * (dequantize_blockwise(*q, 4, bs, 256).astype(np.float64) - W) ** 2).sum())  # noqa: E731
        assert err(s) <= err(r) * 1.0001
        assert err(s) <= 0.97 * err(r)  # and it does find better scales (measured 0.88-0.92x)


def test_quantize_refuses_bad_importance():
    with pytest.raises(GraphkitError, match="importance"):
        quantize_blockwise(np.ones((32, 4), np.float32), 4, 32, method="search", importance=np.ones(31))
    with pytest.raises(GraphkitError, match="method"):
        quantize_blockwise(np.ones((32, 4), np.float32), 4, 32, method="hqq")


def test_gptq_option_needs_calibration():
    from passes.matmul_nbits import MatMulNBitsPass
    with pytest.raises(GraphkitError, match="calibration"):
        MatMulNBitsPass(method="gptq")


@pytest.mark.slow
def test_calibration_statistics(exported_example, tmp_path):
    """collect_stats on the fp32 export: one entry per MatMul input, H symmetric PSD with the importance on its
    diagonal, every quantizable weight mapped; equal to E[x x^T] computed from the activation itself."""
    from graphkit.calibration import Stats, collect_stats
    from passes.matmul_nbits import MatMulNBitsPass
    seqs = [list(range(100, 140)), list(range(300, 317))]
    meta = collect_stats(exported_example, seqs, tmp_path / "s.npz", segment_bytes=1)
    assert meta["tokens"] == 57 and meta["sequences"] == 2
    st = Stats(tmp_path / "s.npz")
    jobs = MatMulNBitsPass(lm_head="8")._plan(onnx.load(str(exported_example)))[0]
    assert {j.weight.root for j in jobs} <= set(st.map)
    for j in jobs:
        H = st.hessian(j.weight.root)
        assert H is not None and H.shape == (j.weight.shape[0],) * 2
        assert np.allclose(H, H.T, atol=1e-6) and np.linalg.eigvalsh(H.astype(np.float64)).min() > -1e-4
        assert np.allclose(np.diag(H), st.importance(j.weight.root))
    with pytest.raises(GraphkitError, match="not found"):
        Stats(tmp_path / "missing.npz")
    # layer by layer = the whole graph at once: one segment per weight-reading node vs a single segment
    from graphkit.calibration import _matmul_inputs, plan_segments
    model = onnx.load(str(exported_example), load_external_data=False)
    acts = sorted(set(_matmul_inputs(model).values()))
    assert len(plan_segments(model.graph, acts, 1)) > 2 * len(acts) // 3 and len(plan_segments(model.graph, acts, 1 << 40)) == 1
    collect_stats(exported_example, seqs, tmp_path / "one.npz", segment_bytes=1 << 40)
    many, one = np.load(tmp_path / "s.npz"), np.load(tmp_path / "one.npz")
    assert sorted(many.files) == sorted(one.files)
    for k in many.files:
        assert np.allclose(many[k], one[k], rtol=1e-5, atol=1e-7 * float(np.abs(one[k]).max())), k


def _rtn_twin(summary: dict, dtype: str, fp32: Path, out: Path) -> Path:
    """The converted file's own pipeline (as convert recorded it: same 8-bit MatMuls, same table) with GPTQ swapped
    back to round-to-nearest: what the default would be without calibration at the same size."""
    from graphkit.convert import CALIBRATION_SLOT
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes
    spec = next(d["pipeline"] for d in summary["dtypes"] if d["dtype"] == dtype)
    rtn = spec.replace(f",method=gptq,calibration={CALIBRATION_SLOT}", "")
    assert "gptq" not in rtn and rtn != spec, spec
    m, _ = run_passes(load_model(fp32), parse_spec(rtn))
    save_model(m, out)
    return out


def _plain_rtn(dtype: str, fp32: Path, out: Path) -> Path:
    """The dtype's pipeline with round-to-nearest and no budget: what `convert --calibration none` writes."""
    from graphkit.convert import PIPELINES, without_calibration
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes
    m, _ = run_passes(load_model(fp32), parse_spec(without_calibration(PIPELINES[dtype])))
    save_model(m, out)
    return out


@pytest.mark.slow
def test_default_4bit_beats_round_to_nearest(converted, golden, tmp_path):
    """The shipped example, default pipelines (GPTQ on self-generated calibration, default --size-budget 1.5x): KL vs
    fp32 over the golden and default prompts (32 greedy fp32 tokens each, none used for calibration) <= 0.5x plain
    round-to-nearest's (`--calibration none`; measured q4 ~0.05x, q4f16 ~0.2x), and for q4 <= 0.7x the same file
    with its 4-bit weights rounded to nearest (same 8-bit weights, graphkit/mixed.py; measured 0.41x). Swapping
    the default back to RTN fails this test."""
    from graphkit.prompts import DEFAULT_PROMPTS, encode_prompts
    from graphkit.verify import OnnxReference, check_variant, reference_runs
    out, summary = converted
    fp32 = out / "onnx" / "model.onnx"
    prompts = [p["prompt_ids"] for p in golden["prompts"]] + encode_prompts(out, DEFAULT_PROMPTS)
    runs = reference_runs(OnnxReference(fp32), prompts, 32)
    kl = lambda path: check_variant("q4", path, runs).kl_mean  # noqa: E731
    figures = {}
    for dtype, fname in (("q4", "model_q4.onnx"), ("q4f16", "model_q4f16.onnx")):
        figures[dtype] = {"ours": kl(out / "onnx" / fname), "rtn": kl(_plain_rtn(dtype, fp32, tmp_path / fname))}
    figures["q4"]["rtn twin"] = kl(_rtn_twin(summary, "q4", fp32, tmp_path / "twin_q4.onnx"))
    for dtype, f in figures.items():
        assert f["ours"] <= 0.5 * f["rtn"], figures
    assert figures["q4"]["ours"] <= 0.7 * figures["q4"]["rtn twin"], figures


HELD_OUT = ROOT / "graphkit" / "examples" / "epicrisis-tiny" / "data" / "validation.jsonl"
# Pinned with margin from benchmarks/RESULTS.md `quantization-methods` (the "convert's default" rows, 1.5x):
# facts kept must be all of fp32's; KL over the held-out answers at most this (measured q4 4.0e-5, q4f16 8.0e-5).
# Answers equal to fp32's on at least this many of the 24: a noisy count (one near-tie in a long greedy answer
# flips a case), so the bar sits below what every calibration seed measured — the default sampler, seeds 0-4:
# q4 18, 23, 23, 22, 23 and q4f16 20, 21, 21, 20, 18 at nearly equal KL (sampling from the fp32 model itself,
# seeds 0-2: q4 22, 22, 21, q4f16 23, 21, 22). KL is the bar that tells GPTQ from RTN (RTN answers q4 20, q4f16 3).
HELD_OUT_BARS = {"q4": {"answers": 17, "kl": 2.0e-4}, "q4f16": {"answers": 17, "kl": 2.5e-4}}


def _ort_4bit(src: Path, out: Path, algo: str) -> Path:
    """onnxruntime's MatMulNBitsQuantizer, block 32, float table (benchmarks/quantization.py's contenders)."""
    import logging
    from onnxruntime.quantization.matmul_nbits_quantizer import (KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer,
                                                                 RTNWeightOnlyQuantConfig)
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    cfg = {"rtn": RTNWeightOnlyQuantConfig(), "k_quant": KQuantWeightOnlyQuantConfig()}[algo]
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


@pytest.mark.slow
def test_default_4bit_on_the_held_out_validation_set(converted, tmp_path):
    """Issue 17's goals on the example's validation.jsonl (24 cases never used for calibration or tuning), as
    `graphkit verify --data` measures them against the fp32 file: the default q4 and q4f16 keep every fact fp32's
    answers take from the prompts, answer like fp32 on most cases, and their KL over the reference answers is
    below a pinned bar and <= 0.5x the best of onnxruntime's RTN and k_quant (block 32, float table: 1.5x our
    size) measured here (measured 0.2x). Swapping the method back to RTN (`--calibration none`: no statistics, so
    no budget either; measured KL q4 1.5e-3, q4f16 2.2e-3) fails every KL bar."""
    from graphkit.dataset import eos_token_ids, load_tokenizer, model_context, verification_examples
    from graphkit.verify import OnnxReference
    from graphkit.verify_data import DEFAULT_EXTRA_TOKENS, check_variant_on_data, reference_data_runs
    out, _ = converted
    fp32 = out / "onnx" / "model.onnx"
    tok = load_tokenizer(out)
    eos = eos_token_ids(out, tokenizer=tok)
    examples = verification_examples(HELD_OUT, out, max_len=model_context(out), tokenizer=tok)
    runs, _, _ = reference_data_runs(OnnxReference(fp32), examples, tok, eos, DEFAULT_EXTRA_TOKENS, model_context(out))
    check = lambda path: check_variant_on_data("q4", path, runs, tok, eos)  # noqa: E731
    ort_best = min(check(_ort_4bit(fp32, tmp_path / f"ort_{a}.onnx", a)).kl_mean for a in ("rtn", "k_quant"))
    for dtype, fname in (("q4", "model_q4.onnx"), ("q4f16", "model_q4f16.onnx")):
        ours = check(out / "onnx" / fname)
        bar = HELD_OUT_BARS[dtype]
        got = {"kl": ours.kl_mean, "ort best kl": ort_best, "answers": ours.answers_equal,
               "facts": (ours.facts_kept, ours.facts_total), "lost": ours.lost_facts}
        assert ours.facts_total > 0 and ours.facts_kept == ours.facts_total, (dtype, got)
        assert ours.answers_equal >= bar["answers"], (dtype, got)
        assert ours.kl_mean <= bar["kl"], (dtype, got)
        assert ours.kl_mean <= 0.5 * ort_best, (dtype, got)


@pytest.mark.slow
def test_size_budget_takes_the_4bit_table_first(exported_example, tmp_path):
    """graphkit/mixed.py: a 4-bit tied table (q4f16's) goes to 8 bits before any body MatMul once the allowance
    covers it (it is what loses facts on the example, docs/quantization.md); below that the body is ranked as
    before; for Transformers.js 3.x (no 8-bit MatMulNBits in onnxruntime 1.21) the table stays 4-bit."""
    from graphkit import mixed
    from graphkit.calibration import collect_stats
    from graphkit.convert import PIPELINES, _mixed_spec, _table_bytes
    stats = tmp_path / "s.npz"
    collect_stats(exported_example, [list(range(100, 160)), list(range(300, 340))], stats)
    t4 = _table_bytes(exported_example, 4, 16, False, 2)
    t8 = _table_bytes(exported_example, 8, 32, True, 2)
    assert t8 > t4 > 0
    rows, info = mixed.plan(exported_example, stats, 1.3, 32, True, 2, t4, t8)
    assert rows[0].node == mixed.TABLE and rows[0].kept and rows[0].extra_bytes == t8 - t4
    assert info["spent_bytes"] <= info["allowance_bytes"] and any(r.kept for r in rows[1:])
    rows, info = mixed.plan(exported_example, stats, 1.05, 32, True, 2, t4, t8)  # too small for the table
    assert not rows[0].kept and t8 - t4 > info["allowance_bytes"]
    spec = PIPELINES["q4f16"].replace("{calibration}", str(stats))
    out, _ = _mixed_spec(spec, exported_example, stats, 1.3, lambda m: None)
    assert out.startswith("tied-embedding(bits=8,block_size=32,accuracy_level=4),")
    assert "matmul-nbits(bits=8,block_size=32,accuracy_level=4,include=" in out and "matmul-int8" not in out
    out, _ = _mixed_spec(spec, exported_example, stats, 1.3, lambda m: None, table_8bit=False)
    assert out.startswith("tied-embedding(bits=4,block_size=16,symmetric=false,accuracy_level=4),")
    assert "matmul-int8(include=" in out  # onnxruntime 1.21 has no 8-bit MatMulNBits: MatMulInteger


@pytest.mark.slow
def test_converted_records_a_stable_calibration(converted):
    """The converted folder's record (convert --json) names the calibration slot, not the temporary statistics
    file, and says what filled it: the source, the counts and a hash of the token ids."""
    _, summary = converted
    cal = summary["calibration"]
    assert cal["source"] == "self-generated" and cal["sequences"] > 0 and cal["tokens"] > 0
    assert len(cal["sequences_sha256"]) == 64 and "stats" not in cal
    for d in summary["dtypes"]:
        if d["dtype"] in ("q4", "q4f16"):
            assert "calibration={calibration}" in d["pipeline"] and ".npz" not in d["pipeline"], d["pipeline"]


@pytest.mark.slow
def test_converted_reports_the_whole_runs_peak(converted):
    """convert --json's top-level peak_rss is the whole run's: each step resets the high-water mark (its own peak
    per dtype), so the run's peak is the largest of them — the calibration step's included — and names that step."""
    _, summary = converted
    steps = {d["dtype"]: d["peak_rss"] for d in summary["dtypes"] if d.get("peak_rss")}
    steps["calibration"] = summary["calibration"]["peak_rss"]
    assert steps and all(v for v in steps.values()), steps
    assert summary["peak_rss"] >= max(steps.values()), (summary["peak_rss"], steps)
    assert summary["peak_rss_step"] in {*steps, "export", "agreement and last step"}
