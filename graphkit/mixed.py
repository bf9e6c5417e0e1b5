"""Mixed precision under a size budget: which MatMuls of a 4-bit pipeline to keep at 8 bits.

Sensitivity of each weight W [K, N] (every MatMul matmul-nbits would quantize, tied heads excepted): the
relative output error its 4-bit form causes on the calibration statistics of its input,

    e = tr(dW^T H dW) / tr(W^T H W),   dW = dequant(quant4(W)) - W,   H = E[x x^T]  (or its diagonal)

i.e. the share of that layer's output energy the rounding destroys (the quantity GPTQ minimises). The
8-bit form, for Transformers.js 4.x (onnxruntime >= 1.22, the default target): 8-bit ``MatMulNBits`` in the body's
block size (``matmul-nbits(bits=8,include=...)``), the kernel family the 4-bit MatMuls and q4's 8-bit table already
use, on CPU, wasm and WebGPU alike (onnxruntime-web's WebGPU has no ``MatMulInteger``: an int8 MatMul there would
run on the CPU). For ``--target transformers.js@3`` it is matmul-int8's (int8 weights per output channel, per-token activation scales,
``MatMulInteger``: loaded by onnxruntime, onnxruntime-web and Transformers.js 3.x/4.x alike; 8-bit
``MatMulNBits`` is not, onnxruntime 1.21 has no kernel for it). Its error is ~1/16 of the 4-bit one per
element, so keeping a weight at 8 bits removes most of ``e`` for ``extra`` bytes. Weights are taken in
order of ``e / extra`` (error removed per byte) while the extra bytes fit the budget:
``(size_budget - 1) x`` the estimated all-4-bit file.

A 4-bit tied table (q4f16's) is the first candidate: when the allowance covers it, the table is stored at 8 bits
(``tied-embedding(bits=8,block_size=32)``, the form q4's table already has) before any body MatMul is
considered. The table is read twice — every token's embedding and every logit — and on the shipped example it
is what loses the facts: q4f16 with the 4-bit table keeps 97/107 of fp32's facts on the held-out validation set
with 1/24 answers equal, the same body with the 8-bit table 107/107 and 21/24, while its lm_head's relative
output error (2.4e-3) is no larger than a body MatMul's, so the per-byte ranking below would never pick it
(docs/quantization.md; benchmarks/RESULTS.md ``quantization-methods``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from graphkit.errors import GraphkitError


@dataclass
class Sensitivity:
    node: str
    weight: str
    shape: list[int]
    rel_error: float      # e above, for the 4-bit form
    extra_bytes: int      # int8 form minus 4-bit form
    kept: bool = False


def parse_budget(text: str | float) -> float:
    """``1.15x``, ``1.15`` or ``115%`` → 1.15; must be >= 1."""
    raw = str(text).strip().lower()
    try:
        val = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw.rstrip("x"))
    except ValueError:
        raise GraphkitError(f"--size-budget {text!r}: expected a factor of the all-4-bit size such as 1.15x") from None
    if not np.isfinite(val) or val < 1.0 or val > 4.0:
        raise GraphkitError(f"--size-budget {text!r}: must be between 1.0x (all 4-bit) and 4.0x")
    return val


def bytes_4bit(K: int, N: int, block_size: int, symmetric: bool, scale_bytes: int) -> int:
    kb = -(-K // block_size)
    return N * kb * block_size // 2 + N * kb * scale_bytes + (0 if symmetric else N * -(-kb // 2))


def bytes_8bit_nbits(K: int, N: int, block_size: int, scale_bytes: int) -> int:
    """8-bit MatMulNBits, symmetric: one byte per element plus one scale per block."""
    kb = -(-K // block_size)
    return N * kb * block_size + N * kb * scale_bytes


def bytes_int8(K: int, N: int, scale_bytes: int = 4) -> int:
    return K * N + N * scale_bytes


TABLE = "tied table (embedding + lm_head)"  # the Sensitivity.node of the table candidate


def plan(model_path: Path, stats_path: Path, budget: float, block_size: int, symmetric: bool,
         scale_bytes: int = 4, table_bytes: int = 0, table_8bit_bytes: int = 0, form: str = "nbits"
         ) -> tuple[list[Sensitivity], dict]:
    """Rank the weights of ``model_path`` (the fp32 export) and mark those kept at 8 bits. ``table_bytes``: the
    tied table's bytes in the pipeline's form; ``table_8bit_bytes`` (> 0: the table is 4-bit and may go to 8 bits):
    its bytes at 8 bits, taken first when the allowance covers it. ``form``: the 8-bit form's byte cost, ``nbits``
    (8-bit MatMulNBits, Transformers.js 4.x) or ``int8`` (MatMulInteger, for 3.x)."""
    from graphkit import tensors
    from graphkit.calibration import Stats
    from graphkit.modelio import load_model
    from passes._quant import dequantize_blockwise, quantize_blockwise
    from passes.matmul_nbits import MatMulNBitsPass, _node_label
    model = load_model(model_path, load_external="lazy")
    jobs = MatMulNBitsPass()._plan(model)[0]
    stats = Stats(stats_path)
    rows: list[Sensitivity] = []
    four = 0
    seen: set[str] = set()
    for job in jobs:
        if job.tied or job.weight.root in seen:
            continue
        seen.add(job.weight.root)
        W = np.asarray(job.weight.array(), np.float32)
        K, N = W.shape
        q, s, z = quantize_blockwise(W, 4, block_size, symmetric, name=job.weight.root)
        D = dequantize_blockwise(q, s, z, 4, block_size, K).astype(np.float32) - W
        H = stats.hessian(job.weight.root, job.node.input[0])
        if H is not None and H.shape == (K, K):
            err = float(np.einsum("kn,kn->", D, H @ D))
            ref = float(np.einsum("kn,kn->", W, H @ W))
        else:
            imp = stats.importance(job.weight.root, job.node.input[0])
            imp = np.ones(K, np.float32) if imp is None or imp.shape != (K,) else imp
            err = float((imp[:, None] * D * D).sum())
            ref = float((imp[:, None] * W * W).sum())
        b4 = bytes_4bit(K, N, block_size, symmetric, scale_bytes)
        four += b4
        rows.append(Sensitivity(_node_label(job.node), job.weight.root, [K, N], err / max(ref, 1e-30),
                                (bytes_8bit_nbits(K, N, block_size, scale_bytes) if form == "nbits"
                                 else bytes_int8(K, N)) - b4))
    # the all-4-bit file, estimated: every other initializer as it is in the export (fp32), the 4-bit weights
    quantized = {j.weight.root for j in jobs}
    if table_bytes:  # the tied table (the largest Gather table) is replaced by the pipeline's quantized one
        inits = {t.name: t for t in model.graph.initializer}
        tables = [n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
        if tables:
            quantized.add(max(tables, key=lambda name: int(np.prod(inits[name].dims))))
    rest = sum(tensors.nbytes(t) for t in model.graph.initializer if t.name not in quantized)
    est = rest * scale_bytes // 4 + four + table_bytes
    allowance = int((budget - 1.0) * est)
    spent = 0
    if table_8bit_bytes > table_bytes > 0:
        extra = table_8bit_bytes - table_bytes
        t = Sensitivity(TABLE, "", [], float("nan"), extra, kept=extra <= allowance)
        rows.insert(0, t)
        spent += extra if t.kept else 0
    for r in sorted((r for r in rows if r.node != TABLE), key=lambda r: r.rel_error / max(r.extra_bytes, 1), reverse=True):
        if spent + r.extra_bytes <= allowance:
            r.kept = True
            spent += r.extra_bytes
    return rows, {"budget": budget, "estimated_4bit_bytes": est, "allowance_bytes": allowance, "spent_bytes": spent,
                  "kept": [asdict(r) for r in rows if r.kept]}

