"""Browser limits a written file can break, checked from tensor sizes alone (nothing is read).

``convert`` runs :func:`check` on every file it writes and prints each problem as a warning (the file is still
written: it loads elsewhere, e.g. in Node or on a GPU with larger limits). Each warning names the limit, the
tensor or total that breaks it, and the alternative.

- **wasm32 memory, 4 GiB.** onnxruntime-web's wasm build (every published one is wasm32) copies every
  initializer into its linear memory, which cannot grow past 4 GiB, so a file whose weights alone reach it
  cannot load with ``device: 'wasm'`` (Transformers.js's default in the browser).
- **WebGPU ``maxStorageBufferBindingSize``.** A weight is bound whole as one storage buffer. The WebGPU
  default limit, and the maximum on Mesa's lavapipe and on many integrated/mobile GPUs, is 128 MiB; a larger
  tensor loads only on an adapter that offers more (SwiftShader 1 GiB, most desktop GPUs 2-4 GiB).
- External data: onnxruntime-web reads each ``.onnx_data`` chunk into one ``ArrayBuffer``; ``convert`` keeps
  chunks under 2 GB (``modelio.DEFAULT_CHUNK_BYTES``), so that limit is never broken by our files.
"""
from __future__ import annotations

import onnx

from graphkit import tensors

WASM32_MEMORY_BYTES = 4 * 2**30
WEBGPU_BINDING_BYTES = 128 * 2**20
# The other dtype to suggest, per dtype, when a tensor is too large for a 128 MiB binding: q4f16's tied table is
# 4-bit (Qwen2.5-1.5B: 111 MiB), q4's 8-bit (223 MiB).
_SMALLER = {"fp32": "q4f16", "fp16": "q4f16", "q4": "q4f16", "q8": "q4f16"}
_WASM_ALTERNATIVE = "use a 4- or 8-bit dtype (q4f16, q4, q8) for wasm, or device 'webgpu'"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def check(model: onnx.ModelProto, dtype: str | None = None) -> list[str]:
    """The browser limits this model breaks, one readable sentence each (empty: none)."""
    from graphkit.modelio import iter_tensors
    problems = []
    sizes = [(t.name, tensors.nbytes(t)) for t in iter_tensors(model)]
    total = sum(n for _, n in sizes)
    if total >= WASM32_MEMORY_BYTES:
        problems.append(f"{total / 2**30:.1f} GiB of weights cannot load with device 'wasm': onnxruntime-web is wasm32 "
                        f"and copies every weight into its memory, which stops at 4 GiB; {_WASM_ALTERNATIVE}")
    big = sorted(((n, name) for name, n in sizes if n > WEBGPU_BINDING_BYTES), reverse=True)
    if big:
        n, name = big[0]
        others = f" (and {len(big) - 1} more)" if len(big) > 1 else ""
        alt = f"dtype {_SMALLER[dtype]}" if dtype in _SMALLER else "a smaller dtype (none of graphkit's is smaller than q4f16)"
        problems.append(f"tensor '{name}' is {_mib(n)}{others}, above WebGPU's default maxStorageBufferBindingSize of "
                        f"128 MiB (also the maximum on Mesa lavapipe and many integrated or mobile GPUs): WebGPU loads it "
                        f"only on adapters with a larger limit (most desktop GPUs); for the others use {alt}")
    return problems
