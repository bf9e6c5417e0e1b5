"""GPTQ-style error compensation for the MatMulNBits block layout, in numpy.

Given a weight ``W [K, N]`` and the second moment of its input ``H = E[x x^T]`` (``[K, K]``, from
calibration data; :mod:`graphkit.calibration`), quantize the K rows in order, block by block: each block's
scales / zero points are chosen on the block's weights as updated so far (round-to-nearest's min/max rule
by default; ``scale_method="search"``: the weighted search of :mod:`passes._quant`, which gave the same
end-to-end figures on the shipped example within noise at ~50x the cost, docs/quantization.md), then each row is rounded and its rounding error is spread over the
rows not yet quantized along ``H^-1`` (Frantar et al., 2022, "GPTQ"), which minimises the layer's output
error ``E ||x W - x dequant(W)||^2`` row by row. The stored form is exactly RTN's (uint8 levels, per-block
scale, integer zero point): any runtime that loads MatMulNBits loads the result.

Vectorised over the N output columns; the loop runs over K rows (the trailing update is one matrix
product per block). Memory: W in float32, H and its inverse factor in float64 — for the Qwen2.5-1.5B shape's
largest weight (K 8960) about 1.4 GB, so convert uses full H only up to ``full_max_k`` (default 4096)
and the diagonal-weighted search above it (graphkit/calibration.py).
"""
from __future__ import annotations

import numpy as np

from passes._quant import _quantize_cols, _search_cols, k_blocks, pack_bits

DAMP = 0.01  # H += DAMP * mean(diag(H)) * I: the usual GPTQ dampening (keeps the Cholesky factor stable)


def inverse_factor(H: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of H^-1 (H dampened; dead inputs get 1 on the diagonal) and the dead mask."""
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * float(np.mean(np.diag(H)))
    Hinv = np.linalg.inv(H)
    U = np.linalg.cholesky((Hinv + Hinv.T) / 2).T
    return U, dead


def gptq_quantize(w_KN: np.ndarray, H: np.ndarray, bits: int, block_size: int, symmetric: bool,
                  scale_method: str = "rtn", dtype: np.dtype | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Returns ``(packed [N, kb, blob], scales [N, kb], zero_points packed or None)`` like
    :func:`passes._quant.quantize_blockwise`."""
    dtype = np.dtype(dtype or w_KN.dtype)
    K, N = w_KN.shape
    kb = k_blocks(K, block_size)
    U, dead = inverse_factor(H)
    U = U.astype(np.float32)  # the factorisation in float64, the row updates in float32 (half the memory traffic)
    W = np.array(w_KN, dtype=np.float32, copy=True)
    W[dead, :] = 0.0
    diag = np.clip(np.diag(np.asarray(H, np.float64)), 0, None)
    qmax = (1 << bits) - 1
    half = 1 << (bits - 1)
    q_all = np.zeros((N, kb * block_size), np.uint8)
    scales = np.zeros((N, kb), dtype)
    zps = None if symmetric else np.zeros((N, kb), np.uint8)
    for b in range(kb):
        g0, g1 = b * block_size, min(K, (b + 1) * block_size)
        Wg = W[g0:g1]  # a view: updated in place
        wt = np.ascontiguousarray(Wg.T, dtype=np.float32)  # [N, g]
        if scale_method == "search":
            _, s, zp = _search_cols(wt, g1 - g0, bits, g1 - g0, symmetric, dtype,
                                    diag[g0:g1].astype(np.float32))
        else:
            _, s, zp = _quantize_cols(wt, g1 - g0, bits, g1 - g0, symmetric, dtype)
        s = s.astype(np.float32).reshape(N)
        z = (np.full(N, half, np.float32) if zp is None else zp.reshape(N).astype(np.float32))
        scales[:, b] = s.astype(dtype)
        if zps is not None:
            zps[:, b] = z.astype(np.uint8)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(s != 0, np.float32(1) / s, np.float32(0))
        err = np.zeros((g1 - g0, N), np.float32)
        for i in range(g1 - g0):
            w = Wg[i]
            q = np.clip(np.rint(w * r) + z, 0, qmax)
            q_all[:, g0 + i] = q.astype(np.uint8)
            e = (w - (q - z) * s) / U[g0 + i, g0 + i]
            err[i] = e
            if i + 1 < g1 - g0:
                Wg[i + 1:] -= np.outer(U[g0 + i, g0 + i + 1:g1], e)
        if g1 < K:
            W[g1:] -= U[g0:g1, g1:].T @ err
    packed = pack_bits(q_all.reshape(N, kb, block_size), bits)
    if zps is not None:
        per = 8 // bits
        fill = (-kb) % per
        if fill:
            zps = np.pad(zps, ((0, 0), (0, fill)), constant_values=half)
        zps = pack_bits(zps, bits)
    return packed, scales, zps
