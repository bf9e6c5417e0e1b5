"""pack-matmul: MatMuls sharing their input -> one MatMul + Split. Smallest graph first (q/k/v with
biases, gate/up without), then commuting with matmul-nbits (byte-identical packed weights), then the
shipped example end to end (fused + packed + the proposed quantization: same greedy tokens as unpacked,
and Transformers.js in Node and Chromium wasm gives onnxruntime's tokens)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError
from graphkit.modelio import load_model, save_model
from graphkit.pipeline import parse_spec, run_passes
from passes._quant import quantize_blockwise
from passes.matmul_nbits import MatMulNBitsPass
from passes.pack_matmul import PackMatMulPass
from tiny_decoder import make_model, vi

RNG = np.random.default_rng(3)
H, NQ, NKV, FF = 64, 64, 16, 96


def block_graph(opset=18) -> onnx.ModelProto:
    """x -> q/k/v (MatMul + bias Add), gate/up (MatMul), a lone o MatMul on another input."""
    w = {n: (RNG.standard_normal(s) * 0.1).astype(np.float32) for n, s in
         (("Wq", (H, NQ)), ("Wk", (H, NKV)), ("Wv", (H, NKV)), ("Wg", (H, FF)), ("Wu", (H, FF)), ("Wo", (NQ, H)))}
    w.update({f"b{c}": RNG.standard_normal(n).astype(np.float32) for c, n in (("q", NQ), ("k", NKV), ("v", NKV))})
    nodes = []
    for c in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"W{c}"], [f"{c}_mm"], name=f"{c}_proj"),
                  helper.make_node("Add", [f"{c}_mm", f"b{c}"], [c], name=f"{c}_bias")]
    nodes += [helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate"),
              helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up"),
              helper.make_node("Mul", ["g", "u"], ["gu"], name="glu"),
              helper.make_node("MatMul", ["q", "Wo"], ["o"], name="o_proj")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", d])
            for n, d in (("k", NKV), ("v", NKV), ("gu", FF), ("o", H))]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["b", "s", H])], outs, w, opset=opset, ir_version=8)


def run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x})))


def copy(m):
    return onnx.ModelProto.FromString(m.SerializeToString())


@pytest.mark.parametrize("opset", [11, 18])
def test_packs_qkv_and_gate_up_outputs_unchanged(opset):
    m = block_graph(opset)
    x = RNG.standard_normal((2, 5, H)).astype(np.float32)
    want = run(m, x)
    r = PackMatMulPass()(copy(m))
    assert r.modified and r.details["groups"] == 2
    ops = [n.op_type for n in r.model.graph.node]
    assert ops.count("MatMul") == 3 and ops.count("Split") == 2 and ops.count("Add") == 1  # qkv, gate/up, o
    names = {t.name for t in r.model.graph.initializer}
    assert not names & {"Wq", "Wk", "Wv", "Wg", "Wu", "bq", "bk", "bv"} and "Wo" in names
    onnx.checker.check_model(r.model)
    got = run(r.model, x)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5 * np.abs(v).max())


def test_max_members_two_and_not_applicable():
    r = PackMatMulPass(max_members=2)(block_graph())
    assert r.details["groups"] == 2  # q+k packed, v alone; gate+up
    single = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", TensorProto.FLOAT, [1, 4])],
                        [vi("y", TensorProto.FLOAT, [1, 3])], {"W": np.ones((4, 3), np.float32)},
                        opset=onnx.defs.onnx_opset_version())
    res = PackMatMulPass()(single)
    assert not res.modified and "not applicable" in res.summary
    with pytest.raises(GraphkitError, match="max_members"):
        PackMatMulPass(max_members=1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_commutes_with_matmul_nbits(symmetric):
    """Quantizing the packed weight = quantizing each member and concatenating, byte for byte."""
    m = block_graph()
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    packed = MatMulNBitsPass(bits=4, block_size=32, symmetric=symmetric)(PackMatMulPass()(m).model).model
    inits = {t.name: numpy_helper.to_array(t) for t in packed.graph.initializer}
    qkv = next(n for n in packed.graph.node if n.op_type == "MatMulNBits" and
               next(a.i for a in n.attribute if a.name == "N") == NQ + 2 * NKV)
    parts = [quantize_blockwise(w[k], 4, 32, symmetric) for k in ("Wq", "Wk", "Wv")]
    assert np.array_equal(inits[qkv.input[1]], np.concatenate([p[0] for p in parts]))
    assert np.array_equal(inits[qkv.input[2]], np.concatenate([p[1] for p in parts]))
    if not symmetric:
        assert np.array_equal(inits[qkv.input[3]], np.concatenate([p[2] for p in parts]))
    assert np.array_equal(inits[qkv.input[5]], np.concatenate([w["bq"], w["bk"], w["bv"]]))  # bias folded


# ---------------------------------------------------------------------------- shipped example
FUSE = "fuse-rmsnorm,fuse-rotary(max_positions=1024),fuse-gqa(padding=bias)"
PROPOSED = {  # the pipelines proposed in docs/accuracy-level.md
    "q4": FUSE + ",pack-matmul,tied-embedding(bits=8,accuracy_level=4),"
                 "matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4)",
    "q4f16": FUSE + ",pack-matmul,tied-embedding(bits=4,block_size=16,symmetric=false,accuracy_level=4),"
                    "matmul-nbits(bits=4,block_size=32,accuracy_level=4),fp16",
}


@pytest.fixture(scope="module")
def proposed(converted, tmp_path_factory):
    """The shipped example's converted folder with q4/q4f16 rebuilt by the proposed pipelines."""
    folder, _ = converted
    out = tmp_path_factory.mktemp("proposed") / "epicrisis-proposed"
    shutil.copytree(folder, out)
    for dtype, spec in PROPOSED.items():
        model, _ = run_passes(load_model(out / "onnx" / "model.onnx"), parse_spec(spec))
        name = "model_q4.onnx" if dtype == "q4" else "model_q4f16.onnx"
        save_model(model, out / "onnx" / name)
    return out


def test_packed_equals_unpacked_on_the_shipped_example(converted, golden):
    """Fused + packed q4 gives the same greedy tokens and logits within 1e-4 as fused + unpacked q4."""
    from graphkit.ortrun import DecoderRunner
    folder, _ = converted
    spec = FUSE + ",{}tied-embedding(bits=8),matmul-nbits(bits=4,block_size=32)"
    runners = []
    for pack in ("", "pack-matmul,"):
        model, _ = run_passes(load_model(folder / "onnx" / "model.onnx"), parse_spec(spec.format(pack)))
        runners.append(DecoderRunner(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])))
    for p in golden["prompts"][:3]:
        a, la = runners[0].greedy(p["prompt_ids"], 16)
        b, lb = runners[1].greedy(p["prompt_ids"], 16)
        assert a == b
        assert max(float(np.abs(x - y).max()) for x, y in zip(la, lb)) < 1e-4


@pytest.mark.js
@pytest.mark.parametrize("client,device,dtype", [("node", "cpu", "q4"), ("node", "cpu", "q4f16"), ("chromium", "wasm", "q4"),
                                                 ("chromium", "wasm", "q4f16")])
def test_proposed_pipelines_in_transformersjs(proposed, golden, client, device, dtype):
    from graphkit.tjs import compare_tokens, python_reference, run_client, variant_path
    ops = {n.op_type for n in onnx.load(str(variant_path(proposed, dtype)), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "Split", "MatMulNBits"} <= ops
    prompts = golden["prompts"][:2] if client == "chromium" else golden["prompts"]
    gen = json.loads((proposed / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    result = run_client(proposed, dtype, [p["messages"] for p in prompts], 32, client, device=device)
    assert result["returncode"] == 0 and "error" not in result, result.get("error")
    ref = python_reference(variant_path(proposed, dtype), [p["prompt_ids"] for p in prompts], 32, eos)
    comps = compare_tokens(ref, result["results"])
    assert all(c.equal for c in comps), [(c.prompt, c.first_divergence) for c in comps]
