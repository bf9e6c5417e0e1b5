#!/usr/bin/env python3
"""Pass speed: our 4-bit quantizer and fp16 pass vs onnxruntime's own tools, alternating, medians.

    .venv/bin/python benchmarks/pass_speed.py [--repeats 3] [--size 0.5b] [--skip-fp16] [--shapes 1536x256,...]

1. matmul-nbits (4 bits, block 32, symmetric) on random N(0, 0.02) float32 weights of the
   Qwen2.5-1.5B shapes K×N, two levels:
   * ``graph``: a one-MatMul ONNX model; ours = the ``matmul-nbits`` pass (no checker), anchor =
     ``MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True).process()``;
   * ``kernel``: ours = ``passes._quant.quantize_blockwise`` (numpy), anchor = ORT's C++
     ``quantize_matmul_4bits`` (what MatMulNBitsQuantizer calls).
   Both sides' packed weights and scales are hashed (SHA-256) and must be byte-equal.
2. fp16 on the fp32 and q4 files of `graphkit convert` of the random model of ``--size``
   (conversion.py writes them; run it first, or this exports a fresh fp32 model): ours = the
   ``fp16`` pass as `graphkit convert` runs it (fp16 KV cache), and with ``keep_io_types=true``;
   anchor = ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``
   (from a ModelProto; from the path when the file is over 2 GB, which is what it supports).
   Times are load + convert (load alone is reported too); no save.
Each contender runs in its own process; peak RSS is that process's VmHWM and "extra" is VmHWM minus
VmRSS just before the timed call (weights already in memory).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAPES = [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536), (1536, 151936)]


# ---------------------------------------------------------------------------------------- children

def _weights(K: int, N: int, seed: int = 0):
    import numpy as np
    w = np.random.default_rng(seed).standard_normal((K, N), dtype=np.float32)
    w *= np.float32(0.02)
    return w


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(memoryview(a.tobytes()))
    return h.hexdigest()[:16]


def quant_child(impl: str, level: str, K: int, N: int) -> dict:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    w = _weights(K, N)
    if level == "graph":
        g = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(w, "W")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        del w
    rss0 = C.proc_status("VmRSS")
    t0 = time.perf_counter()
    if level == "kernel" and impl == "ours":
        from passes._quant import quantize_blockwise
        packed, scales, _ = quantize_blockwise(w, 4, 32, True)
    elif level == "kernel":
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits
        kb = -(-K // 32)
        packed = np.zeros((N, kb, 16), np.uint8)
        scales = np.zeros((N, kb), np.float32)
        zp = np.zeros((N, -(-kb // 2)), np.uint8)
        quantize_matmul_4bits(packed, w, scales, zp, 32, N, K, True)
    elif impl == "ours":
        from passes.matmul_nbits import MatMulNBitsPass
        model = MatMulNBitsPass(bits=4, block_size=32, symmetric=True)(model).model
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
        q.process()
        model = q.model.model
    sec = time.perf_counter() - t0
    if level == "graph":
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
        inits = {t.name: t for t in model.graph.initializer}
        packed, scales = (numpy_helper.to_array(inits[n]) for n in node.input[1:3])
    return {"seconds": sec, "rss0": rss0, "hash": _sha(packed, scales.reshape(N, -1))}


def fp16_child(impl: str, path: str) -> dict:
    import onnx
    from graphkit.modelio import load_model
    big = C.file_bytes(Path(path)) > 2**31 - 2**26
    t0 = time.perf_counter()
    if impl == "ort":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        model = None if big else onnx.load(path)
        t_load = time.perf_counter() - t0
        rss0 = C.proc_status("VmRSS")
        out = convert_float_to_float16(path if big else model, keep_io_types=True)
    else:
        from passes.fp16 import Fp16Pass
        model = load_model(path)
        t_load = time.perf_counter() - t0
        rss0 = C.proc_status("VmRSS")
        out = Fp16Pass(keep_io_types=(impl == "ours_keepio"))(model).model
    sec = time.perf_counter() - t0
    from graphkit.pipeline import initializer_bytes
    return {"seconds": sec, "load_s": t_load if not big or impl != "ort" else None, "rss0": rss0,
            "nodes": len(out.graph.node), "casts": sum(n.op_type == "Cast" for n in out.graph.node),
            "weights": initializer_bytes(out)}


# ------------------------------------------------------------------------------------------ parent

def bench_quant(shapes, repeats: int) -> str:
    rows = []
    for K, N in shapes:
        for level in ("graph", "kernel"):
            def one(impl, _r):
                return C.run_child("pass_speed.py", "quant", {"impl": impl, "level": level, "K": K, "N": N})
            runs = C.alternate(["ours", "ort"], repeats, one)
            o, a = runs["ours"], runs["ort"]
            same = len({r["hash"] for r in o + a}) == 1
            rows.append([f"{K}×{N}", level, f"{C.med(o, 'seconds'):.3f}", f"{C.med(a, 'seconds'):.3f}",
                         C.ratio(C.med(o, 'seconds'), C.med(a, 'seconds')),
                         C.mb(C.med(o, 'vm_hwm')), C.mb(C.med(a, 'vm_hwm')),
                         C.mb(C.med(o, 'vm_hwm') - C.med(o, 'rss0')), C.mb(C.med(a, 'vm_hwm') - C.med(a, 'rss0')),
                         "yes" if same else "**NO**", f"{max(r['others_cores'] for r in o + a):.2f}"])
    head = ["K×N", "level", "ours s", "ORT s", "time ours/ORT", "peak RSS ours", "peak RSS ORT",
            "extra ours", "extra ORT", "bytes equal", "others (max cores)"]
    return C.table(head, rows)


def fp16_inputs(size: str) -> list[Path]:
    ours = C.WORK / f"qwen2.5-{size}" / "ours" / "onnx"
    found = [p for p in (ours / "model.onnx", ours / "model_q4.onnx") if p.exists()]
    if found:
        return found
    out = C.WORK / f"qwen2.5-{size}" / "pass-speed-export.onnx"
    if not out.exists():
        import build_random_model as B
        hf = B.ensure(size)
        C.log(f"no conversion output; exporting {hf} → {out}")
        r = C.run_cmd([C.PY, "-m", "graphkit", "export", str(hf), "-o", str(out)], quiet=False)
        assert r["rc"] == 0, r["stderr"][-2000:]
    return [out]


def bench_fp16(size: str, repeats: int) -> str:
    rows = []
    for path in fp16_inputs(size):
        runs = C.alternate(["ours", "ours_keepio", "ort"], repeats,
                           lambda impl, _r: C.run_child("pass_speed.py", "fp16", {"impl": impl, "path": str(path)}))
        a = runs["ort"]
        for impl, label in (("ours", "ours (fp16 KV, as convert runs it)"), ("ours_keepio", "ours keep_io_types=true"),
                            ("ort", "ORT convert_float_to_float16(keep_io_types=True)")):
            r = runs[impl]
            load = [x["load_s"] for x in r if x.get("load_s") is not None]
            rows.append([f"{path.parent.parent.name}/{path.name} ({C.mb(C.file_bytes(path))})", label,
                         f"{C.med(r, 'seconds'):.1f}", f"{sorted(load)[len(load) // 2]:.1f}" if load else "in total",
                         C.ratio(C.med(r, 'seconds'), C.med(a, 'seconds')), C.mb(C.med(r, 'vm_hwm')),
                         C.ratio(C.med(r, 'vm_hwm'), C.med(a, 'vm_hwm')), r[0]["nodes"], r[0]["casts"],
                         C.mb(r[0]["weights"]), f"{max(x['others_cores'] for x in r):.2f}"])
    head = ["input", "contender", "load+convert s", "of which load s", "time / ORT", "peak RSS", "RSS / ORT",
            "nodes out", "Casts out", "weights out", "others (max cores)"]
    return C.table(head, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="0.5b", help="random model whose export the fp16 comparison uses")
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the five Qwen2.5-1.5B shapes)")
    ap.add_argument("--fp16-repeats", type=int, default=None, help="repeats for the fp16 part (default: --repeats)")
    ap.add_argument("--skip-fp16", action="store_true")
    ap.add_argument("--skip-quant", action="store_true")
    a = ap.parse_args()
    C.WORK.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")] if a.shapes else SHAPES
    parts = [f"## Pass speed\n\n{C.machine()}\n\nCommand: `.venv/bin/python benchmarks/pass_speed.py "
             f"--repeats {a.repeats} --size {a.size}" + (f" --fp16-repeats {a.fp16_repeats}" if a.fp16_repeats else "")
             + f"`. Medians of {a.repeats} (fp16: {a.fp16_repeats or a.repeats}) alternating runs, each in its own "
             "process. *extra* = peak RSS minus RSS just before the timed call.\n"]
    if not a.skip_quant:
        parts.append("### 4-bit block quantization (bits 4, block 32, symmetric), random N(0, 0.02) weights\n\n"
                     "`graph`: ours = `matmul-nbits` pass on a one-MatMul model vs "
                     "`MatMulNBitsQuantizer(block_size=32, is_symmetric=True).process()`; `kernel`: ours = "
                     "`passes._quant.quantize_blockwise` (numpy) vs ORT's C++ `quantize_matmul_4bits`.\n\n"
                     + bench_quant(shapes, a.repeats))
    if not a.skip_fp16:
        parts.append(f"### fp16 conversion, random-weight Qwen2.5-{a.size} shape (`graphkit convert` output)\n\n"
                     + bench_fp16(a.size, a.fp16_repeats or a.repeats))
    C.write_section(f"pass_speed-{a.size}", "\n\n".join(parts))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        C.child_main({"quant": quant_child, "fp16": fp16_child})
    else:
        main()
