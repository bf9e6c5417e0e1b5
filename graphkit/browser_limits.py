"""Browser limits a written file breaks, checked from tensor sizes alone (nothing is read).

``convert`` runs :func:`check` on every file it writes and prints each problem as a warning (the file is still
written: it loads elsewhere, e.g. in Node or on a GPU with larger limits). Each warning names the limit, the
tensor or total that breaks it, and the alternative.

- **wasm32 memory, 4 GiB.** onnxruntime-web's wasm build (every published one is wasm32) copies every
  initializer into its linear memory, which cannot grow past 4 GiB, so a file whose weights alone reach it
  cannot load with ``device: 'wasm'`` (Transformers.js's default in the browser).
- Not a warning: WebGPU's ``maxStorageBufferBindingSize`` (128 MiB on Mesa lavapipe and by default). Measured on
  the Qwen2.5-1.5B shape (RESULTS.md `browser-1.5b-webgpu-f16`): q4, whose 8-bit tied table is 223 MiB, loads and
  generates on lavapipe in Chromium, so onnxruntime-web does not need one binding per weight; no file is refused
  for it without a measured failure.
- External data: onnxruntime-web reads each ``.onnx_data`` chunk into one ``ArrayBuffer``; ``convert`` keeps
  chunks under 2 GB (``modelio.DEFAULT_CHUNK_BYTES``), so that limit is never broken by our files.
"""
from __future__ import annotations

import onnx

from graphkit import tensors

WASM32_MEMORY_BYTES = 4 * 2**30
_WASM_ALTERNATIVE = "use a 4- or 8-bit dtype (q4f16, q4, q8) for wasm, or device 'webgpu'"


def check(model: onnx.ModelProto, dtype: str | None = None) -> list[str]:
    """The browser limits this model breaks, one readable sentence each (empty: none)."""
    from graphkit.modelio import iter_tensors
    problems = []
    sizes = [(t.name, tensors.nbytes(t)) for t in iter_tensors(model)]
    total = sum(n for _, n in sizes)
    if total >= WASM32_MEMORY_BYTES:
        problems.append(f"{total / 2**30:.1f} GiB of weights cannot load with device 'wasm': onnxruntime-web is wasm32 "
                        f"and copies every weight into its memory, which stops at 4 GiB; {_WASM_ALTERNATIVE}")
    return problems
