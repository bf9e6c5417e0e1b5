#!/usr/bin/env python3
"""Prototype (issue 18): one q8 file whose decode steps run a different graph from its prefill.

    .venv/bin/python benchmarks/decode_branch.py build FP32.onnx OUT.onnx [--decode SPEC] [--prefill SPEC] [--singles DIR]
    .venv/bin/python benchmarks/decode_branch.py check FOLDER_WITH_fp32 IF.onnx PREFILL.onnx DECODE.onnx

At decode (``input_ids`` of sequence length 1) a per-tensor activation scale *is* a per-token scale, so the
DynamicQuantizeLinear form (which onnxruntime fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat) loses
nothing there, while prefill needs today's per-token form (one massive-activation token would set a shared scale).
``build`` runs both pipelines through graphkit's own machinery (``parse_spec`` / ``run_passes``, sharing their
common prefix), then merges the two graphs into one ``If``::

    cond = Equal(Shape(input_ids, start=1, end=2), [1])
    logits, present.* = If(cond, then_branch = decode graph, else_branch = prefill graph)

The merge is ``passes/decode_branch.py``'s (the ``decode-branch`` pass): both branches read the same outer-scope
initializers (equal names stored once after comparing their bytes; a name whose contents differ is renamed and
stored twice, reported), every value a branch computes is prefixed, graph inputs and outputs are the single-form
files', so Transformers.js sees the same interface. This script runs the two pipelines from the fp32 export with
their common prefix once, and saves the single-form files beside it (``--singles``) for ``check``.

``check`` runs Python onnxruntime on the shipped example: the If file's prefill logits against the prefill-form
file's, its decode-step logits against the decode-form file's (same past fed to both), and greedy tokens of all
three against fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphkit import tensors  # noqa: E402
from graphkit.modelio import load_model, save_model  # noqa: E402
from graphkit.pipeline import parse_spec, run_passes  # noqa: E402
from passes.decode_branch import merge  # noqa: E402  (the pass's own merge: one code path)

PREFILL_SPEC = "logits-to-keep,fuse-rmsnorm,fuse-rotary(max_positions={P}),pack-matmul,matmul-int8(quantize_embedding_gather=true)"
DECODE_SPECS = {
    "dql": "logits-to-keep,fuse-rmsnorm,fuse-rotary(max_positions={P}),pack-matmul,"
           "matmul-int8(quantize_embedding_gather=true,activations=per-tensor)",
    "dql-gqa": "logits-to-keep,fuse-rmsnorm,fuse-rotary(max_positions={P}),fuse-gqa(padding=bias),pack-matmul,pack-gqa,"
               "matmul-int8(quantize_embedding_gather=true,activations=per-tensor)",
}


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n].describe() == b[n].describe():
        n += 1
    return n


def run_two(fp32: Path, decode_spec: str, prefill_spec: str, log=print) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(decode model, prefill model) from the fp32 export; their common leading passes run once."""
    dp, pp = parse_spec(decode_spec), parse_spec(prefill_spec)
    n = _shared_prefix(dp, pp)
    rep = lambda r: log("   " + r.line())  # noqa: E731
    base = load_model(fp32, load_external="lazy")
    if n:
        base, _ = run_passes(base, dp[:n], on_report=rep)
    log(f"prefill: {', '.join(p.describe() for p in pp[n:])}")
    prefill, _ = run_passes(base, pp[n:], on_report=rep, keep_input=True)
    log(f"decode: {', '.join(p.describe() for p in dp[n:])}")
    decode, _ = run_passes(base, dp[n:], on_report=rep, keep_input=True)
    return decode, prefill


def build(fp32: Path, out: Path, decode_spec: str, prefill_spec: str, singles: Path | None = None) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="decode-branch-", dir=str(out.parent)) as tmp, \
            tensors.spill_to(Path(tmp) / ".spill", f"building {out}"):
        decode, prefill = run_two(fp32, decode_spec, prefill_spec)
        if singles:
            save_model(decode, singles / "decode.onnx")
            save_model(prefill, singles / "prefill.onnx")
        model, info = merge(decode, prefill)
        info = {k.replace("bytes", "mb") if k.endswith("bytes") else k: (round(v / 2**20, 2) if k.endswith("bytes") else v) for k, v in info.items()}
        files = save_model(model, out)
    info.update(seconds=round(time.perf_counter() - t0, 1), bytes=sum(f.stat().st_size for f in files),
                files=[str(f) for f in files])
    print(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------ check (Python onnxruntime)

def _prompt(n: int = 24, vocab: int = 1000) -> list[int]:
    return [int(x) for x in np.random.default_rng(0).integers(0, vocab, n)]


def check_files(fp32: Path, if_file: Path, prefill_file: Path, decode_file: Path, new_tokens: int = 12,
                prompt_len: int = 24) -> dict:
    from graphkit.ortrun import DecoderRunner
    r_if, r_pre, r_dec, r_ref = (DecoderRunner.from_file(p) for p in (if_file, prefill_file, decode_file, fp32))
    vocab = int(r_ref.session.get_outputs()[0].shape[-1]) if isinstance(r_ref.session.get_outputs()[0].shape[-1], int) else 1000
    prompt = _prompt(prompt_len, min(vocab, 1000))
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    # prefill (all positions' logits): If file vs prefill-form file
    a = r_if.step(ids, mask, r_if.empty_past(1), logits_to_keep=0)
    b = r_pre.step(ids, mask, r_pre.empty_past(1), logits_to_keep=0)
    res = {"prefill_max_abs_diff": float(np.abs(a.logits - b.logits).max()),
           "prefill_present_max_abs_diff": max(float(np.abs(a.present[k] - b.present[k]).max()) for k in a.present)}
    # one decode step on the same past (the prefill-form file's): If file vs decode-form file
    nxt = np.array([[int(np.argmax(b.logits[0, -1]))]], np.int64)
    mask2 = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    c = r_if.step(nxt, mask2, b.present, logits_to_keep=1)
    d = r_dec.step(nxt, mask2, b.present, logits_to_keep=1)
    e = r_pre.step(nxt, mask2, b.present, logits_to_keep=1)
    res["decode_max_abs_diff_vs_decode_form"] = float(np.abs(c.logits - d.logits).max())
    res["decode_max_abs_diff_vs_prefill_form"] = float(np.abs(c.logits - e.logits).max())
    res["decode_present_max_abs_diff"] = max(float(np.abs(c.present[k] - d.present[k]).max()) for k in c.present)
    greedy = {}
    for name, r in (("fp32", r_ref), ("if", r_if), ("prefill_form", r_pre), ("decode_form", r_dec)):
        greedy[name] = r.greedy(prompt, new_tokens)[0]
    res["greedy"] = greedy
    res["greedy_if_equals_fp32_prefix"] = next((i for i, (x, y) in enumerate(zip(greedy["if"], greedy["fp32"])) if x != y),
                                               new_tokens)
    print(json.dumps(res))
    return res


def graph_bench(size: str, contenders: list[str], clients: list[str], repeats: int, ops_runs: int, threads: int,
                folders: dict[str, str]) -> None:
    """onnxruntime session.run of one decode step (past 144, random keys/values) of each contender's real file,
    straight in onnxruntime-web wasm (Chromium) / onnxruntime-node, each file in a process of its own (two untimed
    warm-up sessions, then ``ops_runs`` timed runs, median), files alternated round-robin: the graph's time
    without Transformers.js, for the RESULTS section ``decode-branch-graph-<size>``."""
    import statistics
    from types import SimpleNamespace
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common as C
    import browser as B
    import decode_floor as D
    B.FOLDERS.update(folders)
    base = C.WORK / f"qwen2.5-{size}"
    folder = C.WORK / f"decode-branch-graphs-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    real = {}
    for n in contenders:  # as decode_floor.real_files
        dst = folder / f"real-{n.replace(' ', '-')}.onnx"
        if not dst.exists():
            C.link_or_copy(B.contender_file(base, n), dst)
        real[f"real {n}"] = {"name": f"real {n}", "file": dst.name, "feeds": D.decode_feeds(dst)}
    a = SimpleNamespace(ops_runs=ops_runs, threads=threads, timeout_s=900)

    def run_one(key: str, rnd: int) -> dict:
        client, name = key.split("|")
        return D.ops_child(client, folder, a, 0, [real[f"real {name}"]])

    keys = [f"{c}|{n}" for c in clients for n in contenders]
    runs = C.alternate(keys, repeats, run_one)
    rows = []
    for c in clients:
        ref = statistics.median(r["ms"]["real ours q8"] for r in runs.get(f"{c}|ours q8", [])) if "ours q8" in contenders else None
        anc = statistics.median(r["ms"]["real anchor q8"] for r in runs.get(f"{c}|anchor q8", [])) if "anchor q8" in contenders else None
        for n in contenders:
            ms = [r["ms"][f"real {n}"] for r in runs[f"{c}|{n}"]]
            med = statistics.median(ms)
            rows.append([c, n, C.mb(C.file_bytes(B.contender_file(base, n))), f"{med:.1f} [{min(ms):.1f}–{max(ms):.1f}]",
                         f"{ref / med:.2f}" if ref else "—", f"{anc / med:.2f}" if anc else "—",
                         " / ".join(f"{r['others_cores']:.2f}" for r in runs[f"{c}|{n}"])])
    table = "\n".join(["| client | file | size | session.run ms per decode step, median of rounds [min–max] | "
                        "speed ÷ ours q8 | speed ÷ anchor q8 | others (cores) per round |", "|---|---|---|---|---|---|---|"]
                       + ["| " + " | ".join(r) + " |" for r in rows])
    body = f"""## If-branched q8 (issue 18): one decode step's session.run, Qwen2.5-{size} shape

{C.machine()}

Command: `.venv/bin/python benchmarks/decode_branch.py {" ".join(sys.argv[1:])}`. Each file's whole graph on one
decode step's inputs (past length {D.PAST}, token 42, random keys/values), straight in onnxruntime (wasm: onnxruntime-web
in headless Chromium, {threads} threads; node: onnxruntime-node), each file in a process of its own (two untimed
warm-up sessions, then {ops_runs} timed runs: median), {repeats} alternated rounds; the table gives the median of
the rounds' medians. Files: `branch` = decode-branch (decode: per-tensor DynamicQuantizeLinear form; prefill:
today's per-token form), `branchgqa` = the same with GroupQueryAttention in the decode branch only, `pertensor` =
the decode branch alone as a file (per-tensor everywhere, also prefill), `ours` = today's default q8, `anchor` =
the anchor recipe's q8.

{table}
"""
    C.write_section(f"decode-branch-graph-{size}", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("fp32", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--decode", default="dql", help=f"a pass spec or one of {', '.join(DECODE_SPECS)}")
    b.add_argument("--prefill", default=PREFILL_SPEC)
    b.add_argument("--max-positions", type=int, default=32768)
    b.add_argument("--singles", type=Path, help="also save decode.onnx and prefill.onnx here")
    c = sub.add_parser("check")
    c.add_argument("fp32", type=Path)
    c.add_argument("if_file", type=Path)
    c.add_argument("prefill_file", type=Path)
    c.add_argument("decode_file", type=Path)
    c.add_argument("--new-tokens", type=int, default=12)
    g = sub.add_parser("graph", help="session.run of one decode step per file (wasm / node), alternated")
    g.add_argument("--size", default="0.5b")
    g.add_argument("--contenders", default="branch q8,branchgqa q8,pertensor q8,ours q8,anchor q8")
    g.add_argument("--folder", action="append", default=[], metavar="WHO=SUBDIR")
    g.add_argument("--clients", default="wasm,node")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--ops-runs", type=int, default=9)
    g.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "graph":
        graph_bench(args.size, [x.strip() for x in args.contenders.split(",") if x.strip()],
                    [x.strip() for x in args.clients.split(",") if x.strip()], args.repeats, args.ops_runs, args.threads,
                    dict(f.split("=", 1) for f in args.folder))
        return
    if args.cmd == "build":
        fmt = lambda s: s.replace("{P}", str(args.max_positions))  # noqa: E731
        build(args.fp32, args.out, fmt(DECODE_SPECS.get(args.decode, args.decode)), fmt(args.prefill), args.singles)
    else:
        check_files(args.fp32, args.if_file, args.prefill_file, args.decode_file, args.new_tokens)


if __name__ == "__main__":
    main()
