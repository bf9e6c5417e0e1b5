#!/usr/bin/env python3
"""The calibrated path at the Qwen2.5-1.5B shape: statistics on 64 samples + the GPTQ dtypes, against
onnxruntime's GPTQ (``MatMulNBitsQuantizer`` + ``GPTQWeightOnlyQuantConfig``) on the same fp32 export.

    .venv/bin/python benchmarks/calibration.py [--size 1.5b] [--export PATH] [--samples 64]
        [--ort-timeout 900] [--ort-rss-limit 10e9]

Input: the fp32 export of the random-weight folder of build_random_model.py (``--export``; default: the one
conversion.py leaves in /tmp/gk-bench/qwen2.5-<size>/ours, else ``graphkit convert --dtypes fp32`` makes it).
Calibration data: the shipped example's ``data/train.jsonl`` (the random folder carries the example's
tokenizer), the first ``--samples`` samples.

* ``ours`` (one child process, what ``graphkit convert --calibration train.jsonl`` runs after its export):
  graphkit/calibration.py's statistics, then the q4 and q4f16 pipelines of graphkit/convert.py (GPTQ bodies)
  with their files saved; per step wall time and peak RSS (VmHWM reset per step, as convert reports it),
  plus the time inside GPTQ and inside the diagonal-weighted search (down_proj); the whole child's peak RSS
  (process tree, polled) and CPU. The fp16 / q8 / fp32 steps do not read the statistics; their figures are
  conversion.py's (RESULTS ``conversion-<size>``).
* ``onnxruntime GPTQ`` (one child): the same fp32 export and sequences, block 32 (its default), stopped
  when its process tree passes ``--ort-rss-limit`` or ``--ort-timeout``: the row then says where it was.

The machine is shared: the table prints the load average over each run and the CPU others used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import build_random_model as B  # noqa: E402

DTYPES = ("q4", "q4f16")


def _sequences(hf: str, samples: int) -> list[list[int]]:
    from graphkit.dataset import calibration_sequences
    return calibration_sequences(C.EXAMPLE / "data" / "train.jsonl", Path(hf), limit=samples)


def ours(export: str, hf: str, samples: int, out: str) -> dict:
    """Child: statistics + the calibrated dtypes, as graphkit convert runs them (graphkit/convert.py)."""
    from graphkit import tensors
    from graphkit.calibration import collect_stats
    from graphkit.convert import CALIBRATION_SLOT, PIPELINES
    from graphkit.memory import peak_rss, release_free_memory, reset_peak
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes
    import passes._gptq as G
    import passes._quant as Q
    spent = {"gptq": 0.0, "search": 0.0}

    def timed(fn, key):
        def wrap(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrap
    G.gptq_quantize = timed(G.gptq_quantize, "gptq")
    Q._search_cols = timed(Q._search_cols, "search")
    outd = C.fresh_dir(Path(out))
    res: dict = {"steps": {}}
    seqs = _sequences(hf, samples)
    import resource

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads (onnxruntime's and BLAS's included)
        return ru.ru_utime + ru.ru_stime
    reset_peak()
    t0, c0 = time.perf_counter(), cpu()
    meta = collect_stats(Path(export), seqs, outd / "stats.npz", progress=lambda m: C.log("   " + m))
    res["steps"]["calibration"] = {"seconds": time.perf_counter() - t0, "cpu_s": cpu() - c0, "peak_rss": peak_rss(),
                                   "tokens": meta["tokens"], "sequences": meta["sequences"],
                                   "stats_bytes": (outd / "stats.npz").stat().st_size}
    release_free_memory()
    with tensors.spill_to(outd / ".spill", "benchmark"):
        for d in DTYPES:
            spec = PIPELINES[d].replace(CALIBRATION_SLOT, str(outd / "stats.npz"))
            C.log(f"   {d}: {spec}")
            before = dict(spent)
            reset_peak()
            t0, c0 = time.perf_counter(), cpu()
            model, _ = run_passes(load_model(export, load_external="lazy"), parse_spec(spec))
            files = save_model(model, outd / f"model_{d}.onnx")
            del model
            release_free_memory()
            res["steps"][d] = {"seconds": time.perf_counter() - t0, "cpu_s": cpu() - c0, "peak_rss": peak_rss(),
                               "bytes": sum(f.stat().st_size for f in files),
                               **{k: spent[k] - before[k] for k in spent}}
            for f in files:
                f.unlink()
    shutil.rmtree(outd, ignore_errors=True)
    return res


def ort_gptq(export: str, hf: str, samples: int, out: str) -> dict:
    """Child: onnxruntime's GPTQ on the same export and sequences (block 32, its defaults otherwise)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    reader = C.ort_gptq_reader(export, _sequences(hf, samples))
    t0 = time.perf_counter()
    q = MatMulNBitsQuantizer(export, block_size=32,
                             algo_config=GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=32))
    q.process()
    secs = time.perf_counter() - t0
    q.model.save_model_to_file(out, use_external_data_format=True)
    return {"seconds": secs, "bytes": sum(p.stat().st_size for p in Path(out).parent.iterdir() if p.is_file())}


def _load_sampler(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(5.0):
        samples.append(os.getloadavg()[0])


def run_limited(cmd: list[str], timeout: float, rss_limit: float | None, min_free_disk: float, disk: Path) -> dict:
    """C.run_tree plus an RSS / free-disk guard (the host is shared: a contender is stopped, not the machine)."""
    import subprocess
    out_f = open(C.WORK / f".child-{os.getpid()}.out", "w+")
    err_f = open(C.WORK / f".child-{os.getpid()}.err", "w+")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(C.ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    before = C.proc_cpu_snapshot()
    loads: list[float] = [os.getloadavg()[0]]
    stop = threading.Event()
    th = threading.Thread(target=_load_sampler, args=(stop, loads), daemon=True)
    th.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=C.ROOT)
    peak_sum = peak_one = 0
    stopped = None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        s, one = C._tree_rss(proc.pid)
        peak_sum, peak_one = max(peak_sum, s), max(peak_one, one)
        el = time.perf_counter() - t0
        if stopped is None:
            if el > timeout:
                stopped = f"stopped after {el:.0f} s (time limit), tree RSS {C.mb(s)}"
            elif rss_limit and s > rss_limit:
                stopped = f"stopped at tree RSS {C.mb(s)} (limit {C.mb(rss_limit)}) after {el:.0f} s"
            elif shutil.disk_usage(disk).free < min_free_disk:
                stopped = f"stopped after {el:.0f} s: free disk below {C.mb(min_free_disk)}"
            if stopped:
                C.log(stopped)
                proc.kill()
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    stop.set()
    after = C.proc_cpu_snapshot()
    out_f.seek(0); err_f.seek(0)
    stdout, stderr = out_f.read(), err_f.read()
    out_f.close(); err_f.close()
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "peak_rss": ru.ru_maxrss * 1024, "tree_rss": peak_sum, "others_cores": C.others_cores_between(before, after, wall),
            "load": (min(loads), sum(loads) / len(loads), max(loads)), "stopped": stopped, "stdout": stdout, "stderr": stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1.5b", choices=sorted(B.SIZES))
    ap.add_argument("--export", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--contenders", default="ours,ort")
    ap.add_argument("--ort-timeout", type=float, default=900)
    ap.add_argument("--ort-rss-limit", type=float, default=10e9)
    a = ap.parse_args()
    base = C.WORK / f"qwen2.5-{a.size}"
    hf = B.ensure(a.size)
    export = a.export or base / "ours" / "onnx" / "model.onnx"
    if not export.exists():
        export = base / "fp32" / "onnx" / "model.onnx"
        if not export.exists():
            C.log("fp32 export (graphkit convert --dtypes fp32)")
            r = C.run_cmd([C.PY, "-m", "graphkit", "convert", str(hf), "-o", str(base / "fp32"), "--dtypes", "fp32",
                           "--no-agreement", "--overwrite"], quiet=False)
            if r["rc"] != 0:
                raise SystemExit(r["stderr"][-2000:])
    work = base / "calibration"
    C.fresh_dir(work)
    args = {"export": str(export), "hf": str(hf), "samples": a.samples}
    runs: dict[str, dict] = {}
    for c in [x for x in a.contenders.split(",") if x]:
        C.log(f"{c} on {export}")
        fn = {"ours": "ours", "ort": "ort_gptq"}[c]
        if c == "ours":
            out, src = str(work / "ours"), str(export)
        else:  # onnxruntime writes an augmented copy beside its input: give it a copy in our folder (not hard links:
            # onnx >= 1.19 refuses external data with several links, "a potential hardlink attack")
            (work / "ort" / "src").mkdir(parents=True, exist_ok=True)
            for f in export.parent.glob(export.name + "*"):
                shutil.copyfile(f, work / "ort" / "src" / f.name)
            out, src = str(work / "ort" / "model_q4.onnx"), str(work / "ort" / "src" / export.name)
        r = run_limited([C.PY, __file__, "--child", fn, json.dumps({**args, "export": src, "out": out})],
                        timeout=7200 if c == "ours" else a.ort_timeout,
                        rss_limit=None if c == "ours" else a.ort_rss_limit, min_free_disk=2e9, disk=work)
        r.update(C.json_tail(r["stdout"]))
        if r["rc"] != 0 and not r["stopped"]:
            r["stopped"] = "failed: " + (r["stderr"].strip().splitlines() or ["?"])[-1][:160]
        runs[c] = r
        shutil.rmtree(work / ("ours" if c == "ours" else "ort"), ignore_errors=True)
    (base / f"calibration-runs-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({c: {k: v for k, v in r.items() if k not in ("stdout",)} for c, r in runs.items()}, indent=1))
    rows = []
    if "ours" in runs:
        r = runs["ours"]
        if r.get("steps"):
            st = r["steps"]
            cal = st["calibration"]
            rows.append(["ours: statistics (graphkit/calibration.py)", f"{cal['seconds']:.0f}", C.mb(cal["peak_rss"]),
                         f"CPU {cal.get('cpu_s', float('nan')):.0f} s; {cal['sequences']} samples, {cal['tokens']} tokens; stats file {C.mb(cal['stats_bytes'])}"])
            for d in DTYPES:
                rows.append([f"ours: {d} (GPTQ body)", f"{st[d]['seconds']:.0f}", C.mb(st[d]["peak_rss"]),
                             f"CPU {st[d].get('cpu_s', float('nan')):.0f} s; {C.mb(st[d]['bytes'])}; inside GPTQ {st[d]['gptq']:.1f} s, diagonal-weighted search "
                             f"(down_proj) {st[d]['search']:.1f} s"])
        rows.append(["ours: the whole child", f"{r['wall_s']:.0f}", C.mb(max(r["tree_rss"], r["peak_rss"])),
                     f"CPU {r['user_s'] + r['sys_s']:.0f} s; others {r['others_cores']:.2f} cores; load avg "
                     f"{r['load'][0]:.1f}–{r['load'][2]:.1f} (mean {r['load'][1]:.1f})" + (f"; {r['stopped']}" if r["stopped"] else "")])
    if "ort" in runs:
        r = runs["ort"]
        what = r["stopped"] or f"finished: {C.mb(r.get('bytes', 0))}"
        rows.append(["onnxruntime GPTQ (MatMulNBitsQuantizer, block 32)", f"{r['wall_s']:.0f}", C.mb(max(r["tree_rss"], r["peak_rss"])),
                     f"{what}; CPU {r['user_s'] + r['sys_s']:.0f} s; others {r['others_cores']:.2f} cores; load avg "
                     f"{r['load'][0]:.1f}–{r['load'][2]:.1f} (mean {r['load'][1]:.1f})"])
    body = f"""## Calibrated 4-bit, random-weight Qwen2.5-{a.size} shape: ours vs onnxruntime's GPTQ

{C.machine()}

Command: `.venv/bin/python benchmarks/calibration.py --size {a.size} --samples {a.samples}`.
Input: the fp32 export of the random-weight Qwen2.5-{a.size} shape (`{export}`); calibration: the shipped example's
`data/train.jsonl`, first {a.samples} samples (its tokenizer is the random folder's). Peak RSS: per step VmHWM
(reset per step, as `graphkit convert --json` reports it); "whole child": the larger of the polled RSS sum of its process tree and its ru_maxrss.
fp32 / fp16 / q8 steps do not read the statistics: RESULTS `conversion-{a.size}`.

{C.table(["step", "wall s", "peak RSS", "notes"], rows)}
"""
    C.write_section(f"calibration-{a.size}", body)


if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "--child":
    C.child_main({"ours": ours, "ort_gptq": ort_gptq})
elif __name__ == "__main__":
    main()
