#!/usr/bin/env python3
"""CPU runtime: prefill latency and decode speed of our models vs the anchor recipe's (and genai's int4),
plus the memory-bandwidth bound on decode speed.

    .venv/bin/python benchmarks/runtime.py [--size 0.5b|1.5b] [--repeats 5]

Needs the outputs of `benchmarks/conversion.py --size SIZE` in /tmp/gk-bench/qwen2.5-<size>/ (ours, anchor,
genai-int4; also ours-fuse when conversion.py ran the ``ours-fuse`` contender).
Each measurement is `graphkit bench`'s child process (graphkit.bench.run_child): onnxruntime CPU EP,
2 intra-op threads, load, one untimed warm-up generation, then a timed greedy generation of 32 new
tokens after a 128-token random prompt (batch 1). Models alternate round-robin (one untimed page-cache
pass first); medians over ``--repeats``.

Physical limit: decode reads every weight once per token, so tok/s <= B / (weight bytes read per
step). B = measured memory read bandwidth with 2 processes at once (one per core; numpy int64 sum of a
1 GiB array, best of 5); the 1-process numpy copy of 1 GiB (read + write traffic) is shown too. Bytes
read per step = all initializer bytes, minus tables read only by a Gather (the embedding: one row per
token); KV cache and activations (~1-2 %) are left out, so the bound is optimistic.

Options for studies (issue 7): ``--extra "NAME DTYPE=PATH"`` adds any model file as a contender (e.g. a
``graphkit apply`` output with a proposed pipeline), ``--only GLOB,...`` keeps only matching contenders,
``--section SUFFIX`` writes ``runtime-SIZE-SUFFIX`` instead of ``runtime-SIZE``, and ``--profile`` adds a
per-op-type table: onnxruntime's profiler (SessionOptions.enable_profiling) in a separate child per
model, kernel time and kernel count per decode step (MatMulNBits split by K x N, bits, accuracy_level),
averaged over the last 14 of 16 decode steps after the same 128-token prompt. Profiling adds overhead
per kernel: compare shares and counts there, speeds in the main table.

genai's graph declares its KV inputs as [batch, 2, past, 'kv_cache_dim']; Transformers.js (and our
runner) turn unknown symbols into 0, which its GroupQueryAttention rejects, so the benchmark runs a
copy of its model.onnx with that one dim set to the head size (the weights file is shared, unchanged).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GIB = 1 << 30


# ------------------------------------------------------------------------------------ bandwidth

def bw_child(kind: str, start_at: float = 0.0) -> dict:
    import numpy as np
    if kind == "copy":
        src = np.ones(GIB // 8, np.float64)
        dst = np.empty_like(src)
        best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
        return {"gbps": 2 * src.nbytes / best / 1e9}  # read + write traffic
    v = np.ones(GIB, np.uint8).view(np.int64)
    v.sum()
    while time.time() < start_at:  # start the two readers together
        time.sleep(0.001)
    best = min(_timed(v.sum) for _ in range(5))
    return {"gbps": v.nbytes / best / 1e9}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bandwidth() -> dict:
    import subprocess
    C.wait_quiet()
    copy = C.run_child("runtime.py", "bw", {"kind": "copy"}, quiet=False)["gbps"]
    start = time.time() + 6
    cmd = lambda: [C.PY, __file__, "--child", "bw", json.dumps({"kind": "read", "start_at": start})]  # noqa: E731
    env = {**__import__("os").environ, "PYTHONPATH": str(C.ROOT)}
    procs = [subprocess.Popen(cmd(), stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    reads = [C.json_tail(p.communicate()[0])["gbps"] for p in procs]
    return {"copy_1proc": copy, "read_2proc": sum(reads), "read_each": reads}


# ------------------------------------------------------------------------------------ models

def read_bytes_per_step(path: Path) -> int:
    """Initializer (and Constant) bytes, minus tensors whose only readers are Gathers (their data input)."""
    from graphkit.inspect import tensor_nbytes
    from graphkit.modelio import load_model
    g = load_model(path, load_external=False).graph
    sizes = {t.name: tensor_nbytes(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t"):
            sizes[n.output[0]] = tensor_nbytes(n.attribute[0].t)
    readers: dict[str, list[tuple[str, int]]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n.op_type, i))
    gather_only = {k for k, rs in readers.items() if rs and all(op == "Gather" and i == 0 for op, i in rs)}
    return sum(b for k, b in sizes.items() if k not in gather_only)


def genai_model(folder: Path) -> Path:
    import onnx
    cfg = json.loads((folder / "genai_config.json").read_text())
    head = cfg["model"]["decoder"]["head_size"]
    out = folder / "model_static_kv_dim.onnx"
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == "kv_cache_dim":
                d.Clear()
                d.dim_value = head
    onnx.save(m, str(out))
    return out


def with_accuracy_level(src: Path, bits: int, level: int = 4) -> Path:
    """Diagnostic copy of ``src`` with ``accuracy_level`` set on its ``bits``-bit MatMulNBits nodes."""
    import onnx
    m = onnx.load(str(src))
    for n in m.graph.node:
        if n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == bits for a in n.attribute):
            for a in [a for a in n.attribute if a.name == "accuracy_level"]:
                n.attribute.remove(a)
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    out = src.with_name(f"{src.stem}.acc{level}-{bits}bit.onnx")
    onnx.save(m, str(out), save_as_external_data=m.ByteSize() > 2**31 - 2**26, location=out.name + "_data")
    return out


def paired(ours: list[dict], other: list[dict]) -> str:
    """Per-round speed ratio (other's decode ms/token ÷ ours), median [min–max]: alternated rounds run back to back."""
    r = [o["decode_ms_per_token"] / u["decode_ms_per_token"] for u, o in zip(ours, other)]
    return C.spread(r, "{:.2f}")


def models(base: Path, diag: bool = False) -> dict[str, Path]:
    found = {}
    for who, folder in (("ours", base / "ours" / "onnx"), ("ours-fuse", base / "ours-fuse" / "onnx"),
                        ("anchor", base / "anchor")):
        for dtype, f in (("fp32", "model.onnx"), ("q4", "model_q4.onnx"), ("q4f16", "model_q4f16.onnx")):
            if (folder / f).exists():
                found[f"{who} {dtype}"] = folder / f
    if (base / "genai-int4" / "model.onnx").exists():
        found["genai int4"] = genai_model(base / "genai-int4")
    if diag:  # accuracy_level=4 on our 8-bit lm_head only / on every 4-bit node of the anchor
        for dtype in ("q4", "q4f16"):
            if f"ours {dtype}" in found:
                found[f"ours-head8acc4 {dtype}"] = with_accuracy_level(found[f"ours {dtype}"], 8)
        if "anchor q4" in found:
            found["anchor-acc4 q4"] = with_accuracy_level(found["anchor q4"], 4)
    return found


def profile_child(path: str, steps: int = 16, prompt_tokens: int = 128, threads: int = 2) -> dict:
    """Per-op-type kernel time (us) and count per decode step, from onnxruntime's profiler."""
    import collections
    import os

    import numpy as np
    import onnx
    import onnxruntime as ort

    from graphkit.ortrun import DecoderRunner
    labels = {}
    for n in onnx.load(path, load_external_data=False).graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            labels[n.name] = f"MatMulNBits K{a['K']}xN{a['N']} {a.get('bits', 4)}-bit acc{a.get('accuracy_level', 0)}"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(C.WORK / f".profile-{os.getpid()}")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    runner = DecoderRunner(sess)
    vocab = sess.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 1000
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens), dtype=np.int64)
    mask = np.ones_like(ids)
    out = runner.step(ids, mask, runner.empty_past(1))
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1).reshape(1, 1).astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        out = runner.step(nxt, mask, out.present)
    trace = sess.end_profiling()
    events = json.loads(Path(trace).read_text())
    Path(trace).unlink()
    wins = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][-(steps - 2):]
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in wins):
            op = labels.get(e["name"][:-len("_kernel_time")], e["args"].get("op_name", "?"))
            agg[op][0] += 1
            agg[op][1] += e["dur"]
    n = len(wins)
    return {"model_run_us": sum(b - a for a, b in wins) / n, "ops": {k: [c / n, d / n] for k, (c, d) in agg.items()}}


def profile_table(found: dict[str, Path]) -> str:
    parts = []
    for name, path in found.items():
        C.wait_quiet()
        r = C.run_child("runtime.py", "profile", {"path": str(path)}, quiet=False)
        tot = sum(d for _, d in r["ops"].values())
        rows = [[op, f"{c:.0f}", f"{d / 1000:.3f}", f"{100 * d / tot:.1f}%"]
                for op, (c, d) in sorted(r["ops"].items(), key=lambda kv: -kv[1][1]) if d / tot >= 0.002]
        parts.append(f"**{name}**: model_run {r['model_run_us'] / 1000:.2f} ms/step under the profiler, kernels "
                     f"{tot / 1000:.2f} ms, {sum(c for c, _ in r['ops'].values()):.0f} kernels/step\n\n"
                     + C.table(["op (MatMulNBits by shape)", "kernels/step", "ms/step", "share"], rows))
    return "\n\n".join(parts)


def bench_one(path: Path, settings) -> dict:
    from graphkit.bench import run_child
    C.wait_quiet()
    ru0, b0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), C._busy_jiffies(), time.perf_counter()
    r = run_child(path, "CPUExecutionProvider", settings)
    ru1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    r["others_cores"] = max(0.0, ((C._busy_jiffies() - b0) / C.HZ - cpu) / wall)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diag", action="store_true", help="also run accuracy_level=4 copies: ours with it on the "
                    "8-bit lm_head MatMulNBits only, the anchor's q4 with it on every MatMulNBits")
    ap.add_argument("--extra", action="append", default=[], help='"NAME DTYPE=PATH": one more contender')
    ap.add_argument("--only", default="", help="comma-separated globs: keep only these contenders")
    ap.add_argument("--section", default="", help="RESULTS.md section suffix (runtime-SIZE-SUFFIX)")
    ap.add_argument("--profile", action="store_true", help="add per-op-type kernel time per decode step")
    a = ap.parse_args()
    import fnmatch
    from graphkit.bench import BenchSettings, run_child
    base = C.WORK / f"qwen2.5-{a.size}"
    found = models(base, a.diag)
    for spec in a.extra:
        label, _, path = spec.partition("=")
        if len(label.split()) != 2 or not Path(path).exists():
            raise SystemExit(f"--extra {spec!r}: give 'NAME DTYPE=PATH' with an existing PATH")
        found[label] = Path(path)
    if a.only:
        globs = [g.strip() for g in a.only.split(",") if g.strip()]
        found = {k: v for k, v in found.items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}
    if not found:
        raise SystemExit(f"no converted models in {base}; run benchmarks/conversion.py --size {a.size} first")
    s = BenchSettings(provider="cpu", prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, repeats=a.repeats,
                      threads=a.threads)
    for name, p in found.items():  # page cache + first-touch, untimed
        C.log(f"warm-up {name}")
        run_child(p, "CPUExecutionProvider", s)
    runs = C.alternate(list(found), a.repeats, lambda name, _r: bench_one(found[name], s))
    C.log("memory bandwidth")
    bw = bandwidth()
    B = bw["read_2proc"] * 1e9
    rows = []
    for name, rs in runs.items():
        who, dtype = name.split()
        step = read_bytes_per_step(found[name])
        tps, dec, pre = C.med(rs, "tokens_per_s"), C.med(rs, "decode_ms_per_token"), C.med(rs, "prefill_ms")
        anchor = runs.get(f"anchor {dtype}") if who not in ("anchor", "genai") else None
        genai = runs.get("genai int4") if who not in ("anchor", "genai") else None
        rows.append([name, C.mb(C.file_bytes(found[name])), f"{C.med(rs, 'load_s'):.1f}",
                     f"{C.mb(C.med(rs, 'rss_after_load_bytes'))} / {C.mb(C.med(rs, 'peak_rss_bytes'))}",
                     f"{pre:.0f}", f"{dec:.1f} ({min(r['decode_ms_per_token'] for r in rs):.1f})", f"{tps:.1f}",
                     C.ratio(pre, C.med(anchor, "prefill_ms")) if anchor else "—",
                     C.ratio(tps, C.med(anchor, "tokens_per_s")) if anchor else "—",
                     C.ratio(tps, C.med(genai, "tokens_per_s")) if genai else "—",
                     paired(rs, genai) if genai else "—",
                     C.mb(step), f"{B / step:.1f}", f"{100 * tps / (B / step):.0f}%",
                     " / ".join(f"{r['others_cores']:.2f}" for r in rs)])
    head = ["model", "file size", "load s", "RSS after load / peak", "prefill ms", "decode ms/tok median (best)",
            "tok/s", "prefill ours/anchor", "tok/s ours/anchor", "tok/s ours/genai", "ours/genai paired by round", "weights read / token", "bound tok/s",
            "% of bound", "others (cores, per run)"]
    body = f"""## CPU runtime, random-weight Qwen2.5-{a.size} shape

{C.machine()}

Command: `.venv/bin/python benchmarks/runtime.py {' '.join(repr(x) if ' ' in x else x for x in sys.argv[1:])}`. onnxruntime CPU EP,
{a.threads} intra-op threads, batch 1, prompt {a.prompt_tokens} random tokens, {a.new_tokens} greedy new tokens;
medians of {a.repeats} alternating runs (fresh process each; load + warm-up generation untimed). Models from
`benchmarks/conversion.py --size {a.size}` (ours = `graphkit convert`; ours-fuse = `graphkit convert --fuse`; anchor = export → MatMulNBitsQuantizer
→ convert_float_to_float16(keep_io_types=True); genai = onnxruntime-genai builder `-p int4 -e cpu`, run with
its KV head dim made static, see the script's docstring). Diagnostics (`--diag`): *ours-head8acc4* = ours with
`accuracy_level=4` written on the 8-bit lm_head MatMulNBits node only; *anchor-acc4* = the anchor's q4 with
`accuracy_level=4` on every MatMulNBits (same weights; attribute patch). "tok/s ours/anchor" above 1 = ours faster;
"prefill ours/anchor" below 1 = ours faster. "paired by round": genai's decode ms/token over ours in the same round
(the two ran back to back), median [min–max] over rounds — steadier than a ratio of medians when the host drifts.

Memory bandwidth: {bw['read_2proc']:.1f} GB/s read with 2 processes ({' + '.join(f'{x:.1f}' for x in bw['read_each'])});
1-process numpy copy of 1 GiB: {bw['copy_1proc']:.1f} GB/s (read + write traffic). Bound tok/s = {bw['read_2proc']:.1f} GB/s
÷ weight bytes read per decode step.

{C.table(head, rows)}
"""
    if a.profile:
        C.log("profiles")
        body += "\n### Where decode time goes (onnxruntime profiler, per decode step)\n\n" + profile_table(found) + "\n"
    C.write_section(f"runtime-{a.size}" + (f"-{a.section}" if a.section else ""), body)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        C.child_main({"bw": bw_child, "profile": profile_child})
    else:
        main()
