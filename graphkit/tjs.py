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


def run_client(folder: Path, dtype: str, messages: list, new_tokens: int, client: str = "node",
               device: str | None = None, screenshot: Path | None = None, timeout_s: int = 600,
               threads: int | None = None) -> dict:
    script = HARNESS / ("generate_node.mjs" if client == "node" else "generate_browser.mjs")
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
    return _run_harness(cmd, Path(prompts), timeout_s, f"Transformers.js ({client}, {dtype})")


def _run_harness(cmd: list[str], input_file: Path, timeout_s: int, label: str) -> dict:
    """Run one harness script (it prints exactly one JSON object), delete its input file, return the object
    with ``returncode`` added."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
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
    """Run each dtype on each browser device; one row per (device, dtype): pass / fail / skipped."""
    step = progress or (lambda msg: None)
    rows = []
    for device in devices:
        for dtype in dtypes:
            if not variant_path(folder, dtype).exists():
                continue
            step(f"chromium {device} {dtype}")
            shot = screenshots / f"chromium-{device}-{dtype}.png" if screenshots else None
            row = {"device": device, "dtype": dtype, "status": "fail", "detail": ""}
            try:
                res = run_client(folder, dtype, messages, new_tokens, "chromium", device=device, screenshot=shot)
            except GraphkitError as exc:
                row["detail"] = str(exc)
                rows.append(row)
                continue
            if res.get("error"):
                if device == "webgpu" and res.get("shader_f16") is False and "f16" in str(res["error"]):
                    row.update(status="skipped", detail="adapter has no shader-f16: " + str(res["error"])[:160])
                else:
                    row["detail"] = str(res["error"])[:300]
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
            row.update(status="pass" if ok else "fail", detail=detail,
                       decode_ms_per_token=[r.get("decode_ms_per_token") for r in res["results"]])
            rows.append(row)
    return rows


def _webgpu_gqa_hint(model: Path, adapter: dict | None, prompt_ids: list[list[int]]) -> str:
    """Name the known onnxruntime-web bug when it can explain a WebGPU failure (tests/test_gqa_runtimes.py)."""
    subgroup = (adapter or {}).get("subgroup_min_size")
    if subgroup is None or subgroup >= 8 or max(map(len, prompt_ids), default=0) < 32:
        return ""
    import onnx
    ops = {n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}
    if "GroupQueryAttention" not in ops:
        return ""
    return (f" — this adapter's subgroup size is {subgroup}: onnxruntime-web's WebGPU GroupQueryAttention is known to be "
            "wrong for prompts of 32+ tokens on subgroup sizes below 8 (SwiftShader); convert without --fuse for it, "
            "or check on a hardware GPU")


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
              hide_features: tuple[str, ...] = ()) -> dict:
    """Run one ONNX file once in Transformers.js's runtimes: onnxruntime-web in headless Chromium (``webgpu`` or
    ``wasm``) or onnxruntime-node (``node``). Returns ``{"outputs": {name: array}, "adapter": ..., ...}``.

    For node-by-node comparisons with Python onnxruntime (expose intermediate tensors as graph outputs first).
    ``hide_features`` (webgpu): adapter features hidden from onnxruntime-web, e.g. ``("subgroups",)``."""
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
    data = _run_harness(cmd, Path(feeds_path), timeout_s, f"{model}: ort_run ({device})")
    if "error" in data:
        raise GraphkitError(f"{model}: onnxruntime ({device}) failed: {data['error']}")
    outs = {}
    for name, t in data["outputs"].items():
        dt = _ORT_TO_NP[t["type"]]
        outs[name] = np.frombuffer(base64.b64decode(t["b64"]), dtype=dt).reshape(t["dims"])
    data["outputs"] = outs
    return data
