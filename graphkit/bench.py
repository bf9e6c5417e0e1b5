"""`graphkit bench`: load time, prefill latency, decode speed, peak RSS and size of a decoder with onnxruntime.

Every measurement runs in a fresh child process (``python -m graphkit.bench --worker``), so peak RSS
(VmHWM) belongs to one model alone and no run inherits another's allocator state. A child loads the
session, does one untimed warm-up (full prompt prefill + 2 decode steps), then times one greedy
generation. The parent first runs one untimed child per model (page cache), then ``repeats`` timed
children per model, alternating A, B, A, B, … and reports medians. The code path is the same for
every execution provider.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from graphkit.errors import GraphkitError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "trt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider",
             "migraphx": "MIGraphXExecutionProvider",
             "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider",
             "openvino": "OpenVINOExecutionProvider", "webgpu": "WebGpuExecutionProvider", "qnn": "QNNExecutionProvider",
             "xnnpack": "XnnpackExecutionProvider", "dnnl": "DnnlExecutionProvider", "nnapi": "NnapiExecutionProvider",
             "cann": "CANNExecutionProvider", "azure": "AzureExecutionProvider"}
METRICS = ("load_s", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_bytes", "rss_after_load_bytes")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchSettings:
    provider: str = "cpu"
    prompt_tokens: int = 128
    new_tokens: int = 64
    batch: int = 1
    repeats: int = 3
    threads: int | None = None


def _short_name(full: str) -> str:
    rev = {v: k for k, v in PROVIDERS.items() if k not in ("trt", "directml")}
    return rev.get(full, full)


def resolve_provider(name: str) -> str:
    """'cuda' → 'CUDAExecutionProvider', checked against this onnxruntime build."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    full = PROVIDERS.get(name.lower(), name)
    if full not in available:
        listing = ", ".join(f"{_short_name(p)} ({p})" for p in available)
        raise GraphkitError(f"execution provider '{name}' ({full}) is not available in this onnxruntime build; "
                            f"available: {listing}")
    return full


def resolve_model(path: str | Path, dtype: str | None) -> Path:
    """A .onnx file (``dtype`` ignored), or onnx/model{suffix}.onnx of a Transformers.js folder chosen by ``dtype``."""
    from graphkit.tjs_contract import DTYPE_SUFFIX, split_file_name
    path = Path(path)
    if not path.exists():
        raise GraphkitError(f"{path}: no such file or folder")
    if path.is_file():
        return path
    onnx_dir = path / "onnx" if (path / "onnx").is_dir() else path
    found = {split_file_name(p.name)[1]: p for p in sorted(onnx_dir.glob("*.onnx")) if split_file_name(p.name)[0] == "model"}
    if not found:
        found = {p.name: p for p in sorted(onnx_dir.glob("*.onnx"))}
    if not found:
        raise GraphkitError(f"{path}: no .onnx files in {onnx_dir}")
    if dtype:
        if dtype not in DTYPE_SUFFIX:
            raise GraphkitError(f"unknown --dtype '{dtype}'; one of {', '.join(DTYPE_SUFFIX)}")
        target = onnx_dir / f"model{DTYPE_SUFFIX[dtype]}.onnx"
        if not target.is_file():
            raise GraphkitError(f"{path}: no {target.name} (available dtypes: {', '.join(found)})")
        return target
    if (onnx_dir / "model.onnx").is_file():
        return onnx_dir / "model.onnx"
    if len(found) == 1:
        return next(iter(found.values()))
    raise GraphkitError(f"{path} holds several models; pick one with --dtype ({', '.join(found)})")


def model_size(path: Path) -> int:
    """The .onnx plus every external data file it references."""
    from graphkit.inspect import external_files
    from graphkit.modelio import load_model
    model = load_model(path, load_external=False)
    return path.stat().st_size + sum(e["bytes"] or 0 for e in external_files(model, path.parent))


# ------------------------------------------------------------------------------------ child process

def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    peak = _proc_status("VmHWM")
    if peak is None:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = ru if sys.platform == "darwin" else ru * 1024
    return peak


def _generate(runner, ids, new_tokens: int) -> tuple[float, list[float]]:
    """Prefill ``ids`` then ``new_tokens`` greedy steps; (prefill ms, per-step ms)."""
    import numpy as np
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    out = runner.step(ids, mask, runner.empty_past(ids.shape[0]))
    prefill = (time.perf_counter() - t0) * 1000
    steps = []
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1).reshape(-1, 1).astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        t0 = time.perf_counter()
        out = runner.step(nxt, mask, out.present)
        steps.append((time.perf_counter() - t0) * 1000)
    return prefill, steps


def measure(path: str, provider: str, prompt_tokens: int, new_tokens: int, batch: int,
            threads: int | None = None) -> dict[str, Any]:
    """One load + warm-up + timed generation in this process (call it in a fresh process)."""
    import numpy as np
    from graphkit.ortrun import DecoderRunner, make_session
    t0 = time.perf_counter()
    session = make_session(path, provider=provider, threads=threads)
    load_s = time.perf_counter() - t0
    rss_after_load = _proc_status("VmRSS")
    used = session.get_providers()
    if provider not in used:
        raise GraphkitError(f"onnxruntime did not enable {provider} for {path} (session uses {used})")
    try:
        runner = DecoderRunner(session)
    except ValueError as exc:
        raise GraphkitError(f"{path}: {exc}") from None
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = logits.shape[-1] if logits.shape and isinstance(logits.shape[-1], int) else None
    if vocab is None:
        vocab = runner.step(np.zeros((1, 1), np.int64), np.ones((1, 1), np.int64), runner.empty_past(1)).logits.shape[-1]
    ids = np.random.default_rng(0).integers(0, vocab, (batch, prompt_tokens), dtype=np.int64)
    _generate(runner, ids, min(2, new_tokens))  # warm-up: arena growth, kernel pre-packing
    prefill_ms, steps = _generate(runner, ids, new_tokens)
    decode_ms = statistics.fmean(steps)
    return {"load_s": load_s, "prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms,
            "tokens_per_s": batch * 1000.0 / decode_ms, "peak_rss_bytes": _peak_rss(),
            "rss_after_load_bytes": rss_after_load, "providers": used}


def _worker_main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    try:
        result = measure(**args)
    except GraphkitError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    except Exception as exc:  # onnxruntime failures: one line, no traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(json.dumps({"error": f"{type(exc).__name__}: {first}"}))
        return 2
    print(json.dumps(result))
    return 0


def run_child(path: Path, provider: str, s: BenchSettings) -> dict[str, Any]:
    args = {"path": str(path), "provider": provider, "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
            "batch": s.batch, "threads": s.threads}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "graphkit.bench", "--worker", json.dumps(args)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    data = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or "error" in data or not data:
        detail = data.get("error") or (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise GraphkitError(f"bench of {path} failed: {detail}")
    return data


# ------------------------------------------------------------------------------------------- parent

def _summary(path: Path, size: int, runs: list[dict]) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in runs) for k in METRICS if all(r.get(k) is not None for r in runs)}
    med = {k: round(v, 3) if isinstance(v, float) else v for k, v in med.items()}
    return {"path": str(path), "file_bytes": size, **med,
            "best_decode_ms_per_token": round(min(r["decode_ms_per_token"] for r in runs), 3),
            "providers": runs[0]["providers"], "runs": runs}


def bench(model: str | Path, settings: BenchSettings, vs: str | Path | None = None, dtype: str | None = None,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    step = progress or (lambda msg: None)
    provider = resolve_provider(settings.provider)
    if dtype and not any(Path(p).is_dir() for p in (model, vs) if p is not None):
        raise GraphkitError("--dtype picks onnx/model{suffix}.onnx inside a model folder; no folder was given")
    paths = [resolve_model(model, dtype)] + ([resolve_model(vs, dtype)] if vs is not None else [])
    sizes = [model_size(p) for p in paths]
    labels = "AB"
    for i, p in enumerate(paths):
        step(f"warm-up {labels[i]}: {p}")
        run_child(p, provider, settings)
    runs: list[list[dict]] = [[] for _ in paths]
    for r in range(settings.repeats):
        for i, p in enumerate(paths):
            step(f"run {r + 1}/{settings.repeats} {labels[i]}")
            runs[i].append(run_child(p, provider, settings))
    models = [_summary(p, size, rs) for p, size, rs in zip(paths, sizes, runs)]
    report: dict[str, Any] = {"provider": provider, "available_providers": _available(),
                              "settings": asdict(settings), "models": models, "ratios": None}
    if vs is not None:
        a, b = models
        report["ratios"] = {"definition": "B / A (B = --vs, A = MODEL): below 1 means B is smaller/faster for times "
                                          "and sizes, above 1 means B is faster for tokens_per_s",
                            **{k: round(b[k] / a[k], 4) for k in ("file_bytes",) + METRICS
                               if a.get(k) and b.get(k) is not None}}
    return report


def _available() -> list[str]:
    import onnxruntime as ort
    return ort.get_available_providers()


def render_bench(r: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table
    from graphkit.console import fmt_bytes
    s = r["settings"]
    console.print(f"{r['provider']} · batch {s['batch']} · prompt {s['prompt_tokens']} · {s['new_tokens']} new tokens"
                  f" · {s['repeats']} repeats (medians) · threads {s['threads'] or 'ORT default'}")
    t = Table(title_justify="left")
    t.add_column("metric")
    for i, m in enumerate(r["models"]):
        t.add_column(escape(f"{'AB'[i]}: {Path(m['path']).name}"), justify="right")
    if r["ratios"]:
        t.add_column("B / A", justify="right")
    fmt = {"file_bytes": fmt_bytes, "peak_rss_bytes": fmt_bytes, "rss_after_load_bytes": fmt_bytes,
           "load_s": lambda v: f"{v:.2f} s", "prefill_ms": lambda v: f"{v:.1f} ms",
           "decode_ms_per_token": lambda v: f"{v:.2f} ms", "tokens_per_s": lambda v: f"{v:.1f}"}
    names = {"file_bytes": "file size", "load_s": "load", "prefill_ms": "prefill", "decode_ms_per_token":
             "decode / token", "tokens_per_s": "tokens / s", "peak_rss_bytes": "peak RSS",
             "rss_after_load_bytes": "RSS after load"}
    for key, label in names.items():
        cells = [fmt[key](m[key]) if m.get(key) is not None else "—" for m in r["models"]]
        if r["ratios"]:
            cells.append(f"{r['ratios'][key]:.3f}" if key in r["ratios"] else "—")
        t.add_row(label, *cells)
    console.print(t)
    if r["ratios"]:
        console.print("B / A: below 1 = B smaller or faster (times, sizes); above 1 = B faster (tokens / s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m graphkit.bench --worker '<json args>' (internal; use `graphkit bench`)")
