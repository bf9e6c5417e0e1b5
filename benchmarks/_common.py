"""Helpers shared by the benchmark scripts: child processes with wall time + peak RSS, quiet-CPU
waits, the machine description, RESULTS.md sections, and the anchor recipe's steps.

Every contender runs in its own child process; the peak RSS we report is that child's own
(``os.wait4`` rusage ``ru_maxrss``, the same number GNU time prints as "Maximum resident set size",
or VmHWM read inside the child). "others" is the CPU (in cores) that *other* processes used while a
child ran: total busy time from /proc/stat minus the child's own user+sys, divided by wall time. The
machine is shared, so every table prints it; runs above ~0.3 cores were contended.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
WORK = Path(os.environ.get("GK_BENCH_DIR", "/tmp/gk-bench"))
RESULTS = Path(os.environ.get("GK_BENCH_RESULTS", ROOT / "benchmarks" / "RESULTS.md"))
EXAMPLE = Path(os.environ.get("GK_BENCH_EXAMPLE", ROOT / "graphkit" / "examples" / "epicrisis-tiny"))
HZ = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ CPU and processes

def _busy_jiffies() -> int:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def busy_cores(seconds: float = 1.0) -> float:
    b0, t0 = _busy_jiffies(), time.monotonic()
    time.sleep(seconds)
    return (_busy_jiffies() - b0) / HZ / (time.monotonic() - t0)


def wait_quiet(threshold: float | None = None, max_wait: float | None = None) -> float:
    """Wait (at most ``max_wait`` s, env GK_BENCH_QUIET_WAIT, default 120) until the machine uses fewer
    than ``threshold`` cores (env GK_BENCH_QUIET_CORES, default 0.3); returns the last load."""
    threshold = float(os.environ.get("GK_BENCH_QUIET_CORES", 0.3)) if threshold is None else threshold
    max_wait = float(os.environ.get("GK_BENCH_QUIET_WAIT", 120)) if max_wait is None else max_wait
    t_end = time.monotonic() + max_wait
    while True:
        load = busy_cores(1.0)
        if load < threshold or time.monotonic() > t_end:
            return load


def run_cmd(cmd: list[str], *, env: dict | None = None, quiet: bool = True, timeout: float | None = None) -> dict:
    """Run one child; wall s, user/sys s, peak RSS bytes (ru_maxrss), others' CPU, exit code, output."""
    if quiet:
        wait_quiet()
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.update(env or {})
    out_f = open(WORK / f".child-{os.getpid()}.out", "w+")
    err_f = open(WORK / f".child-{os.getpid()}.err", "w+")
    b0, t0 = _busy_jiffies(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=full_env, cwd=ROOT)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline and time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    busy = (_busy_jiffies() - b0) / HZ
    proc.returncode = os.waitstatus_to_exitcode(status)
    out_f.seek(0); err_f.seek(0)
    stdout, stderr = out_f.read(), err_f.read()
    out_f.close(); err_f.close()
    cpu = ru.ru_utime + ru.ru_stime
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "peak_rss": ru.ru_maxrss * 1024, "others_cores": max(0.0, (busy - cpu) / wall),
            "stdout": stdout, "stderr": stderr}


def json_tail(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def run_child(script: str, name: str, args: dict, **kw) -> dict:
    """``python benchmarks/SCRIPT --child NAME JSON``: the child's JSON result + run_cmd's measures."""
    r = run_cmd([PY, str(ROOT / "benchmarks" / script), "--child", name, json.dumps(args)], **kw)
    res = json_tail(r["stdout"])
    if r["rc"] != 0 or "error" in res or not res:
        tail = "\n".join(r["stderr"].strip().splitlines()[-15:])
        raise RuntimeError(f"child {script} {name} {args} failed (rc {r['rc']}): {res.get('error', '')}\n{tail}")
    return {**r, **res}


def child_main(funcs: dict[str, Callable[..., dict]]) -> None:
    """In a child: call funcs[NAME](**JSON), print its dict (+ VmHWM) as the last JSON line."""
    name, args = sys.argv[2], json.loads(sys.argv[3])
    res = funcs[name](**args)
    res["vm_hwm"] = proc_status("VmHWM")
    print(json.dumps(res), flush=True)


def proc_status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def alternate(contenders: list[str], repeats: int, run_one: Callable[[str, int], dict]) -> dict[str, list[dict]]:
    """Round-robin: A, B, C, A, B, C, … (the order rotates each round so no one always goes first)."""
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(repeats):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for c in order:
            log(f"round {r + 1}/{repeats}: {c}")
            runs[c].append(run_one(c, r))
    return runs


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# ------------------------------------------------------------------------------ formatting

def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "—"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "onnx", "onnxruntime", "torch", "transformers", "onnxruntime_genai"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


def machine() -> str:
    cpu = "?"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags)
    with open("/proc/meminfo") as fh:
        ram = int(fh.readline().split()[1]) * 1024
    v = ", ".join(f"{k} {val}" for k, val in versions().items())
    return (f"Machine: {cpu} ({isa}), {os.cpu_count()} cores, {ram / 2**30:.1f} GiB RAM, "
            f"Linux {platform.release()}; {v}. Date: {datetime.date.today().isoformat()}. "
            f"Shared machine: other agents' processes may run; 'others' columns show their CPU use.")


RESULTS_INTRO = ("# graphkit benchmarks: results\n\nWritten by the scripts in `benchmarks/` (see `benchmarks/README.md`). "
                 "One section per measurement, the newest run of it: a rerun replaces its section and moves the old "
                 "one to `benchmarks/history/YYYY-MM.md` (the month it ran). Ratios are ours / anchor (below 1 = ours "
                 "smaller or faster for times and sizes), measured within one section's run only.\n")


def _sections(text: str) -> list[tuple[str, int, int]]:
    """(key, start, end) of every ``<!-- BEGIN key -->`` … ``<!-- END key -->`` block, in file order."""
    out = []
    for m in re.finditer(r"<!-- BEGIN (\S+) -->", text):
        end = f"<!-- END {m.group(1)} -->"
        stop = text.find(end, m.end())
        if stop >= 0:
            out.append((m.group(1), m.start(), stop + len(end)))
    return out


def _heading(block: str) -> str | None:
    m = re.search(r"^## (.+)$", block, re.M)
    return m.group(1).strip() if m else None


def archive_section(block: str, results: Path | None = None) -> Path:
    """Append a replaced section to ``history/YYYY-MM.md`` beside RESULTS.md (the month in its ``Date:`` line)."""
    results = results or RESULTS
    m = re.search(r"Date: (\d{4})-(\d{2})", block)
    month = f"{m.group(1)}-{m.group(2)}" if m else datetime.date.today().strftime("%Y-%m")
    path = results.parent / "history" / f"{month}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "" if path.exists() else (
        f"# graphkit benchmarks: earlier results, {month}\n\nSections of `RESULTS.md` that a later run of the same "
        "measurement replaced, in the order they were replaced. Ratios compare only within a section.\n")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{head}\n<!-- replaced {datetime.date.today().isoformat()} -->\n{block.strip()}\n")
    return path


def write_section(key: str, body: str) -> None:
    """Replace the ``key`` section of RESULTS.md (the old one moves to ``history/``), or append it.

    ``key`` names the measurement (script, size and group), so a rerun replaces its own section and
    nobody else's. A heading that another section already has gets `` (key)`` appended: every heading
    in RESULTS.md names one measurement."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    text = RESULTS.read_text() if RESULTS.exists() else RESULTS_INTRO
    body = body.strip()
    others = {_heading(text[a:b]) for k, a, b in _sections(text) if k != key}
    heading = _heading(body)
    if heading and heading in others:
        body = body.replace(f"## {heading}", f"## {heading} ({key})", 1)
    block = f"{begin}\n{body}\n{end}"
    old = next(((a, b) for k, a, b in _sections(text) if k == key), None)
    if old:
        archived = archive_section(text[old[0]:old[1]])
        text = text[:old[0]] + block + text[old[1]:]
        log(f"moved the previous '{key}' section to {archived}")
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    log(f"wrote section '{key}' of {RESULTS}")


def file_bytes(path: Path) -> int:
    """An .onnx file plus its external data files (ours: X.onnx_data*, ORT/genai: named in the model)."""
    from graphkit.bench import model_size
    return model_size(Path(path))


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------ the anchor recipe

def ort_gptq_reader(model_path: str, seqs: list[list[int]]):
    """onnxruntime's ``CalibrationDataReader`` for its GPTQ on our decoder export: one prefill feed per sequence
    (batch 1, empty KV cache, ``num_logits_to_keep`` = 0 = every row where convert's default export has it). Built
    from the graph's declared inputs, without a session (a 1.5B fp32 session would hold 6 GB just to list them)."""
    import numpy as np
    import onnx
    from onnx import helper
    from onnxruntime.quantization import CalibrationDataReader
    inputs = {i.name: i.type.tensor_type for i in onnx.load(model_path, load_external_data=False).graph.input}
    feeds = []
    for s in seqs:
        ids = np.array([s], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(len(s), dtype=np.int64)[None]
        if "num_logits_to_keep" in inputs:
            feed["num_logits_to_keep"] = np.array(0, np.int64)
        for name, t in inputs.items():
            if name.startswith("past_"):  # [batch 1, heads, 0 past positions, head size]
                shape = [d.dim_value if d.HasField("dim_value") else (1 if k == 0 else 0) for k, d in enumerate(t.shape.dim)]
                feed[name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(t.elem_type))
        feeds.append(feed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(feeds)

        def __deepcopy__(self, memo):  # the quantizer deep-copies its config: share the feeds, not copy them
            return Reader()
    return Reader()


def anchor_export(model_dir: str, out: str, adapter: str | None = None) -> dict:
    """Legacy ``torch.onnx.export(dynamo=False, opset 17, constant folding)`` of the (merged) model,
    then ``onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True)`` if > 2 GB."""
    import onnx
    import tempfile
    from graphkit.tracing import export_torchscript, flat_cache_wrapper, sample_inputs
    from graphkit.hfmodel import load_causal_lm
    import torch
    model, _ = load_causal_lm(Path(model_dir), Path(adapter) if adapter else None)
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_p.parent) as tmp, torch.no_grad():
        raw = Path(tmp) / "model.onnx"
        export_torchscript(flat_cache_wrapper(model), sample_inputs(model.config), raw, model.config.num_hidden_layers)
        del model
        m = onnx.load(str(raw))
        big = sum(f.stat().st_size for f in Path(tmp).iterdir()) > 2**31 - 2**26
        onnx.save_model(m, out, save_as_external_data=big, all_tensors_to_one_file=True,
                        location=out_p.name + "_data")
    return {}


def merged_hf_folder(model_dir: str, adapter: str, out: str) -> dict:
    """The base model with the adapter merged (peft ``merge_and_unload``), saved as a Hugging Face folder with the
    base's tokenizer files: the input other tools (onnxruntime-genai's builder) take."""
    import shutil
    from graphkit.hfmodel import load_causal_lm
    model, _ = load_causal_lm(Path(model_dir), Path(adapter))
    fresh_dir(Path(out))
    model.save_pretrained(out)
    for f in Path(model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, Path(out) / f.name)
    return {}


def anchor_q4(src: str, out: str, accuracy_level: int | None = None) -> dict:
    """``MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True).process()`` then save."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    kw = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True, **kw)
    q.process()
    m = q.model.model
    big = m.ByteSize() > 2**31 - 2**26
    onnx.save_model(m, out, save_as_external_data=big, all_tensors_to_one_file=True, location=Path(out).name + "_data")
    return {}


def anchor_f16(src: str, out: str) -> dict:
    """``convert_float_to_float16(model, keep_io_types=True)`` then save (path form above 2 GB)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    big_in = file_bytes(Path(src)) > 2**31 - 2**26
    m = convert_float_to_float16(src if big_in else onnx.load(src), keep_io_types=True)
    big = big_in and m.ByteSize() > 2**31 - 2**26
    onnx.save_model(m, out, save_as_external_data=big, all_tensors_to_one_file=True, location=Path(out).name + "_data")
    return {}


def anchor_q8(src: str, out: str, weight_type: str = "QUInt8") -> dict:
    """optimum-style dynamic int8: ``quantize_dynamic(per_channel=False, reduce_range=False)``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, out, per_channel=False, reduce_range=False, weight_type=getattr(QuantType, weight_type))
    return {}


ANCHOR_STEPS = {"anchor_export": anchor_export, "anchor_q4": anchor_q4, "anchor_f16": anchor_f16, "anchor_q8": anchor_q8}


# ------------------------------------------------------------------------------ added for browser.py

def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """The benchmark prompt: ``n`` ids drawn like graphkit.bench (``numpy default_rng(seed)``, batch 1)."""
    import numpy as np
    return [int(x) for x in np.random.default_rng(seed).integers(0, vocab, (1, n), dtype=np.int64)[0]]


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median [min–max]`` of a list (``—`` when empty)."""
    if not values:
        return "—"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (copy across file systems); replaces ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)



def proc_cpu_snapshot() -> dict[int, float]:
    """CPU seconds (user + sys) of every process now, by pid (from /proc/PID/stat)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(f[11]) + int(f[12])) / HZ
            except (OSError, IndexError, ValueError):
                pass
    return out


def others_cores_between(before: dict[int, float], after: dict[int, float], wall: float) -> float:
    """CPU (cores) used during ``wall`` seconds by processes that were already running before the child started and
    are still alive at the end, other than this process. Processes born in between are left out: they are the
    child's own tree (a browser's renderer can outlive the driver that started it by a moment, reparented, and its
    CPU is the measurement itself: counting it made wasm runs report ~1.6 "other" cores on an idle host); other
    agents' processes started during the child are missed too."""
    me = os.getpid()
    used = sum(after[p] - before[p] for p in after if p != me and p in before)
    return max(0.0, used / wall) if wall > 0 else 0.0



def _tree_rss(root: int) -> tuple[int, int]:
    """(sum, largest) RSS bytes of ``root`` and all its descendants now (from /proc)."""
    parent, rss = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
                parent[int(d)], rss[int(d)] = int(f[1]), int(f[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree and p not in tree}
        tree |= new
        grew = bool(new)
    sizes = [rss.get(p, 0) for p in tree]
    return sum(sizes), max(sizes, default=0)


def run_tree(cmd: list[str], timeout: float | None = None, poll_s: float = 0.5) -> dict:
    """Run one child (no quiet wait); besides run_cmd's fields, poll the RSS of its whole process tree (a browser's
    renderer included, which ru_maxrss never sees): ``tree_rss`` = peak of the sum, ``tree_rss_max1`` = peak of the
    largest single process. Others' CPU from /proc snapshots (see others_cores_between)."""
    out_f = open(WORK / f".child-{os.getpid()}.out", "w+")
    err_f = open(WORK / f".child-{os.getpid()}.err", "w+")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    before = proc_cpu_snapshot()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=ROOT)
    deadline = None if timeout is None else time.monotonic() + timeout
    peak_sum = peak_one = 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        s, one = _tree_rss(proc.pid)
        peak_sum, peak_one = max(peak_sum, s), max(peak_one, one)
        if deadline and time.monotonic() > deadline:
            proc.kill()
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    after = proc_cpu_snapshot()
    out_f.seek(0); err_f.seek(0)
    stdout, stderr = out_f.read(), err_f.read()
    out_f.close(); err_f.close()
    return {"cmd": cmd, "rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "peak_rss": ru.ru_maxrss * 1024,
            "tree_rss": peak_sum, "tree_rss_max1": peak_one, "others_cores": others_cores_between(before, after, wall),
            "stdout": stdout, "stderr": stderr}


if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "--child":
    child_main({**ANCHOR_STEPS, "merged_hf_folder": merged_hf_folder})


def warm_page_cache(path: Path, block: int = 64 * 2**20) -> None:
    """Read a file once so it sits in the page cache, in blocks: reading it whole into one buffer
    would raise this process's peak RSS, which every child forked afterwards inherits as its own
    starting ``ru_maxrss`` (Linux copies the high-water mark on fork), inflating their peaks."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(block):
            pass
