"""GPTQ-style error compensation for the MatMulNBits block layout, in numpy.

Given a weight ``W [K, N]`` and the second moment of its input ``H = E[x x^T]`` (``[K, K]``, from
calibration data; :mod:`graphkit.calibration`), quantize the K rows in order, block by block: each block's
scales / zero points are chosen on the block's weights as updated so far (round-to-nearest's min/max rule
by default; ``scale_method="search"``: the weighted search of :mod:`passes._quant`, which gave the same
end-to-end figures on the shipped example within noise at ~50x the cost, docs/quantization.md), then each row is rounded and its rounding error is spread over the
rows not yet quantized along ``H^-1`` (Frantar et al., 2022, "GPTQ"), which minimises the layer's output
error ``E ||x W - x dequant(W)||^2`` row by row. The stored form is exactly RTN's (uint8 levels, per-block
scale, integer zero point): any runtime that loads MatMulNBits loads the result.

Cost (the 1.5B shape, docs/quantization.md "Cost"):

* the factor ``U`` (upper Cholesky factor of ``H^-1``) comes from one Cholesky factorisation of ``H`` in
  reversed order and a blocked triangular inverse, in float64 (``U = J L^-1 J`` with ``L L^T = J H J``,
  ``J`` the reversal: the same matrix as inverting ``H`` and factoring the inverse, at about a third of the
  work); MatMuls that read the same input (q/k/v, gate/up) share it (:func:`gptq_factor`, matmul-nbits
  keeps the last few);
* the row loop is vectorised over the N output columns and "lazy-batched" twice: a row's error updates
  only the rows of its ``SUB``-row group one by one; the rest of its quantization block gets the group's
  errors in one matrix product, and the rows after the block get the block's errors in one matrix product
  (the same updates in a different summation order: results equal up to float32 rounding);
* memory: W in float32, the levels in uint8 ``[K, N]``, U in float32 (``K^2``).

Inputs wider than ``full_max_k`` (4096; the 1.5B shape's down_proj, K 8960) have no full ``H``
(graphkit/calibration.py) and take the diagonal-weighted search instead.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from passes._quant import _quantize_cols, _search_cols, k_blocks, pack_bits

DAMP = 0.01  # H += DAMP * mean(diag(H)) * I: the usual GPTQ dampening (keeps the Cholesky factor stable)
SUB = 16     # rows whose errors are applied one by one; the rest of the block gets them in one product
_LEAF = 128  # the blocked triangular inverse inverts diagonal blocks of this size directly


class Factor(NamedTuple):
    """What GPTQ needs of one input's statistics: U (float32), the dead-input mask, diag(H) (float32)."""
    U: np.ndarray
    dead: np.ndarray
    diag: np.ndarray


def _inv_lower(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix, blocked: inv([[A, 0], [B, C]]) = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]."""
    n = L.shape[0]
    if n <= _LEAF:
        return np.tril(np.linalg.inv(L))
    h = n // 2
    Ai, Ci = _inv_lower(L[:h, :h]), _inv_lower(L[h:, h:])
    out = np.zeros_like(L)
    out[:h, :h] = Ai
    out[h:, h:] = Ci
    out[h:, :h] = -(Ci @ (L[h:, :h] @ Ai))
    return out


def inverse_factor(H: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of H^-1 (H dampened; dead inputs get 1 on the diagonal) and the dead mask.

    ``U^T U = H^-1``: with ``J`` the reversal and ``L L^T = J H J`` (lower Cholesky), ``U = J L^-1 J``."""
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * float(np.mean(np.diag(H)))
    L = np.linalg.cholesky(H[::-1, ::-1])
    U = np.ascontiguousarray(_inv_lower(L)[::-1, ::-1])
    return U, dead


def gptq_factor(H: np.ndarray) -> Factor:
    """The part of GPTQ that depends on ``H`` only, computed once per input and shared by its MatMuls."""
    U, dead = inverse_factor(H)
    return Factor(U.astype(np.float32), dead, np.clip(np.diag(np.asarray(H, np.float64)), 0, None).astype(np.float32))


def gptq_quantize(w_KN: np.ndarray, H: np.ndarray | None, bits: int, block_size: int, symmetric: bool,
                  scale_method: str = "rtn", dtype: np.dtype | None = None, factor: Factor | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Returns ``(packed [N, kb, blob], scales [N, kb], zero_points packed or None)`` like
    :func:`passes._quant.quantize_blockwise`. ``factor``: :func:`gptq_factor` of ``H`` when the caller
    shares one between MatMuls of the same input (``H`` is then not read)."""
    dtype = np.dtype(dtype or w_KN.dtype)
    K, N = w_KN.shape
    kb = k_blocks(K, block_size)
    f = factor if factor is not None else gptq_factor(H)
    U = f.U
    W = np.array(w_KN, dtype=np.float32, copy=True)
    W[f.dead, :] = 0.0
    qmax = np.float32((1 << bits) - 1)
    half = 1 << (bits - 1)
    q_KN = np.empty((kb * block_size, N), np.uint8)  # row-major: each row's levels are one contiguous store
    q_KN[K:] = 0  # MLAS never writes past K: padded slots stay 0
    scales = np.zeros((N, kb), dtype)
    zps = None if symmetric else np.zeros((N, kb), np.uint8)
    t = np.empty(N, np.float32)
    for b in range(kb):
        g0, g1 = b * block_size, min(K, (b + 1) * block_size)
        wt = np.ascontiguousarray(W[g0:g1].T)  # [N, g]: the block as updated so far
        if scale_method == "search":
            _, s, zp = _search_cols(wt, g1 - g0, bits, g1 - g0, symmetric, dtype, f.diag[g0:g1])
        else:
            _, s, zp = _quantize_cols(wt, g1 - g0, bits, g1 - g0, symmetric, dtype)
        del wt
        s = s.astype(np.float32).reshape(N)
        z = (np.full(N, half, np.float32) if zp is None else zp.reshape(N).astype(np.float32))
        scales[:, b] = s.astype(dtype)
        if zps is not None:
            zps[:, b] = z.astype(np.uint8)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(s != 0, np.float32(1) / s, np.float32(0))
        err = np.empty((g1 - g0, N), np.float32)
        for s0 in range(g0, g1, SUB):
            s1 = min(g1, s0 + SUB)
            for i in range(s0, s1):
                w = W[i]
                np.multiply(w, r, out=t)
                np.rint(t, out=t)
                t += z
                np.clip(t, 0, qmax, out=t)
                q_KN[i] = t
                t -= z
                t *= s
                e = err[i - g0]
                np.subtract(w, t, out=e)
                e /= U[i, i]
                if i + 1 < s1:
                    W[i + 1:s1] -= U[i, i + 1:s1, None] * e
            if s1 < g1:
                W[s1:g1] -= U[s0:s1, s1:g1].T @ err[s0 - g0:s1 - g0]
        if g1 < K:
            W[g1:] -= U[g0:g1, g1:].T @ err
    del W
    packed = pack_bits(np.ascontiguousarray(q_KN.T).reshape(N, kb, block_size), bits)
    if zps is not None:
        per = 8 // bits
        fill = (-kb) % per
        if fill:
            zps = np.pad(zps, ((0, 0), (0, fill)), constant_values=half)
        zps = pack_bits(zps, bits)
    return packed, scales, zps
