"""Run the real client, Transformers.js, on a converted folder (Node or headless Chromium) and
compare its greedy tokens with our Python onnxruntime loop on the same file.

Uses the pinned harness in ``tests/js`` (installed by ``scripts/setup.sh``).
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphkit.errors import GraphkitError
from graphkit.ortrun import DecoderRunner
from graphkit.tjs_contract import variant_path

HARNESS = Path(__file__).resolve().parents[1] / "tests" / "js"
# Where the Python top-2 logit margin is below this, a GPU kernel may legitimately pick the other
# token (different rounding); divergence there is reported, not failed.
NEAR_TIE = 0.05


def run_client(folder: Path, dtype: str | list[str], messages: list, new_tokens: int, client: str = "node",
               device: str | None = None, screenshot: Path | None = None, timeout_s: int = 600,
               threads: int | None = None, adapter: str = "default") -> dict:
    """Greedy generation in Transformers.js. A list of dtypes runs them all in one process/page (the result then
    has ``by_dtype``). ``adapter="lavapipe"`` (device webgpu): Mesa lavapipe from build/lavapipe
    (tests/js/webgpu_route.mjs); the harness fails unless the adapter has shader-f16 and subgroup size 8."""
    script = HARNESS / ("generate_node.mjs" if client == "node" else "generate_browser.mjs")
    if not isinstance(dtype, str):
        dtype = ",".join(dtype)
    if not (HARNESS / "node_modules" / "@huggingface" / "transformers").is_dir():
        raise GraphkitError(f"{HARNESS}: Transformers.js is not installed; run `bash scripts/setup.sh`")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump([{"messages": m} for m in messages], fh, ensure_ascii=False)
        prompts = fh.name
    cmd = ["node", str(script), "--model-dir", str(Path(folder).resolve()), "--prompts", prompts, "--dtype", dtype,
           "--max-new-tokens", str(new_tokens), "--device", device or ("cpu" if client == "node" else "wasm")]
    if client != "node":
        cmd += ["--timeout-s", str(timeout_s - 20)]
        if screenshot:
            cmd += ["--screenshot", str(screenshot)]
    if threads:
        cmd += ["--threads", str(threads)]
    if adapter != "default":
        cmd += ["--adapter", adapter]
    return _run_harness(cmd, Path(prompts), timeout_s, f"Transformers.js ({client}, {dtype})")


def client_dir(client: str | None) -> Path:
    """The folder of a Transformers.js client: None/"js" = the pinned harness (tests/js), else tests/<client>
    (tests/js-tjs3: 3.8.1, tests/js-tjs4-latest: the newest 4.x; graphkit/runtimes.py RUNTIMES[...].clients)."""
    folder = HARNESS if client in (None, "js") else HARNESS.parent / client
    if not (folder / "node_modules" / "@huggingface" / "transformers").is_dir():
        raise GraphkitError(f"{folder}: Transformers.js is not installed; run `bash scripts/setup.sh`")
    return folder


def run_matrix(client: str | None, jobs: list[tuple[Path, str]], messages: list, new_tokens: int,
               timeout_s: int = 900) -> dict:
    """Greedy generation for every (folder, dtype) in ``jobs`` in one Node process of ``client``'s Transformers.js
    (tests/js/generate_matrix.mjs). Returns ``{transformers_version, onnxruntime_node_version, runs: [...]}``; a job
    that fails (e.g. a file the runtime cannot load) has ``error`` instead of ``results``."""
    import os
    folder = client_dir(client)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump([{"messages": m} for m in messages], fh, ensure_ascii=False)
        prompts = Path(fh.name)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump([{"model_dir": str(Path(d).resolve()), "dtype": t} for d, t in jobs], fh)
        jobs_file = Path(fh.name)
    env = dict(os.environ)
    env.pop("GRAPHKIT_TJS_CLIENT", None)
    if folder != HARNESS:
        env["GRAPHKIT_TJS_CLIENT"] = str(folder)
    cmd = ["node", str(HARNESS / "generate_matrix.mjs"), "--jobs", str(jobs_file), "--prompts", str(prompts),
           "--max-new-tokens", str(new_tokens)]
    try:
        return _run_harness(cmd, prompts, timeout_s, f"Transformers.js matrix ({folder.name})", env=env)
    finally:
        jobs_file.unlink(missing_ok=True)


def _run_harness(cmd: list[str], input_file: Path, timeout_s: int, label: str, env: dict | None = None) -> dict:
    """Run one harness script (it prints exactly one JSON object), delete its input file, return the object
    with ``returncode`` added."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    finally:
        input_file.unlink(missing_ok=True)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise GraphkitError(f"{label} printed no result (exit {res.returncode}): {res.stderr.strip()[-500:]}") from None
    data["returncode"] = res.returncode
    return data


@dataclass
class TokenComparison:
    prompt: int
    equal: bool
    first_divergence: int | None
    margin_at_divergence: float | None
    near_tie: bool

    @property
    def acceptable(self) -> bool:
        return self.equal or self.near_tie


def python_reference(path: Path, prompt_ids: list[list[int]], new_tokens: int, eos: list[int]):
    runner = DecoderRunner.from_file(path)
    out = []
    for ids in prompt_ids:
        gen, logits = runner.greedy(ids, new_tokens, suppress=tuple(eos))
        margins = []
        for step in logits:
            s = step.copy()
            s[list(eos)] = -np.inf
            top2 = np.partition(s, -2)[-2:]
            margins.append(float(top2[1] - top2[0]))
        out.append((gen, margins))
    return out


def compare_tokens(reference, client_results: list[dict]) -> list[TokenComparison]:
    comps = []
    for i, ((ref_ids, margins), res) in enumerate(zip(reference, client_results)):
        got = res["new_ids"]
        div = next((k for k, (a, b) in enumerate(zip(ref_ids, got)) if a != b), None)
        if div is None and len(got) != len(ref_ids):
            div = min(len(got), len(ref_ids))
        margin = margins[div] if div is not None and div < len(margins) else None
        comps.append(TokenComparison(i, div is None, div, margin, margin is not None and margin < NEAR_TIE))
    return comps


def browser_matrix(folder: Path, dtypes: list[str], devices: list[str], messages: list, prompt_ids: list[list[int]],
                   new_tokens: int, eos: list[int], screenshots: Path | None = None, progress=None) -> list[dict]:
    """Run each dtype on each browser device; one row per (device, dtype): pass / fail / skipped. A device
    ``webgpu:lavapipe`` runs WebGPU on Mesa lavapipe (shader-f16, subgroup size 8; ``run_client``)."""
    step = progress or (lambda msg: None)
    rows = []
    for device_spec in devices:
        device, _, adapter = device_spec.partition(":")
        adapter = adapter or "default"
        for dtype in dtypes:
            if not variant_path(folder, dtype).exists():
                continue
            step(f"chromium {device_spec} {dtype}")
            shot = screenshots / f"chromium-{device}-{adapter}-{dtype}.png" if screenshots else None
            row = {"device": device_spec, "dtype": dtype, "status": "fail", "detail": ""}
            try:
                res = run_client(folder, dtype, messages, new_tokens, "chromium", device=device, screenshot=shot,
                                 adapter=adapter)
            except GraphkitError as exc:
                row["detail"] = str(exc)
                rows.append(row)
                continue
            if res.get("error"):
                if device == "webgpu" and adapter == "default" and res.get("shader_f16") is False and "f16" in str(res["error"]):
                    row.update(status="skipped", detail="adapter has no shader-f16: " + str(res["error"])[:160])
                else:
                    row["detail"] = str(res["error"])[:300] + known_problem_note(folder, dtype,
                                                                                  res.get("transformers_version"), device)
                rows.append(row)
                continue
            ref = python_reference(variant_path(folder, dtype), prompt_ids, new_tokens, eos)
            comps = compare_tokens(ref, res["results"])
            strict = device != "webgpu"
            ok = all(c.equal for c in comps) if strict else all(c.acceptable for c in comps)
            detail = "; ".join("equal" if c.equal else f"diverges at {c.first_divergence} (margin {c.margin_at_divergence:.4f})"
                               if c.margin_at_divergence is not None else f"diverges at {c.first_divergence}" for c in comps)
            if not ok and device == "webgpu":
                detail += _webgpu_gqa_hint(variant_path(folder, dtype), res.get("adapter"), prompt_ids)
            if not ok:
                detail += known_problem_note(folder, dtype, res.get("transformers_version"), device)
            row.update(status="pass" if ok else "fail", detail=detail, adapter=res.get("adapter"),
                       decode_ms_per_token=[r.get("decode_ms_per_token") for r in res["results"]])
            rows.append(row)
    return rows


def known_problem_note(folder: Path, dtype: str, transformers_version: str | None, device: str | None = None) -> str:
    """The unconditional problems graphkit/runtimes.py knows for this file in the Transformers.js version that
    ran it (its own report), as text to append to a failure; "" if none."""
    from graphkit.runtimes import check_file, runtime_of_version
    key = runtime_of_version(transformers_version)
    path = variant_path(folder, dtype)
    if key is None or not path.exists():
        return ""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    backend = "node" if device in (None, "cpu") else device
    found = [p for p in check_file(path, config, dtype, (key,), conditional=False) if backend in p["backends"]]
    return "".join(f" — known ({p['code']}): {p['message']} Fix: {p['fix']}" for p in found)


def _webgpu_gqa_hint(model: Path, adapter: dict | None, prompt_ids: list[list[int]]) -> str:
    """Name the known onnxruntime-web bug (graphkit/runtimes.py webgpu-gqa-subgroup, tests/test_gqa_runtimes.py)
    when it can explain a WebGPU failure: a file with GroupQueryAttention (--fuse) and a prompt of 32+ tokens, on any
    adapter (measured wrong with subgroup sizes 4 and 8)."""
    from graphkit.runtimes import PROBLEMS, check_file
    subgroup = (adapter or {}).get("subgroup_min_size")
    if max(map(len, prompt_ids), default=0) < 32:
        return ""
    if not any(p["code"] == "webgpu-gqa-subgroup" for p in check_file(model)):
        return ""
    p = PROBLEMS["webgpu-gqa-subgroup"]
    return (f" — this adapter's subgroup size is {subgroup if subgroup is not None else 'unknown'}: known ({p.code}): {p.form}; {p.observed}. "
            f"Fix: {p.fix}")


_NP_TO_ORT = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int64): "int64",
              np.dtype(np.int32): "int32", np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8",
              np.dtype(np.bool_): "bool"}
_ORT_TO_NP = {v: k for k, v in _NP_TO_ORT.items()}


def tensors_to_json(feeds: dict[str, np.ndarray]) -> dict:
    """Arrays in the harness's JSON tensor form ``{name: {type, dims, b64}}`` (ort_run.mjs, bench_core.runOps)."""
    import base64
    out = {}
    for name, arr in feeds.items():
        arr = np.ascontiguousarray(arr)
        out[name] = {"type": _NP_TO_ORT[arr.dtype], "dims": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode()}
    return out


def run_model(model: Path, feeds: dict[str, np.ndarray], device: str = "webgpu", timeout_s: int = 600,
              hide_features: tuple[str, ...] = (), adapter: str = "default") -> dict:
    """Run one ONNX file once in Transformers.js's runtimes: onnxruntime-web in headless Chromium (``webgpu`` or
    ``wasm``) or onnxruntime-node (``node``). Returns ``{"outputs": {name: array}, "adapter": ..., ...}``.

    For node-by-node comparisons with Python onnxruntime (expose intermediate tensors as graph outputs first).
    ``hide_features`` (webgpu): adapter features hidden from onnxruntime-web, e.g. ``("subgroups",)``;
    ``adapter="lavapipe"`` (webgpu): Mesa lavapipe (shader-f16, subgroup size 8), see ``run_client``."""
    import base64
    if not (HARNESS / "node_modules" / "@huggingface" / "transformers").is_dir():
        raise GraphkitError(f"{HARNESS}: Transformers.js is not installed; run `bash scripts/setup.sh`")
    payload = tensors_to_json(feeds)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(payload, fh)
        feeds_path = fh.name
    cmd = ["node", str(HARNESS / "ort_run.mjs"), "--model", str(Path(model).resolve()), "--feeds", feeds_path,
           "--device", device, "--timeout-s", str(max(timeout_s - 20, 10))]
    if hide_features:
        cmd += ["--hide-features", ",".join(hide_features)]
    if adapter != "default":
        cmd += ["--adapter", adapter]
    data = _run_harness(cmd, Path(feeds_path), timeout_s, f"{model}: ort_run ({device})")
    if "error" in data:
        raise GraphkitError(f"{model}: onnxruntime ({device}) failed: {data['error']}")
    outs = {}
    for name, t in data["outputs"].items():
        dt = _ORT_TO_NP[t["type"]]
        outs[name] = np.frombuffer(base64.b64decode(t["b64"]), dtype=dt).reshape(t["dims"])
    data["outputs"] = outs
    return data
