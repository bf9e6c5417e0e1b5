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


def _score(path: Path, runs) -> float:
    from graphkit.verify import check_variant
    return check_variant("q4", path, runs).kl_mean


@pytest.mark.slow
def test_default_4bit_beats_round_to_nearest(converted, golden, tmp_path):
    """The shipped example, default pipelines (GPTQ on self-generated calibration): KL vs fp32 over the golden
    and default prompts (32 greedy fp32 tokens each, none used for calibration) <= 0.8x the same pipeline with
    round-to-nearest, and below an absolute bar with margin. Measured (2026-12-03): q4 ~0.6x of RTN,
    q4f16 ~0.7x. Swapping the default back to RTN makes the ratio 1.0 and fails this test (checked)."""
    from graphkit.convert import PIPELINES, without_calibration
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes
    from graphkit.prompts import DEFAULT_PROMPTS, encode_prompts
    from graphkit.verify import OnnxReference, reference_runs
    out, _ = converted
    fp32 = out / "onnx" / "model.onnx"
    prompts = [p["prompt_ids"] for p in golden["prompts"]] + encode_prompts(out, DEFAULT_PROMPTS)
    runs = reference_runs(OnnxReference(fp32), prompts, 32)
    figures = {}
    for dtype, fname in (("q4", "model_q4.onnx"), ("q4f16", "model_q4f16.onnx")):
        m, _ = run_passes(load_model(fp32), parse_spec(without_calibration(PIPELINES[dtype])))
        save_model(m, tmp_path / fname)
        figures[dtype] = (_score(out / "onnx" / fname, runs), _score(tmp_path / fname, runs))
    for dtype, (ours, rtn) in figures.items():
        assert ours <= 0.8 * rtn, figures
