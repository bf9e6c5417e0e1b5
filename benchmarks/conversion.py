#!/usr/bin/env python3
"""Whole conversion: `graphkit convert` vs the anchor recipe vs onnxruntime-genai's builder.

    .venv/bin/python benchmarks/conversion.py [--size 0.5b|1.5b] [--repeats 3] [--contenders ours,ours3,anchor,genai]

Input: the random-weight Qwen2.5-<size> folder of build_random_model.py (built first if missing).
Contenders, alternating round-robin, each measured as wall time and the child's peak RSS (wait4
ru_maxrss = GNU time's "Maximum resident set size"):

* ``ours``   `graphkit convert HF -o OUT --no-agreement` (all five dtypes: fp32 fp16 q4 q4f16 q8);
* ``ours3``  the same with ``--dtypes fp32,q4,q4f16``: the anchor's output set, for a like-for-like ratio;
* optional: ``ours-fuse`` (``--fuse``: fused RMSNorm/rotary/GQA contrib ops, all five dtypes),
  ``ours-fp32`` (``--dtypes fp32``: the export alone) and ``ours-ts`` (the same with
  ``--exporter torchscript``): diagnostics for where our time and memory go; ``ours-data``
  (``--calibration`` the example's train.jsonl, 64 samples: the calibrated path on the user's data, all five dtypes);
  ``ours-w4`` (``--dtypes w4``: the opt-in 4-bit download, not a default dtype);
* ``anchor`` the recipe Transformers.js users follow, three processes (times add up, peak = max):
  legacy ``torch.onnx.export(dynamo=False, opset 17)`` + one external data file when > 2 GB;
  ``MatMulNBitsQuantizer(block_size=32, is_symmetric=True)``; ``convert_float_to_float16(keep_io_types=True)``;
* ``genai``  ``python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu`` (one int4 model
  with fused GQA attention; skipped when onnxruntime_genai is not importable).

The last run's outputs stay in /tmp/gk-bench/qwen2.5-<size>/{ours,ours-fuse,anchor,genai-int4} for
runtime.py; every run's raw measurements go to conversion-runs-<date>.json there.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import build_random_model as B  # noqa: E402

ALL_DTYPES = "fp32,fp16,q4,q4f16,q8"
# our variants: name → (dtypes, extra CLI args, output folder, label)
OURS = {"ours": (ALL_DTYPES, [], "ours", "(all five dtypes)"),
        "ours3": ("fp32,q4,q4f16", [], "ours3", "--dtypes fp32,q4,q4f16"),
        "ours-data": (ALL_DTYPES, ["--calibration", str(C.EXAMPLE / "data" / "train.jsonl")], "ours-data",
                      "--calibration train.jsonl (the example's fine-tuning data, 64 samples; all five dtypes)"),
        "ours-fuse": (ALL_DTYPES, ["--fuse"], "ours-fuse", "--fuse (all five dtypes)"),
        "ours-w4": ("w4", [], "ours-w4", "--dtypes w4 (the 4-bit download wasm runs as int8, docs/w4.md)"),
        "ours-fp32": ("fp32", [], "ours-fp32", "--dtypes fp32 (the export alone)"),
        "ours-nostream": (ALL_DTYPES, ["--no-stream"], "ours-nostream", "--no-stream (in-memory export, all five dtypes)"),
        "ours-ts": ("fp32", ["--exporter", "torchscript"], "ours-ts", "--dtypes fp32 --exporter torchscript")}
ANCHOR_FILES = {"fp32": "model.onnx", "q4": "model_q4.onnx", "q4f16": "model_q4f16.onnx"}


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
        return True
    except ImportError:
        return False


def run_ours(hf: Path, out: Path, dtypes: str, extra: list[str]) -> dict:
    r = C.run_cmd([C.PY, "-m", "graphkit", "convert", str(hf), "-o", str(out), "--dtypes", dtypes,
                   "--no-agreement", "--overwrite", "--json", *extra])
    if r["rc"] != 0:
        raise RuntimeError(f"graphkit convert failed: {r['stderr'][-3000:]}")
    summary = json.loads(r["stdout"][r["stdout"].index("{"):])
    r["files"] = {d["dtype"]: d["bytes"] for d in summary["dtypes"]}
    r["steps"] = {d["dtype"]: d["seconds"] for d in summary["dtypes"]}
    if all(d.get("peak_rss") for d in summary["dtypes"]):
        r["step_rss"] = {d["dtype"]: d["peak_rss"] for d in summary["dtypes"]}
    r["pipelines"] = {d["dtype"]: d.get("pipeline") for d in summary["dtypes"]}  # what ran (defaults, budget plan)
    cal = summary.get("calibration")
    if cal and cal.get("seconds") is not None:  # the statistics pass between the export and the 4-bit dtypes
        r["steps"] = {"calibration": cal["seconds"], **r["steps"]}
        if "step_rss" in r:
            r["step_rss"] = {"calibration": cal.get("peak_rss") or 0, **r["step_rss"]}
        r["calibration"] = {k: cal.get(k) for k in ("source", "sequences", "tokens")}
    return r


def run_anchor(hf: Path, out: Path) -> dict:
    C.fresh_dir(out)
    steps = [("export fp32", "anchor_export", {"model_dir": str(hf), "out": str(out / ANCHOR_FILES["fp32"])}),
             ("q4 (MatMulNBitsQuantizer)", "anchor_q4", {"src": str(out / ANCHOR_FILES["fp32"]), "out": str(out / ANCHOR_FILES["q4"])}),
             ("q4f16 (convert_float_to_float16)", "anchor_f16", {"src": str(out / ANCHOR_FILES["q4"]), "out": str(out / ANCHOR_FILES["q4f16"])})]
    parts = {name: C.run_child("_common.py", fn, args) for name, fn, args in steps}
    total = {k: sum(p[k] for p in parts.values()) for k in ("wall_s", "user_s", "sys_s")}
    return {**total, "peak_rss": max(p["peak_rss"] for p in parts.values()),
            "others_cores": max(p["others_cores"] for p in parts.values()),
            "steps": {k: p["wall_s"] for k, p in parts.items()}, "step_rss": {k: p["peak_rss"] for k, p in parts.items()},
            "files": {d: C.file_bytes(out / f) for d, f in ANCHOR_FILES.items()}}


def run_genai(hf: Path, out: Path) -> dict:
    C.fresh_dir(out)
    cache = C.fresh_dir(out.with_name("genai-cache"))
    r = C.run_cmd([C.PY, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                   "-p", "int4", "-e", "cpu", "-c", str(cache)])
    shutil.rmtree(cache, ignore_errors=True)
    if r["rc"] != 0:
        raise RuntimeError(f"genai builder failed: {r['stderr'][-3000:]}")
    r["files"] = {"int4": C.file_bytes(out / "model.onnx")}
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b", choices=sorted(B.SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", default="ours,ours3,anchor,genai",
                    help="any of ours, ours3, ours-data, ours-fuse, ours-w4, ours-fp32, ours-ts, ours-nostream, anchor, genai (another set: its own section)")
    ap.add_argument("--from-runs", type=Path, default=None,
                    help="re-render the section from a stored conversion-runs-*.json of the same --size/--contenders")
    a = ap.parse_args()
    base = C.WORK / f"qwen2.5-{a.size}"
    base.mkdir(parents=True, exist_ok=True)
    hf = B.ensure(a.size)
    build = json.loads((hf / "build.json").read_text())
    contenders = [c for c in a.contenders.split(",") if c]
    notes = []
    if "genai" in contenders and not genai_available():
        contenders.remove("genai")
        notes.append("onnxruntime-genai is not importable here (`pip install onnxruntime-genai`), so its builder was skipped.")
    for f in hf.glob("*.safetensors"):  # page cache: every contender starts from a warm file
        C.warm_page_cache(f)
    outs = {c: base / OURS[c][2] for c in OURS} | {"anchor": base / "anchor", "genai": base / "genai-int4"}
    fns = {c: (lambda c=c: run_ours(hf, outs[c], OURS[c][0], OURS[c][1])) for c in OURS}
    fns |= {"anchor": lambda: run_anchor(hf, outs["anchor"]), "genai": lambda: run_genai(hf, outs["genai"])}
    if a.from_runs:
        runs = json.loads(a.from_runs.read_text())
        contenders = list(runs)
    else:
        runs = C.alternate(contenders, a.repeats, lambda c, _r: fns[c]())
    for rs in runs.values():
        for r in rs:
            # convert resets VmHWM before each step (/proc/self/clear_refs), which also resets the kernel's hiwater
            # that wait4's ru_maxrss reports: the child's own figure is then only its LAST step's peak. The run's peak
            # is the largest of them all (the calibration step's included).
            r["peak_rss"] = max([r["peak_rss"], *(r.get("step_rss") or {}).values()])
    if not a.from_runs:
        (base / f"conversion-runs-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
            json.dumps({c: [{k: v for k, v in r.items() if k not in ("stdout", "stderr")} for r in rs] for c, rs in runs.items()}, indent=1))
    for c in ("ours3", "ours-data", "ours-w4", "ours-fp32", "ours-ts", "ours-nostream"):  # same files as ours (or diagnostics): keep the disk free
        shutil.rmtree(outs[c], ignore_errors=True)

    labels = {c: f"ours: `graphkit convert` {OURS[c][3]}" for c in OURS}
    labels |= {"anchor": "anchor recipe (export → q4 → q4f16)", "genai": "onnxruntime-genai builder `-p int4 -e cpu`"}
    ref = runs.get("anchor")
    rows = []
    for c, rs in runs.items():
        wall, rss = C.med(rs, "wall_s"), C.med(rs, "peak_rss")
        cpu = C.med(rs, "user_s") + C.med(rs, "sys_s")
        files = "; ".join(", ".join(f"{d} {C.mb(b)}" for d, b in r["files"].items()) for r in rs
                          if r is rs[-1] or r["files"] != rs[-1]["files"]) + ("" if all(r["files"] == rs[-1]["files"] for r in rs)
                                                                           else " (**outputs differed between runs**)")
        rows.append([labels[c], f"{wall:.1f}", f"{cpu:.1f}", C.mb(rss),
                     C.ratio(wall, C.med(ref, "wall_s")) if ref else "—", C.ratio(rss, C.med(ref, "peak_rss")) if ref else "—",
                     files, " / ".join(f"{r['others_cores']:.2f}" for r in rs)])
    head = ["contender", "wall s (median)", "user+sys s", "peak RSS (median)", "wall / anchor", "RSS / anchor",
            "outputs", "others (cores, per run)"]
    step_rows = []
    for c, rs in runs.items():
        for step in rs[0].get("steps", {}):
            vals = sorted(r["steps"][step] for r in rs)
            rss = f" (peak {C.mb(sorted(r['step_rss'][step] for r in rs)[len(rs) // 2])})" if "step_rss" in rs[0] else ""
            step_rows.append([c, step, f"{vals[len(vals) // 2]:.1f}{rss}"])
    from graphkit.convert import PIPELINES
    def short(spec: str) -> str:  # the budget's include/exclude lists name hundreds of MatMuls at 1.5B: their count
        return re.sub(r"(include|exclude)=([^,)]*)", lambda m: f"{m[1]}=<{m[2].count('|') + 1} MatMuls>", spec)

    ran = ""
    for c, rs in runs.items():  # the pipelines convert really ran (its defaults, the size budget's plan), as it records them
        if rs[-1].get("pipelines"):
            cal = rs[-1].get("calibration")
            ran += (f"{labels[c]} ran: " + "; ".join(f"{d}: `{short(s) if s else 'export'}`" for d, s in rs[-1]["pipelines"].items())
                    + (f"; calibration: {cal['source']}, {cal['sequences']} sequences, {cal['tokens']} tokens" if cal else "")
                    + ".\n")
    ran = ran or "Our pipelines: " + "; ".join(f"{d}: `{s or 'export'}`" for d, s in PIPELINES.items()) + ". "
    default = a.contenders == ap.get_default("contenders")
    body = f"""## Conversion, random-weight Qwen2.5-{a.size} shape{'' if default else ': ' + ', '.join(contenders)}

{C.machine()}

Command: `.venv/bin/python benchmarks/conversion.py --size {a.size} --repeats {a.repeats} --contenders {','.join(contenders)}`.
Model: `benchmarks/build_random_model.py --size {a.size}`: {build['params']:,} parameters, fp32 safetensors {C.mb(build['safetensors_bytes'])}, built in {build['seconds']} s (peak RSS {C.mb(build['peak_rss'])}); random weights and the shipped example's 2048-token tokenizer (vocab mismatch: irrelevant for speed/size).
Medians of {a.repeats} runs, contenders alternating round-robin, each a fresh process (the anchor: three processes, times summed, peak = the largest); peak RSS: the larger of the child's wait4 ru_maxrss and convert's per-step peaks (convert resets the high-water mark before each step, so ru_maxrss alone is its last step's).
{ran}{' '.join(notes)}

{C.table(head, rows)}

Per step (median s; ours: graphkit convert's own per-dtype timing and peak RSS of that step (VmHWM reset before each step), fp32 includes the export):

{C.table(["contender", "step", "seconds"], step_rows)}
"""
    C.write_section(f"conversion-{a.size}" + ("" if default else "-" + "+".join(contenders)), body)


if __name__ == "__main__":
    main()
