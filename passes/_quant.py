"""Block-wise weight quantization in pure numpy, laid out for ``com.microsoft.MatMulNBits``.

Layout (the MatMulNBits contract, onnxruntime ContribOperators / ORT 1.32 schema):

* the logical weight is ``W[K, N]`` (MatMul's B); it is quantized in blocks of ``block_size``
  consecutive elements along K, one column at a time; K is padded up to ``k_blocks * block_size``;
* ``packed``: uint8 ``[N, k_blocks, block_size * bits // 8]``; for bits < 8 several values share a
  byte, the lowest K index in the lowest bits (4-bit: element 2i in the low nibble, 2i+1 high);
* ``scales``: ``[N, k_blocks]`` in the weight's float dtype;
* ``zero_points`` (asymmetric only): uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed along the
  block axis the same way as ``packed``; unused trailing slots hold the default ``2**(bits-1)``.
  Symmetric quantization stores no zero points: the op then uses ``2**(bits-1)`` (8 / 128).

Rounding is onnxruntime's own (MLAS ``q4_dq.cpp``: ``range2scale`` / ``range2scalezp`` /
``BlockwiseQuantizer::quantizeAndTranspose``, which ``MatMulNBitsQuantizer`` calls), so the
output is byte-identical to ``MatMulNBitsQuantizer(..., is_symmetric=...)`` with its default
algorithm, for even K (see the note on odd K below):

* symmetric: ``m`` = the block's value of largest magnitude *with its sign* (``max`` if
  ``|max| > |min|`` else ``min``); ``scale = -m / 2**(bits-1)``, so the scale may be negative and
  ``m`` maps onto the most negative level (-8 for 4 bits), which uses the whole [-8, 7] range;
* asymmetric: ``lo = min(min, 0)``, ``hi = max(max, 0)``, ``scale = (hi - lo) / (2**bits - 1)``,
  ``zp = clamp(roundf(-lo / scale), 0, 2**bits - 1)`` (0 when the scale is 0);
* both: the scale is rounded to the weight dtype first, then
  ``q = clamp(roundf(w * (1 / scale) + zp), 0, 2**bits - 1)`` computed in float32, where
  ``roundf`` rounds halves away from zero and ``1 / 0`` is taken as 0 (all-zero blocks give scale
  0 and dequantize to exact zeros, never NaN).

Error bound (what the tests check): ``|dequant(q) - w| <= |scale| / 2`` per element, except in
symmetric mode for elements whose sign is opposite to ``m`` and whose magnitude exceeds
``7.5 * |scale|`` (the positive side has one level fewer); those clip to the last level and are
off by at most ``|scale|`` (one step). Asymmetric blocks hold the bound everywhere.

Padding (K not a multiple of ``block_size``): the padded slots of ``packed`` are 0, as MLAS leaves
them (it never writes past K). The op never reads them as weights (it knows K), and
:func:`dequantize_blockwise` drops them. Odd K: MLAS leaves the high nibble of the last real byte
stale (a value from the previous pair); we write 0 there, so only that nibble can differ from
ORT's output.
"""
from __future__ import annotations

import numpy as np

from graphkit.errors import GraphkitError

SUPPORTED_BITS = (2, 4, 8)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

# Work on at most this many weight elements at a time (1 MB float32 temporaries, cache-friendly), so a
# [151936, 896] embedding does not need several 0.5 GB scratch arrays at once.
_CHUNK_ELEMENTS = 1 << 18


def k_blocks(K: int, block_size: int) -> int:
    return -(-K // block_size)


def blob_size(block_size: int, bits: int) -> int:
    return block_size * bits // 8


def _check_params(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise GraphkitError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 16 or block_size & (block_size - 1):
        raise GraphkitError(f"block_size must be a power of two >= 16, got {block_size!r}")


def check_blockwise_options(pass_name: str, o) -> None:
    """The options every block-wise quantizing pass shares (``method``, ``calibration``, ``bits``,
    ``block_size``), refused with one line naming the pass and the fix."""
    if o.method not in ("rtn", "search", "gptq"):
        raise GraphkitError(f"{pass_name}: method must be rtn, search or gptq, got {o.method!r}")
    if o.method == "gptq" and not o.calibration:
        raise GraphkitError(f"{pass_name}: method=gptq needs calibration statistics (calibration=FILE; "
                            "graphkit convert --calibration data.jsonl makes them)")
    if isinstance(o.bits, bool) or o.bits not in (4, 8):
        raise GraphkitError(f"{pass_name}: bits must be 4 or 8, got {o.bits!r}")
    bs = o.block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or not 16 <= bs <= 256 or bs & (bs - 1):
        raise GraphkitError(f"{pass_name}: block_size must be a power of two from 16 to 256, got {bs!r}")


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (exact; no ``floor(x + 0.5)`` error)."""
    t = np.trunc(x)
    frac = x - t  # exact in binary floating point
    return t + np.where(np.abs(frac) >= 0.5, np.sign(x), 0).astype(x.dtype)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 values < 2**bits, lowest index in the lowest bits.

    The last axis length must be a multiple of ``8 // bits``.
    """
    if bits == 8:
        return q.astype(np.uint8, copy=False)
    per = 8 // bits
    if q.shape[-1] % per:
        raise ValueError(f"last axis {q.shape[-1]} is not a multiple of {per}")
    g = q.astype(np.uint8, copy=False).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = g[..., 0].copy()
    for j in range(1, per):
        out |= g[..., j] << np.uint8(bits * j)
    return out


def unpack_bits(p: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`; ``count`` trims the unpacked last axis."""
    p = p.astype(np.uint8, copy=False)
    if bits == 8:
        out = p
    else:
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        parts = [(p >> np.uint8(bits * j)) & mask for j in range(per)]
        out = np.stack(parts, axis=-1).reshape(*p.shape[:-1], p.shape[-1] * per)
    return out if count is None else out[..., :count]


def check_finite(w: np.ndarray, name: str, pass_name: str = "matmul-nbits") -> None:
    """Refuse weights with inf/NaN: a block or column scale computed from them poisons every value."""
    if not np.isfinite(w).all():
        bad = np.argwhere(~np.isfinite(w))
        first = tuple(int(i) for i in bad[0])
        raise GraphkitError(
            f"weight '{name}' has {len(bad)} non-finite value(s) (inf/NaN; first at index {first}); "
            f"cannot quantize it. Fix the checkpoint or exclude this node from {pass_name}")


def _quantize_cols(wt: np.ndarray, K: int, bits: int, block_size: int, symmetric: bool,
                   dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize ``wt`` = W.T as float32 ``[n, K]``; returns q ``[n, kb, bs]``, scales, zp ``[n, kb]``."""
    n = wt.shape[0]
    kb = k_blocks(K, block_size)
    pad = kb * block_size - K
    if pad:
        wt = np.pad(wt, ((0, 0), (0, pad)))  # zeros never change min(.,0)/max(.,0) or |m|
    blocks = wt.reshape(n, kb, block_size)
    bmax = blocks.max(axis=2)
    bmin = blocks.min(axis=2)
    qmax = np.float32((1 << bits) - 1)
    # All-zero blocks: MLAS's strict-comparison scan keeps the block's first element as both min
    # and max, which fixes the sign of a zero scale; mirror it so even -0.0 scales match bytewise.
    zero_blk = (bmax == 0) & (bmin == 0)
    if symmetric:
        m = np.where(np.abs(bmax) > np.abs(bmin), bmax, bmin)
        m = np.where(zero_blk, blocks[:, :, 0], m)
        scale_f = -m / np.float32(1 << (bits - 1))
        zp = None
        zpf = np.float32(1 << (bits - 1))
    else:
        lo = np.minimum(bmin, np.float32(0))
        hi = np.maximum(bmax, np.float32(0))
        scale_f = np.where(zero_blk, np.float32(0), (hi - lo) / qmax)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp_fp = np.where(scale_f != 0, np.float32(0) - lo / scale_f, lo)
        zp = np.where(zp_fp < 0, 0, np.where(zp_fp > qmax, qmax, _round_half_away(zp_fp)))
        zpf = zp.astype(np.float32)[:, :, None]
    scales = scale_f.astype(dtype)
    sf = scales.astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(sf != 0, np.float32(1) / sf, np.float32(0)).astype(np.float32)
    t = blocks * recip[:, :, None]
    t += zpf
    q = np.clip(_round_half_away(t), 0, qmax).astype(np.uint8)
    if pad:
        q = q.reshape(n, kb * block_size)
        q[:, K:] = 0  # MLAS never writes past K: padded slots stay 0
        q = q.reshape(n, kb, block_size)
    return q, scales, (None if zp is None else zp.astype(np.uint8))


METHODS = ("rtn", "search")


def quantize_blockwise(w_KN: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                       name: str = "weight", method: str = "rtn", importance: np.ndarray | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a float ``[K, N]`` weight for MatMulNBits.

    ``method``: ``rtn`` = onnxruntime's round-to-nearest (byte-identical, see the module docstring);
    ``search`` = the weighted scale/zero-point search below (same stored form). ``importance``: optional
    ``[K]`` non-negative weights per input channel for ``search`` (e.g. E[x_k^2] from calibration data).

    Returns ``(packed uint8 [N, k_blocks, block_size*bits/8], scales [N, k_blocks] in w's dtype,
    zero_points uint8 [N, ceil(k_blocks*bits/8)] or None when symmetric)``. ``name`` only appears in
    error messages. Raises GraphkitError for non-finite weights or unsupported parameters.
    """
    _check_params(bits, block_size)
    w = np.asarray(w_KN)
    if w.ndim != 2:
        raise GraphkitError(f"weight '{name}' must be 2-D [K, N], got shape {list(w.shape)}")
    if w.dtype not in FLOAT_DTYPES:
        raise GraphkitError(f"weight '{name}' has dtype {w.dtype}; only float32/float16 can be quantized")
    K, N = w.shape
    if K == 0 or N == 0:
        raise GraphkitError(f"weight '{name}' is empty (shape {list(w.shape)})")
    check_finite(w, name)
    if method not in METHODS:
        raise GraphkitError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if importance is not None:
        importance = np.asarray(importance, np.float32).reshape(-1)
        if importance.shape != (K,) or not np.isfinite(importance).all() or (importance < 0).any():
            raise GraphkitError(f"weight '{name}': importance must be {K} finite non-negative values")
    kb = k_blocks(K, block_size)
    per = 8 // bits
    packed = np.empty((N, kb, blob_size(block_size, bits)), np.uint8)
    scales = np.empty((N, kb), w.dtype)
    zps = None if symmetric else np.empty((N, -(-kb // per)), np.uint8)
    step = max(1, _CHUNK_ELEMENTS // (kb * block_size))
    for c0 in range(0, N, step):  # column chunks bound memory; each chunk is fully vectorized
        c1 = min(N, c0 + step)
        wt = np.ascontiguousarray(w[:, c0:c1].T, dtype=np.float32)
        if method == "rtn":
            q, s, zp = _quantize_cols(wt, K, bits, block_size, symmetric, w.dtype)
        else:
            q, s, zp = _search_cols(wt, K, bits, block_size, symmetric, w.dtype, importance)
        packed[c0:c1] = pack_bits(q, bits)
        scales[c0:c1] = s
        if zps is not None:
            fill = (-kb) % per
            if fill:  # MLAS fills unused zero-point slots with the midpoint
                zp = np.pad(zp, ((0, 0), (0, fill)), constant_values=1 << (bits - 1))
            zps[c0:c1] = pack_bits(zp, bits)
    return packed, scales, zps


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                         bits: int, block_size: int, K: int) -> np.ndarray:
    """Inverse of :func:`quantize_blockwise`: ``(q - zp) * scale`` as ``[K, N]`` in scales' dtype.

    ``scales`` may be ``[N, k_blocks]`` or flat ``[N*k_blocks]``; ``zero_points`` may be packed
    uint8 (as produced here) or None (default ``2**(bits-1)``).
    """
    _check_params(bits, block_size)
    N = packed.shape[0]
    kb = k_blocks(K, block_size)
    if packed.shape != (N, kb, blob_size(block_size, bits)):
        raise GraphkitError(f"packed weight shape {list(packed.shape)} does not match "
                            f"[N={N}, k_blocks={kb}, {blob_size(block_size, bits)}] for K={K}")
    s = np.asarray(scales).reshape(N, kb)
    q = unpack_bits(packed, bits).astype(np.float32)  # [N, kb, bs]
    if zero_points is None:
        zp = np.full((N, kb), 1 << (bits - 1), np.float32)
    else:
        zp = unpack_bits(np.asarray(zero_points).reshape(N, -1), bits, kb).astype(np.float32)
    w = (q - zp[:, :, None]) * s.astype(np.float32)[:, :, None]
    return np.ascontiguousarray(w.reshape(N, kb * block_size)[:, :K].T).astype(s.dtype)


# ---------------------------------------------------------------------------------------------------------
# Scale / zero-point search (method="search"): the same stored form as round-to-nearest (uint8 levels,
# per-block scale, integer zero point), but each block's scale and zero point are chosen to minimise the
# weighted squared error  sum_i c_i * (s * (q_i - zp) - w_i)^2  instead of mapping min/max onto the ends.
#
# Per block: a grid of candidate scales around the min/max one (llama.cpp k-quant's "make_qkx" grid); for
# each, quantize, fit (scale, offset) by weighted least squares, round the offset to an integer zero point,
# refit the scale for that zero point, requantize and refit once more; keep the candidate with the least
# weighted error. RTN's own choice is one of the candidates, so the weighted error is never above RTN's.
# Everything is vectorised over [columns, blocks, block_size]; memory is bounded by the column chunks of
# quantize_blockwise.
#
# Weights c_i = imp_k, the importance of the element's input channel: 1 without data (plain squared error),
# E[x_k^2] of the MatMul's input when calibration statistics are given (the diagonal of the layer-output
# error). Measured on the shipped example (docs/quantization.md): element weights w^2 + mean(w^2) or
# k-quant's |w| + rms(w) lowered the weight error like plain squared error did but not the end-to-end KL,
# so the simplest is kept.
# ---------------------------------------------------------------------------------------------------------
SEARCH_STEPS = 16          # candidate scales per block
SEARCH_DELTA = 0.125       # the grid: levels spanned = qmax + SEARCH_DELTA * (j - SEARCH_STEPS // 4)


def _wls_scale(x: np.ndarray, lev: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmin_s sum c (s*lev - x)^2, per block (0 where every level is 0)."""
    num = (c * x * lev).sum(axis=2)
    den = (c * lev * lev).sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.float32(0)).astype(np.float32)


def _search_cols(wt: np.ndarray, K: int, bits: int, block_size: int, symmetric: bool, dtype: np.dtype,
                 importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = wt.shape[0]
    kb = k_blocks(K, block_size)
    pad = kb * block_size - K
    imp = np.ones(K, np.float32) if importance is None else np.asarray(importance, np.float32)
    if pad:
        wt = np.pad(wt, ((0, 0), (0, pad)))
        imp = np.pad(imp, (0, pad))  # padded slots weigh nothing
    x = wt.reshape(n, kb, block_size)
    impb = imp.reshape(1, kb, block_size)
    c = np.ascontiguousarray(np.broadcast_to(impb, x.shape), np.float32)
    qmax = np.float32((1 << bits) - 1)
    half = np.float32(1 << (bits - 1))
    bmax, bmin = x.max(axis=2), x.min(axis=2)

    best_err = np.full((n, kb), np.inf, np.float32)
    best_s = np.zeros((n, kb), np.float32)
    best_zp = np.full((n, kb), half, np.float32)

    def score(s: np.ndarray, zp: np.ndarray, q: np.ndarray) -> None:
        err = (c * (s[:, :, None] * (q - zp[:, :, None]) - x) ** 2).sum(axis=2)
        take = err < best_err
        best_err[take] = err[take]
        best_s[take] = s[take]
        best_zp[take] = zp[take]

    def levels(s: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = s.astype(dtype).astype(np.float32)  # the scale as stored
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(s != 0, np.float32(1) / s, np.float32(0))
        return s, np.clip(np.rint(x * r[:, :, None]) + zp[:, :, None], 0, qmax)

    def consider(s: np.ndarray, zp: np.ndarray) -> None:
        """Score (s, zp), then twice: refit the scale for the levels (zero point fixed), requantize, score."""
        s, q = levels(s, zp)
        score(s, zp, q)
        for _ in range(2):
            s, q = levels(_wls_scale(x, q - zp[:, :, None], c), zp)
            score(s, zp, q)

    if symmetric:
        m = np.where(np.abs(bmax) > np.abs(bmin), bmax, bmin)
        zp = np.full((n, kb), half, np.float32)
        for j in range(SEARCH_STEPS):
            # RTN's scale is -m/half (m on level 0); shrink it down to ~0.7x to clip the extreme value
            f = np.float32(1.0 - 0.3 * j / max(SEARCH_STEPS - 1, 1))
            consider(-m / half * f, zp)
    else:
        lo = np.minimum(bmin, np.float32(0))
        hi = np.maximum(bmax, np.float32(0))
        s0 = (hi - lo) / qmax
        with np.errstate(divide="ignore", invalid="ignore"):
            zp0 = np.where(s0 != 0, np.clip(_round_half_away(-lo / s0), 0, qmax), np.float32(0))
        consider(s0, zp0)  # RTN's own choice (as matmul-nbits' asymmetric mode makes it)
        span = bmax - bmin
        for j in range(SEARCH_STEPS):
            nlev = qmax + np.float32(SEARCH_DELTA * (j - SEARCH_STEPS // 4))
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where(span > 0, span / nlev, np.float32(0))
                r = np.where(s != 0, np.float32(1) / s, np.float32(0))
            lev = np.clip(np.rint((x - bmin[:, :, None]) * r[:, :, None]), 0, qmax)
            # weighted least squares of x ≈ a * lev + b, then b → integer zero point
            sw = c.sum(axis=2)
            sl = (c * lev).sum(axis=2)
            sll = (c * lev * lev).sum(axis=2)
            sx = (c * x).sum(axis=2)
            sxl = (c * x * lev).sum(axis=2)
            det = sw * sll - sl * sl
            with np.errstate(divide="ignore", invalid="ignore"):
                a = np.where(det > 0, (sw * sxl - sx * sl) / det, s)
                b = np.where(det > 0, (sll * sx - sl * sxl) / det, bmin)
                zp = np.where(a > 0, np.clip(np.rint(-b / a), 0, qmax), zp0)
            a = np.where(a > 0, a, s)
            consider(a, zp.astype(np.float32))
    zero = best_s == 0
    best_zp[zero] = 0 if not symmetric else half
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(best_s != 0, np.float32(1) / best_s, np.float32(0))
    q = np.clip(np.rint(x * r[:, :, None]) + best_zp[:, :, None], 0, qmax).astype(np.uint8)
    if pad:
        q = q.reshape(n, kb * block_size)
        q[:, K:] = 0
        q = q.reshape(n, kb, block_size)
    return q, best_s.astype(dtype), (None if symmetric else best_zp.astype(np.uint8))
