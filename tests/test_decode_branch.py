"""`decode-branch`: If(sequence length == 1, decode graph, prefill graph), weights shared, each branch exact."""
from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphkit.errors import GraphkitError
from graphkit.pipeline import parse_spec, run_passes
from passes.decode_branch import DecodeBranchPass
from passes.matmul_int8 import MatMulInt8Pass
from tiny_decoder import make_model, vi

V, H, F = 96, 32, 48
PREFILL = "matmul-int8(quantize_embedding_gather=true)"
DECODE = "matmul-int8(quantize_embedding_gather=true,activations=per-tensor)"


def _tiny() -> onnx.ModelProto:
    """The smallest decoder-shaped graph: input_ids → Gather(table) → MatMul → MatMul → logits. Token 7's
    embedding row is 40x the others: in a prefill that holds it, a per-tensor scale differs from per-token ones."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, H)).astype(np.float32)
    table[7] *= 40
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="mlp"),
             helper.make_node("MatMul", ["h", "w2"], ["logits"], name="lm_head")]
    return make_model(nodes, [vi("input_ids", TensorProto.INT64, [1, "S"])], [vi("logits", TensorProto.FLOAT, [1, "S", V])],
                      {"table": table, "w1": rng.standard_normal((H, F)).astype(np.float32),
                       "w2": rng.standard_normal((F, V)).astype(np.float32)}, opset=18)


def _sess(model: onnx.ModelProto, opt_path=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if opt_path:
        so.optimized_model_filepath = str(opt_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _all_ops(g: onnx.GraphProto, depth: int = 0, acc=None) -> collections.Counter:
    acc = collections.Counter() if acc is None else acc
    for n in g.node:
        acc[(depth, n.op_type)] += 1
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _all_ops(a.g, depth + 1, acc)
    return acc


def test_each_branch_is_exactly_its_single_form_graph(tmp_path):
    model = _tiny()
    before = model.SerializeToString()
    res = DecodeBranchPass()(model)
    assert res.modified and model.SerializeToString() == before  # mutates_input = False
    branched = res.model
    onnx.checker.check_model(branched)
    pre = MatMulInt8Pass(quantize_embedding_gather=True)(_tiny()).model
    dec = MatMulInt8Pass(quantize_embedding_gather=True, activations="per-tensor")(_tiny()).model
    # one If at top level; the weights stored once (the single-form file's initializers + the constant 1)
    assert [n.op_type for n in branched.graph.node] == ["Shape", "Equal", "If"]
    assert len(branched.graph.initializer) == len(pre.graph.initializer) + 1
    assert res.details["renamed_initializers"] == 0 and res.details["decode_only_bytes"] == 0
    s_if, s_pre, s_dec = _sess(branched), _sess(pre), _sess(dec)
    decode_ids = np.array([[7]], np.int64)
    prompt = np.array([[3, 7, 11, 19, 5]], np.int64)
    (a,), (b,), (c,) = (s.run(None, {"input_ids": decode_ids}) for s in (s_if, s_dec, s_pre))
    np.testing.assert_array_equal(a, b)  # decode: the per-tensor graph, bit for bit
    (a,), (b,), (c,) = (s.run(None, {"input_ids": prompt}) for s in (s_if, s_pre, s_dec))
    np.testing.assert_array_equal(a, b)  # prefill: the per-token graph, bit for bit
    assert np.abs(a - c).max() > 1e-3  # ... which the massive token makes differ from per-tensor
    # onnxruntime fuses inside the If body: the decode branch runs DynamicQuantizeMatMul
    _sess(branched, tmp_path / "opt.onnx")
    ops = _all_ops(onnx.load(str(tmp_path / "opt.onnx")).graph)
    assert ops[(1, "DynamicQuantizeMatMul")] == 2 and ops[(1, "DynamicQuantizeLinear")] == 0, ops
    # a second run is no rewrite
    again = DecodeBranchPass()(branched)
    assert not again.modified and "already" in again.summary


def test_sub_pipelines_use_plus_and_options_parse():
    p = parse_spec("decode-branch(decode=fuse-gqa(padding=bias)+pack-gqa+" + DECODE + ",prefill=" + PREFILL + ")")[0]
    assert p._spec(p.options.decode) == "fuse-gqa(padding=bias),pack-gqa," + DECODE
    assert parse_spec(p.spec())[0].describe() == p.describe()
    with pytest.raises(GraphkitError, match="option decode"):
        parse_spec("decode-branch(decode=no-such-pass)")


def test_refuses_graphs_whose_branches_disagree_on_inputs():
    from graphkit.errors import PreconditionError
    from passes.decode_branch import merge
    other = _tiny()
    other.graph.input.append(vi("extra", TensorProto.INT64, []))
    with pytest.raises(PreconditionError, match="inputs or outputs"):
        merge(other, _tiny())


# ------------------------------------------------------------------------------------ the shipped example

@pytest.fixture(scope="module")
def branched_folder(tmp_path_factory):
    """`graphkit convert --dtypes fp32,q8` with q8 = today's default pipeline ending in decode-branch."""
    out = tmp_path_factory.mktemp("branch") / "epicrisis-branch"
    spec = "q8=logits-to-keep,fuse-rmsnorm,fuse-rotary(max_positions=1024),pack-matmul,decode-branch"
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", "--dtypes", "fp32,q8", "--pipeline", spec,
                          "--output", str(out), "--json", "--no-agreement"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return out


def test_example_prefill_and_decode_equal_the_single_form_files(branched_folder, golden, tmp_path):
    from graphkit.modelio import load_model, save_model
    from graphkit.ortrun import DecoderRunner
    base = "logits-to-keep,fuse-rmsnorm,fuse-rotary(max_positions=1024),pack-matmul,"
    fp32 = load_model(branched_folder / "onnx" / "model.onnx")
    files = {}
    for name, spec in (("prefill", base + PREFILL), ("decode", base + DECODE)):
        m, _ = run_passes(fp32, parse_spec(spec), keep_input=True)
        save_model(m, tmp_path / f"{name}.onnx")
        files[name] = DecoderRunner.from_file(tmp_path / f"{name}.onnx")
    r_if = DecoderRunner.from_file(branched_folder / "onnx" / "model_quantized.onnx")
    assert (branched_folder / "onnx" / "model_quantized.onnx").stat().st_size < 1.1 * (tmp_path / "prefill.onnx").stat().st_size
    for p in golden["prompts"][:2]:
        ids = np.array([p["prompt_ids"]], np.int64)
        mask = np.ones_like(ids)
        a = r_if.step(ids, mask, r_if.empty_past(1))
        b = files["prefill"].step(ids, mask, files["prefill"].empty_past(1))
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
        nxt = np.array([[int(np.argmax(b.logits[0, -1]))]], np.int64)
        mask2 = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        c = r_if.step(nxt, mask2, b.present, logits_to_keep=1)
        d = files["decode"].step(nxt, mask2, b.present, logits_to_keep=1)
        np.testing.assert_allclose(c.logits, d.logits, rtol=0, atol=1e-5)
        for k in c.present:
            np.testing.assert_allclose(c.present[k], d.present[k], rtol=0, atol=1e-5)


@pytest.mark.js
def test_example_transformersjs_node_tokens_equal_python_ort(branched_folder, golden):
    from graphkit.tjs import compare_tokens, python_reference, run_client, variant_path
    prompts = golden["prompts"]
    gen = json.loads((branched_folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    result = run_client(branched_folder, "q8", [p["messages"] for p in prompts], 32, "node")
    assert result["returncode"] == 0 and "error" not in result, result.get("error")
    ref = python_reference(variant_path(branched_folder, "q8"), [p["prompt_ids"] for p in prompts], 32, eos)
    comps = compare_tokens(ref, result["results"])
    assert all(c.equal for c in comps), [(c.prompt, c.first_divergence) for c in comps]
    assert all("Motivo de ingreso" in r["text"] for r in result["results"])
