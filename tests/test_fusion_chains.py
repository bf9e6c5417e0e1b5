"""The fusion passes chained on the exported tiny decoder (tests/tiny_decoder.py: Qwen2 with both torch
exporters, Llama with TorchScript): logits and presents of the runs Transformers.js makes (prefill, decode with
past, prefill with past, batch 2 with left padding) against the unfused export, node counts before/after, a
second run not applicable; then the fused file in the onnxruntime builds Transformers.js ships (Node, wasm).
Each pass's own pattern tests: tests/test_fuse_rmsnorm.py, test_fuse_rotary.py, test_fuse_gqa.py,
test_pack_gqa.py (pack-matmul: test_pack_matmul.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graph_helpers import copy_model, op_counts, session
from passes.fuse_gqa import FuseGqaPass
from passes.fuse_rmsnorm import FuseRmsNormPass
from passes.fuse_rotary import FuseRotaryPass
from passes.pack_gqa import PackGqaPass
from passes.pack_matmul import PackMatMulPass


TOL = 1e-4  # logits vs the unfused model (float32)
FUSIONS = {"rmsnorm": lambda: FuseRmsNormPass(), "rotary": lambda: FuseRotaryPass(max_positions=256),
           "gqa": lambda: FuseGqaPass(), "gqa-bias": lambda: FuseGqaPass(padding="bias"),
           "pack-matmul": lambda: PackMatMulPass(), "pack-gqa": lambda: PackGqaPass()}


@pytest.fixture(scope="module", params=["dynamo", "torchscript", "llama-torchscript"])
def tiny_export(request, tiny_decoder):
    """The tiny Qwen2 (norm weights and q/k/v biases perturbed, so the fused weights matter) exported with each
    torch exporter; plus the tiny Llama (no biases, untied head) via TorchScript (tests/tiny_decoder.py)."""
    arch = "llama" if request.param.startswith("llama") else "qwen2"
    td = tiny_decoder(arch, request.param.split("-")[-1])
    return request.param, td.model(), td.layers


def _decoder_runs(model):
    """Logits (and presents) of the runs Transformers.js makes: batch 1 prefill + 3 decode steps,
    prefill after a past (S=3, P=4), batch 2 with left padding: prefill + 2 decode steps."""
    from graphkit.ortrun import DecoderRunner
    r = DecoderRunner(session(model))
    out = {}
    ids = np.array([[5, 17, 300, 42, 7, 99, 3]], np.int64)
    mask = np.ones_like(ids)
    st = r.step(ids, mask, r.empty_past(1))
    out["b1_prefill"] = st.logits
    for k in range(3):
        nxt = np.array([[int(st.logits[0, -1].argmax())]], np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        st = r.step(nxt, mask, st.present)
        out[f"b1_decode{k}"] = st.logits
    out["b1_present"] = np.concatenate([v.ravel() for v in st.present.values()])
    st = r.step(ids[:, :4], np.ones((1, 4), np.int64), r.empty_past(1))
    st = r.step(ids[:, 4:], np.ones((1, 7), np.int64), st.present)
    out["b1_prefill_with_past"] = st.logits
    ids2 = np.array([[0, 0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27]], np.int64)
    mask2 = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], np.int64)
    st = r.step(ids2, mask2, r.empty_past(2))
    out["b2_prefill"] = np.where(mask2[..., None] > 0, st.logits, 0)  # pad positions are ignored
    for k in range(2):
        nxt = st.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask2 = np.concatenate([mask2, np.ones((2, 1), np.int64)], 1)
        st = r.step(nxt, mask2, st.present)
        out[f"b2_decode{k}"] = st.logits
    return out


@pytest.fixture(scope="module")
def reference_runs(tiny_export):
    return _decoder_runs(tiny_export[1])


@pytest.mark.parametrize("chain", [("rmsnorm",), ("rotary",), ("rotary", "gqa"), ("rmsnorm", "rotary", "gqa-bias"),
                                   ("rotary", "gqa", "rmsnorm"),
                                   ("rmsnorm", "rotary", "gqa-bias", "pack-matmul", "pack-gqa")])
def test_tiny_export_fused_matches_unfused(tiny_export, reference_runs, chain):
    name, model, layers = tiny_export
    ops0 = op_counts(model)
    m = copy_model(model)
    summaries = []
    for step in chain:
        res = FUSIONS[step]()(m)
        assert res.modified, f"{name}: {step}: {res.summary}"
        assert not res.details.get("not_fused") or step == "rmsnorm", res.details["not_fused"]
        assert not res.details.get("not_packed"), res.details["not_packed"]
        summaries.append(res.summary)
        m = res.model
    ops = op_counts(m)
    if "rmsnorm" in chain:
        assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["SimplifiedLayerNormalization"] == 1
        assert "ReduceMean" not in ops and "Pow" not in ops
    if "pack-gqa" in chain:  # the rotary moved into GroupQueryAttention (do_rotary=1), q/k/v read packed
        assert "RotaryEmbedding" not in ops and ops["Split"] == layers  # only the MLP's gate/up Splits stay
        assert sum(1 for n in m.graph.node if n.op_type == "GroupQueryAttention"
                   and any(a.name == "do_rotary" and a.i == 1 for a in n.attribute) and not n.input[1]) == layers
    elif "rotary" in chain:
        assert ops["RotaryEmbedding"] == 2 * layers and "Neg" not in ops and "Cos" not in ops
    if any(s.startswith("gqa") for s in chain):
        assert ops["GroupQueryAttention"] == layers and "Softmax" not in ops and "IsNaN" not in ops
    # I/O contract unchanged
    assert [(i.name, str(i.type)) for i in m.graph.input] == [(i.name, str(i.type)) for i in model.graph.input]
    assert [(o.name, str(o.type)) for o in m.graph.output] == [(o.name, str(o.type)) for o in model.graph.output]
    got = _decoder_runs(m)
    seqlens_gqa = "gqa" in chain
    for key, want in reference_runs.items():
        if seqlens_gqa and key.startswith("b2"):
            continue  # checked below: the left-padded row is wrong by design in this mode
        assert got[key].shape == want.shape, key
        err = float(np.abs(got[key] - want).max())
        assert err < TOL, f"{name} {chain} {key}: max |diff| {err:.3g}"
    if seqlens_gqa:  # padding=seqlens: the unpadded row stays exact, the left-padded one does not
        assert np.abs(got["b2_prefill"][1] - reference_runs["b2_prefill"][1]).max() < TOL
        assert np.abs(got["b2_prefill"][0] - reference_runs["b2_prefill"][0]).max() > 1e-3
    print(f"\n{name} {'+'.join(chain)}: nodes {sum(ops0.values())} -> {sum(ops.values())}; " + " | ".join(summaries))


def test_tiny_export_nothing_left_to_fuse(tiny_export):
    """Running a fusion twice: the second run is 'not applicable' and leaves the graph unchanged."""
    _, model, _ = tiny_export
    m = copy_model(model)
    for step in ("rmsnorm", "rotary", "gqa"):
        m = FUSIONS[step]()(m).model
    before = m.SerializeToString()
    for step in ("rmsnorm", "rotary", "gqa"):
        res = FUSIONS[step]()(m)
        assert not res.modified and res.summary.startswith("not applicable")
    assert m.SerializeToString() == before


# ============================================================================= Transformers.js runtimes
_ORT_JS = """
import fs from 'node:fs';
const base = process.argv[4];
const which = process.argv[2];
const ort = which === 'web' ? await import(base + '/onnxruntime-web/dist/ort.node.min.mjs')
                            : await import(base + '/onnxruntime-node/dist/index.js');
if (which === 'web') ort.env.wasm.numThreads = 1;
const spec = JSON.parse(fs.readFileSync(process.argv[3], 'utf8'));
const out = [];
try {
  const sess = await ort.InferenceSession.create(spec.model, which === 'web' ? {executionProviders: ['wasm']} : {});
  for (const run of spec.runs) {
    const feeds = {};
    for (const [k, v] of Object.entries(run)) {
      const data = v.type === 'int64' ? BigInt64Array.from(v.data.map(BigInt))
                 : v.type === 'float16' ? Uint16Array.from(v.data) : Float32Array.from(v.data);
      feeds[k] = new ort.Tensor(v.type, data, v.dims);
    }
    const r = await sess.run(feeds);
    out.push(Array.from(r.logits.data));
  }
  console.log(JSON.stringify({logits: out}));
} catch (e) { console.log(JSON.stringify({error: String(e).slice(0, 400)})); }
"""


@pytest.mark.js
@pytest.mark.parametrize("tiny_export", ["dynamo", "torchscript"], indirect=True)  # Qwen2 only: one architecture
@pytest.mark.parametrize("packed", [False, True], ids=["split-qkv", "pack-gqa"])
@pytest.mark.parametrize("variant", ["fp32", "q4f16"])
def test_fused_model_runs_in_transformersjs_runtimes(tiny_export, tmp_path, variant, packed):
    """The fused graph (all three fusions) loads and runs in the onnxruntime builds Transformers.js
    ships (tests/js: onnxruntime-node for Node, onnxruntime-web wasm for the browser) and gives the
    logits Python onnxruntime gives on the same file. q4f16 = matmul-nbits + fp16 with the KV cache in
    float16 (fp16's default): with ``keep_io_types`` (fp32 KV cache behind Casts) onnxruntime-node
    1.30 / -web 1.31 fail in GroupQueryAttention ("Shape mismatch attempting to re-use buffer").
    pack-gqa: GQA reads the packed q/k/v projection and rotates q/k itself (do_rotary=1)."""
    import json
    import shutil
    import subprocess

    from conftest import ROOT
    from passes.fp16 import Fp16Pass
    from passes.matmul_nbits import MatMulNBitsPass
    modules = ROOT / "tests" / "js" / "node_modules"
    if shutil.which("node") is None or not (modules / "onnxruntime-web").is_dir():
        pytest.skip("node or tests/js/node_modules (scripts/setup.sh) missing")
    name, model, layers = tiny_export
    m = copy_model(model)
    for step in ("rmsnorm", "rotary", "gqa") + (("pack-matmul", "pack-gqa") if packed else ()):
        res = FUSIONS[step]()(m)
        assert res.modified, f"{step}: {res.summary}"
        m = res.model
    if variant == "q4f16":
        m = Fp16Pass()(MatMulNBitsPass()(m).model).model
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    kv = np.float16 if variant == "q4f16" else np.float32
    sess = session(m)
    ids = np.array([[5, 17, 300, 42, 7, 99]], np.int64)
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), kv)
            for i in sess.get_inputs() if i.name.startswith("past")}
    feeds1 = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None], **past}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds1)))
    nxt = np.array([[int(outs["logits"][0, -1].argmax())]], np.int64)
    feeds2 = {"input_ids": nxt, "attention_mask": np.ones((1, 7), np.int64), "position_ids": np.array([[6]]),
              **{k.replace("present", "past_key_values"): v for k, v in outs.items() if k.startswith("present")}}
    want = [outs["logits"], sess.run(["logits"], feeds2)[0]]

    def js(a):
        t = {np.dtype(np.int64): "int64", np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}[a.dtype]
        return {"dims": list(a.shape), "type": t, "data": (a.view(np.uint16) if t == "float16" else a).ravel().tolist()}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(path), "runs": [{k: js(np.asarray(v)) for k, v in f.items()}
                                                            for f in (feeds1, feeds2)]}))
    script = tmp_path / "run.mjs"
    script.write_text(_ORT_JS)
    tol = 1e-4 if variant == "fp32" else 2e-2  # wasm fp16 kernels round differently from native CPU ones
    for which in ("node", "web"):
        res = subprocess.run(["node", str(script), which, str(spec), str(modules)], capture_output=True, text=True,
                             timeout=300)
        data = json.loads(res.stdout)
        assert "error" not in data, f"{which}: {data.get('error')}"
        for got, ref in zip(data["logits"], want):
            err = float(np.abs(np.asarray(got).reshape(ref.shape) - ref).max())
            assert err < tol, f"{which} {variant}: max |diff| {err:.3g}"
