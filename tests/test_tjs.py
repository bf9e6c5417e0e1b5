"""The real client: Transformers.js (Node and headless Chromium) on the converted shipped model.

Token ids from Transformers.js must equal our Python onnxruntime greedy loop on the same file
(with EOS masked, as `min_new_tokens` does). On WebGPU, kernels round differently: tokens are
compared strictly, except that a divergence exactly where the Python top-2 margin is a near-tie
(< graphkit.tjs.NEAR_TIE) is reported instead of failed. f16 dtypes on an adapter without
`shader-f16` are skipped with that reason. On Mesa lavapipe (scripts/webgpu/setup_lavapipe.sh: shader-f16,
subgroup size 8) every dtype runs, in Node and Chromium, and the run fails unless it got that adapter.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import ROOT
from graphkit.tjs import compare_tokens, python_reference, run_client, variant_path

pytestmark = pytest.mark.js
ARTIFACTS = ROOT / "tests" / "js" / "artifacts"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def case(converted, golden):
    folder, _ = converted
    prompts = golden["prompts"]
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    eos = gen_cfg["eos_token_id"] if isinstance(gen_cfg["eos_token_id"], list) else [gen_cfg["eos_token_id"]]
    return folder, prompts, eos


def _check(folder, prompts, eos, dtype, result, strict=True):
    assert result["returncode"] == 0 and "error" not in result, result.get("error")
    assert [r["prompt_ids"] for r in result["results"]] == [p["prompt_ids"] for p in prompts]
    ref = python_reference(variant_path(folder, dtype), [p["prompt_ids"] for p in prompts], NEW_TOKENS, eos)
    comps = compare_tokens(ref, result["results"])
    report = [f"prompt {c.prompt}: " + ("equal" if c.equal else f"diverges at {c.first_divergence} (margin {c.margin_at_divergence})")
              for c in comps]
    print(f"{result.get('client')}/{result.get('device')}/{dtype}: " + "; ".join(report))
    if strict:
        assert all(c.equal for c in comps), report
    else:
        assert all(c.acceptable for c in comps), report
    return comps


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "q4", "q4f16", "q8"])
def test_node_tokens_equal_python_ort(case, dtype):
    folder, prompts, eos = case
    result = run_client(folder, dtype, [p["messages"] for p in prompts], NEW_TOKENS, "node")
    _check(folder, prompts, eos, dtype, result)
    # the fine-tuned behaviour survives: an epicrisis, not the base model's free text
    assert all("Motivo de ingreso" in r["text"] for r in result["results"]), [r["text"] for r in result["results"]]


def test_node_catches_a_broken_variant(case, tmp_path):
    """A q4 file with wrong scales still runs in Transformers.js but its tokens differ from the good
    file's Python run, and the comparison says so."""
    from test_convert import _break_q4_scales
    folder, prompts, eos = case
    broken = tmp_path / "broken-model"
    shutil.copytree(folder, broken)
    _break_q4_scales(broken / "onnx" / "model_q4.onnx")
    result = run_client(broken, "q4", [p["messages"] for p in prompts[:2]], NEW_TOKENS, "node")
    ref = python_reference(variant_path(folder, "q4"), [p["prompt_ids"] for p in prompts[:2]], NEW_TOKENS, eos)
    comps = compare_tokens(ref, result["results"])
    assert not all(c.acceptable for c in comps)


@pytest.mark.parametrize("device,dtype", [("wasm", "q4"), ("wasm", "q4f16"), ("wasm", "q8"),
                                          ("webgpu", "fp32"), ("webgpu", "q4"), ("webgpu", "q8"),
                                          ("webgpu", "fp16"), ("webgpu", "q4f16")])
def test_chromium_tokens_equal_python_ort(case, device, dtype):
    folder, prompts, eos = case
    prompts = prompts[:2]  # the browser is slow on 2 cores; two prompts × 32 tokens per variant
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"chromium-{device}-{dtype}.png"
    result = run_client(folder, dtype, [p["messages"] for p in prompts], NEW_TOKENS, "chromium", device=device,
                        screenshot=shot)
    if device == "webgpu" and dtype in ("fp16", "q4f16") and result.get("shader_f16") is False:
        adapter = result.get("adapter") or {}
        pytest.skip(f"webgpu {dtype}: adapter {adapter.get('vendor')}/{adapter.get('architecture')} has no shader-f16 "
                    f"(error: {str(result.get('error'))[:160]}); runs unchanged on a GPU with f16")
    _check(folder, prompts, eos, dtype, result, strict=(device == "wasm"))
    assert shot.exists() and shot.stat().st_size > 1000


def test_fused_variants_agree_with_unfused_fp32(fused, converted, golden):
    """Every `--fuse` file against the unfused fp32 export, teacher-forced over the golden continuations
    (graphkit.verify.check_variant): finite logits (fp16 and q4f16 included), top-1 >= 0.90, and the fused fp32
    within 1e-4. The Transformers.js tests below compare the client with Python onnxruntime on the same file, which
    a file that is wrong everywhere would pass."""
    import numpy as np

    from graphkit.ortrun import DecoderRunner
    from graphkit.verify import check_variant
    ref = DecoderRunner.from_file(variant_path(converted[0], "fp32"))
    runs = [(rec["prompt_ids"], rec["greedy_ids_adapter"],
             ref.teacher_forced_logits(rec["prompt_ids"], rec["greedy_ids_adapter"])) for rec in golden["prompts"]]
    for dtype in ("fp32", "fp16", "q4", "q4f16", "q8"):
        rep = check_variant(dtype, variant_path(fused, dtype), runs, threshold=0.90)
        assert rep.error is None and rep.nonfinite == 0 and rep.top1_agreement >= 0.90, rep
    fp32 = DecoderRunner.from_file(variant_path(fused, "fp32"))
    err = max(float(np.abs(fp32.teacher_forced_logits(p, c) - want).max()) for p, c, want in runs)
    assert err < 1e-4, err


def test_fused_webgpu_on_verify_default_prompts(fused):
    """verify's default prompts (32+ tokens) on WebGPU. On this machine's adapter (SwiftShader, subgroup size 4)
    onnxruntime-web's GroupQueryAttention prefill is wrong (isolated in tests/test_gqa_runtimes.py): verify must
    fail there *and say why*; on an adapter with subgroups of 8+ it must pass. Once a Transformers.js update fixes
    the bug, the first assertion fails: drop the caveat (passes/fuse_gqa.py, README)."""
    from graphkit.verify import browser_check
    rows = browser_check(fused, None, 16, ["fp32"], ["webgpu"])
    assert rows
    if all(r["status"] == "pass" for r in rows):
        return
    failing = [r for r in rows if r["status"] != "pass"]
    assert all("subgroup size" in r["detail"] and "--fuse" in r["detail"] for r in failing), failing
    pytest.xfail("known onnxruntime-web WebGPU GQA bug on subgroup-size-4 adapters; verify names it: "
                 + failing[0]["detail"][-200:])


@pytest.mark.parametrize("client,device,dtype", [("node", "cpu", "fp32"), ("node", "cpu", "fp16"), ("node", "cpu", "q4"),
                                                 ("node", "cpu", "q4f16"), ("node", "cpu", "q8"),
                                                 ("chromium", "wasm", "q4"), ("chromium", "wasm", "q8"),
                                                 ("chromium", "webgpu", "fp32")])
def test_fused_variants_in_transformersjs(case, fused, client, device, dtype):
    import onnx
    _, prompts, eos = case
    ops = {n.op_type for n in onnx.load(str(variant_path(fused, dtype)), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert "RotaryEmbedding" not in ops, "pack-gqa should have moved the rotary into GroupQueryAttention"
    prompts = prompts[:2] if client == "chromium" else prompts
    result = run_client(fused, dtype, [p["messages"] for p in prompts], NEW_TOKENS, client, device=device)
    _check(fused, prompts, eos, dtype, result)


# ------------------------------------------------------------------------------------------------------------------
# WebGPU with shader-f16: Mesa lavapipe 25 (a CPU Vulkan driver), set up by scripts/setup.sh in build/lavapipe/.
# One process/page per folder runs all five dtypes (shared runtime start-up and shader compilations; Mesa's shader
# cache in build/lavapipe/shader-cache makes reruns fast). The harness asserts the adapter (shader-f16, subgroup
# size 8) and fails if the route is missing or another adapter answers; it never falls back to SwiftShader.
ALL_DTYPES = ["fp32", "fp16", "q4", "q4f16", "q8"]
LAVAPIPE_TOKENS = 16


def _lavapipe_requested() -> None:
    if os.environ.get("GRAPHKIT_SKIP_LAVAPIPE") == "1":
        pytest.skip("GRAPHKIT_SKIP_LAVAPIPE=1: the lavapipe WebGPU route was opted out of (scripts/setup.sh)")


def _assert_lavapipe_adapter(result):
    adapter = result.get("adapter") or {}
    assert "shader-f16" in adapter.get("features", []), adapter
    assert adapter.get("subgroup_min_size") == 8 and adapter.get("subgroup_max_size") == 8, adapter


@pytest.mark.slow
@pytest.mark.parametrize("client", ["node", "chromium"])
@pytest.mark.parametrize("flavour", ["default", "fuse"])
def test_lavapipe_webgpu_tokens_equal_python_ort(case, fused, client, flavour):
    """All five dtypes of the default and the --fuse folder on WebGPU with shader-f16 (Node: onnxruntime-node's
    Dawn; Chromium: onnxruntime-web): tokens equal Python onnxruntime's on the same file (a divergence only at a
    near-tie, graphkit.tjs.NEAR_TIE, is reported, as for every WebGPU run). The prompts are 68-70 tokens, so the
    --fuse folder's GroupQueryAttention runs the flash-attention prefill that is wrong on subgroup-4 adapters."""
    _lavapipe_requested()
    folder = case[0] if flavour == "default" else fused
    _, prompts, eos = case
    prompts = prompts[:2]
    result = run_client(folder, ALL_DTYPES, [p["messages"] for p in prompts], LAVAPIPE_TOKENS, client,
                        device="webgpu", adapter="lavapipe", timeout_s=1200)
    assert result["returncode"] == 0 and "error" not in result, result.get("error")
    _assert_lavapipe_adapter(result)
    failures = []
    for dtype in ALL_DTYPES:
        run = result["by_dtype"][dtype]
        if "error" in run:
            failures.append(f"{dtype}: {run['error'][:300]}")
            continue
        assert [r["prompt_ids"] for r in run["results"]] == [p["prompt_ids"] for p in prompts]
        ref = python_reference(variant_path(folder, dtype), [p["prompt_ids"] for p in prompts], LAVAPIPE_TOKENS, eos)
        comps = compare_tokens(ref, run["results"])
        report = "; ".join("equal" if c.equal else f"diverges at {c.first_divergence} (margin {c.margin_at_divergence})"
                           for c in comps)
        print(f"{client}/webgpu-lavapipe/{flavour}/{dtype}: {report}")
        if not all(c.acceptable for c in comps):
            failures.append(f"{dtype}: {report}")
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="onnxruntime-web's WebGPU GroupQueryAttention is wrong on lavapipe (subgroup "
                   "size 8) too: on the retrained example's default prompts fp32 --fuse diverges at token 5 with a "
                   "top-2 margin of 1.47 (measured 2026-12-03), as the isolated node in test_gqa_runtimes.py is wrong "
                   "there for rows after the 8th; strict: passing means the bug is fixed")
def test_fused_verify_passes_on_subgroup_8(fused):
    """The counterpart of test_fused_webgpu_on_verify_default_prompts (an xfail on SwiftShader's subgroup size 4):
    would `verify --browser --devices webgpu:lavapipe` pass on the same prompts on a subgroup-8 adapter? Not today
    (the xfail's reason), so the GroupQueryAttention caveat is not specific to subgroup-4 adapters."""
    _lavapipe_requested()
    from graphkit.verify import browser_check
    rows = browser_check(fused, None, 16, ["fp32"], ["webgpu:lavapipe"])
    assert rows and all(r["status"] == "pass" for r in rows), rows
    assert all(r["adapter"]["subgroup_min_size"] == 8 and "shader-f16" in r["adapter"]["features"] for r in rows), rows


@pytest.mark.parametrize("client", ["node", "chromium"])
def test_lavapipe_route_fails_on_another_adapter(case, tmp_path, monkeypatch, client):
    """The guard, with real drivers: a route whose ICD is Chromium's bundled SwiftShader (subgroup size 4, no
    shader-f16; Node), or whose Chromium still has SwiftShader bundled (Chromium), makes the run fail naming the
    adapter it got; an unavailable route fails with the set-up's reason. Never a quiet fallback."""
    route_file = ROOT / "build" / "lavapipe" / "route.json"
    if not route_file.exists() or json.loads(route_file.read_text()).get("status") != "ready":
        _lavapipe_requested()
        pytest.fail(f"lavapipe route not ready ({route_file}): run bash scripts/setup.sh")
    route = json.loads(route_file.read_text())
    folder, prompts, _ = case
    swiftshader = tmp_path / "swiftshader_icd.json"
    swiftshader.write_text(json.dumps({"file_format_version": "1.0.0",
                                       "ICD": {"library_path": "/usr/lib/chromium/libvk_swiftshader.so", "api_version": "1.0.5"}}))
    bad = dict(route, node_icd=str(swiftshader), chromium="/usr/lib/chromium/chromium")
    (tmp_path / "route.json").write_text(json.dumps(bad))
    monkeypatch.setenv("GRAPHKIT_LAVAPIPE_ROUTE", str(tmp_path / "route.json"))
    res = run_client(folder, "q4f16", [prompts[0]["messages"]], 2, client, device="webgpu", adapter="lavapipe")
    assert res["returncode"] != 0 and "results" not in res
    assert "lavapipe" in res["error"] and ("subgroup" in res["error"]), res["error"]
    (tmp_path / "route.json").write_text(json.dumps({"status": "unavailable", "reason": "backports unreachable (test)"}))
    res = run_client(folder, "q4f16", [prompts[0]["messages"]], 2, client, device="webgpu", adapter="lavapipe")
    assert res["returncode"] != 0 and "backports unreachable (test)" in res.get("error", ""), res


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, golden):
    """`graphkit convert --calibration data.jsonl --size-budget 1.3x`: GPTQ on the user's data and the most sensitive
    MatMuls at 8 bits (8-bit MatMulNBits; q4f16's table too) inside the 4-bit files (docs/quantization.md)."""
    import subprocess
    import sys
    tmp = tmp_path_factory.mktemp("calibrated")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": p["messages"] + [{"role": "assistant", "content": p["greedy_text_adapter"]}]},
                                       ensure_ascii=False) + "\n" for p in golden["prompts"]), encoding="utf-8")
    out = tmp / "epicrisis-calibrated"
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", "--dtypes", "fp32,q4,q4f16", "--calibration", str(data),
                          "--size-budget", "1.3x", "--output", str(out), "--json", "--no-agreement"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout)


@pytest.mark.parametrize("client,dtype", [("node", "q4"), ("node", "q4f16"), ("chromium", "q4"), ("chromium", "q4f16")])
def test_calibrated_mixed_files_in_transformersjs(case, calibrated, client, dtype):
    """Node: every prompt; Chromium wasm: one (slow on 2 cores). The default folder's files (calibrated on self-sampled
    sequences, 1.5x budget) are the ones test_chromium_tokens_equal_python_ort and the lavapipe tests run."""
    import onnx
    folder, summary = calibrated
    _, prompts, eos = case
    entry = next(d for d in summary["dtypes"] if d["dtype"] == dtype)
    assert summary["calibration"]["source"].endswith("train.jsonl") and entry["mixed"]["kept"], entry
    nodes = onnx.load(str(variant_path(folder, dtype)), load_external_data=False).graph.node
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
    assert bits == {4, 8}, bits
    if client == "chromium":
        prompts = prompts[:1]
    result = run_client(folder, dtype, [p["messages"] for p in prompts], NEW_TOKENS, client,
                        **({"device": "wasm"} if client == "chromium" else {}))
    _check(folder, prompts, eos, dtype, result)
