"""fp16 pass: each policy island on the smallest graph that shows it, then a tiny Qwen2 end to end.

Every converted graph is run with onnxruntime and compared with the float32 original.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import PreconditionError
from graphkit.pipeline import parse_spec, run_passes, verify_graph
from passes.fp16 import FP16_MAX, Fp16Pass, cast_round_trips, infer_elem_types
from tiny_decoder import TINY, make_model, vi

F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Run with ORT, casting float feeds to the graph's declared input types."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = {i.name: i.type for i in sess.get_inputs()}
    fixed = {}
    for k, v in feeds.items():
        if want[k] == "tensor(float16)":
            v = v.astype(np.float16)
        elif want[k] == "tensor(float)":
            v = v.astype(np.float32)
        fixed[k] = v
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, fixed)))


def convert(model, **opts) -> tuple[onnx.ModelProto, dict]:
    """Run the pass; returns (converted model, details)."""
    res = Fp16Pass(**opts)(model)
    assert res.modified
    verify_graph(res.model)  # onnx.checker + strict type inference (what the pipeline runs)
    return res.model, res.details


def node_types(model, op_type) -> list[tuple[list[int], list[int]]]:
    """(input elem types, output elem types) of every node of an op type, after inference."""
    types = infer_elem_types(model)
    return [([types.get(x, 0) for x in n.input if x], [types.get(x, 0) for x in n.output if x])
            for n in model.graph.node if n.op_type == op_type]


def assert_close_rel(ref, got, rtol, what=""):
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite values in fp16 output"
    err = np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= rtol, f"{what}: max error {err:.3g} of the output range > {rtol}"


def no_redundant_casts(model):
    types = infer_elem_types(model)
    assert cast_round_trips(model, types) == []
    for n in model.graph.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            if to in (F32, F16):
                assert types.get(n.input[0]) != to, f"Cast {n.name} casts a float tensor to its own type"


def rmsnorm_nodes(x, prefix, style="dynamo"):
    """RMSNorm as the exporters write it; returns (nodes, inits, output)."""
    p = prefix
    inits = [init(f"{p}two", np.array(2.0, np.float32)), init(f"{p}axes", np.array([-1], np.int64)),
             init(f"{p}eps", np.array(1e-6, np.float32)), init(f"{p}w", np.linspace(0.5, 1.5, 8).astype(np.float32))]
    nodes = []
    src = x
    if style == "torchscript":  # hidden_states.to(float32) ... .to(input_dtype)
        nodes.append(helper.make_node("Cast", [x], [f"{p}x32"], to=F32, name=f"{p}cast_in"))
        src = f"{p}x32"
    nodes += [helper.make_node("Pow", [src, f"{p}two"], [f"{p}sq"], name=f"{p}pow"),
              helper.make_node("ReduceMean", [f"{p}sq", f"{p}axes"], [f"{p}var"], name=f"{p}mean"),
              helper.make_node("Add", [f"{p}var", f"{p}eps"], [f"{p}vare"], name=f"{p}add_eps"),
              helper.make_node("Sqrt", [f"{p}vare"], [f"{p}std"], name=f"{p}sqrt")]
    if style == "torchscript":
        inits.append(init(f"{p}one", np.array(1.0, np.float32)))
        nodes.append(helper.make_node("Div", [f"{p}one", f"{p}std"], [f"{p}rstd"], name=f"{p}div"))
    else:
        nodes.append(helper.make_node("Reciprocal", [f"{p}std"], [f"{p}rstd"], name=f"{p}recip"))
    nodes.append(helper.make_node("Mul", [src, f"{p}rstd"], [f"{p}normed"], name=f"{p}mul_rstd"))
    last = f"{p}normed"
    if style == "torchscript":
        nodes.append(helper.make_node("Cast", [last], [f"{p}normed_c"], to=F32, name=f"{p}cast_out"))
        last = f"{p}normed_c"
    nodes.append(helper.make_node("Mul", [f"{p}w", last], [f"{p}out"], name=f"{p}mul_w"))
    return nodes, inits, f"{p}out"


# ------------------------------------------------------------------------------------------------
# islands
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["dynamo", "torchscript"])
def test_rmsnorm_variance_is_fp32_and_survives_large_activations(style):
    nodes, inits, out = rmsnorm_nodes("x", "n_", style)
    nodes.append(helper.make_node("Relu", [out], ["y"], name="after"))  # something fp16 after the norm
    m = make_model(nodes, [vi("x", F32, [2, 3, 8])], [vi("y", F32, [2, 3, 8])], inits, ir_version=8, check=True)
    fp, details = convert(m)
    # the whole variance computation runs in float32; the weight Mul and what follows in float16
    for op in ("Pow", "ReduceMean", "Sqrt"):
        (ins, outs), = node_types(fp, op)
        assert outs == [F32], op
    mul_w = [n for n in fp.graph.node if n.name == "n_mul_w"][0]
    types = infer_elem_types(fp)
    assert types[mul_w.output[0]] == F16
    no_redundant_casts(fp)
    casts = [n for n in fp.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2, [(n.name, n.input, n.output) for n in casts]  # one up before Pow, one down after Mul

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    assert_close_rel(run(m, {"x": x})["y"], run(fp, {"x": x})["y"], 2e-3, "normal activations")
    # residual entries up to 30000: their squares (~9e8) and mean overflow float16 (65504);
    # the fp32 island keeps the output finite and accurate
    big = (x * 10000.0).clip(-30000, 30000)
    assert (big.astype(np.float64) ** 2).max() > 100 * FP16_MAX
    ref = run(m, {"x": big})["y"]
    got = run(fp, {"x": big})["y"]
    assert_close_rel(ref, got, 2e-3, "activations whose squares overflow fp16")


def test_rmsnorm_with_mul_square_and_div_by_sqrt():
    """Decomposed LayerNorm-style variance: Mul(d, d) -> ReduceMean -> Add -> Sqrt -> Div(d, .)."""
    inits = [init("axes", np.array([-1], np.int64)), init("eps", np.array(1e-5, np.float32))]
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["vare"]),
             helper.make_node("Sqrt", ["vare"], ["std"]),
             helper.make_node("Div", ["x", "std"], ["y"])]
    m = make_model(nodes, [vi("x", F32, [4, 16])], [vi("y", F32, [4, 16])], inits, ir_version=8, check=True)
    fp, details = convert(m, keep_io_types=True)
    assert details["norm_islands"] == 1
    (_, outs), = node_types(fp, "ReduceMean")
    assert outs == [F32]
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32) * 5000
    assert_close_rel(run(m, {"x": x})["y"], run(fp, {"x": x})["y"], 1e-3)


def _attention_graph(fill: float):
    """scores = q @ k^T; mask fill constant where attention_mask == 0; softmax; @ v."""
    inits = [init("zero", np.array(0.0, np.float32)), init("fill", np.array(fill, np.float32)),
             init("one", np.array(1, np.int64))]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Equal", ["mask", "one"], ["keep"]),
             helper.make_node("Unsqueeze", ["keep", "one"], ["keep3"]),
             helper.make_node("Where", ["keep3", "zero", "fill"], ["bias"], name="mask_where"),
             helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask_add"),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["y"])]
    inputs = [vi("q", F32, [2, 4, 8]), vi("k", F32, [2, 5, 8]), vi("v", F32, [2, 5, 8]), vi("mask", I64, [2, 5])]
    return make_model(nodes, inputs, [vi("y", F32, [2, 4, 8])], inits, ir_version=8, check=True)


@pytest.mark.parametrize("fill", [float(np.finfo(np.float32).min), -1e9])
def test_softmax_and_mask_add_compute_in_fp32_mask_fill_clamped(fill):
    m = _attention_graph(fill)
    fp, details = convert(m)
    (ins, outs), = node_types(fp, "Softmax")
    assert ins == [F32] and outs == [F32]
    types = infer_elem_types(fp)
    add = [n for n in fp.graph.node if n.name == "mask_add"][0]
    assert types[add.output[0]] == F32  # the mask is added in float32
    # the fill constant is clamped to -65504 (reported), never -inf by overflow
    consts = {t.name: numpy_helper.to_array(t) for t in fp.graph.initializer}
    where = [n for n in fp.graph.node if n.name == "mask_where"][0]
    assert float(consts[where.input[2]]) == -FP16_MAX
    assert any("fill" in c for c in details["clamped"])
    no_redundant_casts(fp)

    rng = np.random.default_rng(2)
    feeds = {"q": rng.standard_normal((2, 4, 8)) * 3, "k": rng.standard_normal((2, 5, 8)) * 3,
             "v": rng.standard_normal((2, 5, 8)), "mask": np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int64)}
    assert_close_rel(run(m, feeds)["y"], run(fp, feeds)["y"], 5e-3, "attention")


def test_mask_constant_in_fp16_arithmetic_is_clamped_not_inf():
    """A mask constant consumed by fp16 math (no softmax) becomes -65504, and an fp32 auxiliary
    tensor built from it is clipped before its cast to fp16."""
    inits = [init("neg", np.array(-3.4028234e38, np.float32)), init("zero", np.array(0.0, np.float32))]
    nodes = [helper.make_node("Add", ["x", "neg"], ["a"]),                       # const straight into fp16 math
             helper.make_node("Where", ["m", "zero", "neg"], ["w"]),             # auxiliary (fp32)
             helper.make_node("Add", ["w", "w"], ["w2"]),                        # -131008: beyond fp16 in fp32
             helper.make_node("Add", ["x", "w2"], ["b"])]                        # meets fp16 activations
    m = make_model(nodes, [vi("x", F32, [4]), vi("m", TensorProto.BOOL, [4])], [vi("a", F32, [4]), vi("b", F32, [4])],
                   inits, ir_version=8, check=True)
    fp, details = convert(m)
    assert details["clips_inserted"] == 1
    out = run(fp, {"x": np.array([0, 1, 2, 3], np.float32), "m": np.array([True, False, True, False])})
    assert np.isfinite(out["a"].astype(np.float32)).all() and np.isfinite(out["b"].astype(np.float32)).all()
    assert out["a"].dtype == np.float16 and float(out["a"][0]) == -FP16_MAX
    assert float(out["b"][1]) == -FP16_MAX


def test_constant_of_shape_fill_is_clamped_and_clipped():
    """ConstantOfShape(finfo.min) + itself (aux fp32, beyond fp16) meeting fp16 activations."""
    big = numpy_helper.from_array(np.array([np.finfo(np.float32).min], np.float32))
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("ConstantOfShape", ["shp"], ["fill"], value=big, name="fill"),
             helper.make_node("Add", ["fill", "fill"], ["fill2"]),
             helper.make_node("Add", ["x", "fill2"], ["y"])]
    m = make_model(nodes, [vi("x", F32, [4])], [vi("y", F32, [4])], ir_version=8, check=True)
    fp, details = convert(m)
    assert any("ConstantOfShape 'fill'" in c for c in details["clamped"]) and details["clips_inserted"] == 1
    y = run(fp, {"x": np.arange(4, dtype=np.float32)})["y"]
    assert y.dtype == np.float16 and (y.astype(np.float32) == -FP16_MAX).all()


def test_rotary_cos_sin_inputs_stay_fp32():
    """inv_freq * positions with positions up to 30000 and inv_freq down to 1e-6: in fp16 the phase
    would be off by radians; the pass keeps the Cast(int->float), the Mul and Cos/Sin in fp32."""
    inv_freq = (1e6 ** (-np.arange(0, 16, 2) / 16)).astype(np.float32)
    inits = [init("inv_freq", inv_freq), init("ax", np.array([-1], np.int64))]
    nodes = [helper.make_node("Unsqueeze", ["position_ids", "ax"], ["pos3"]),
             helper.make_node("Cast", ["pos3"], ["posf"], to=F32, name="pos_cast"),
             helper.make_node("Mul", ["posf", "inv_freq"], ["freqs"]),
             helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
             helper.make_node("Cos", ["emb"], ["cos"]),
             helper.make_node("Sin", ["emb"], ["sin"]),
             helper.make_node("Mul", ["x", "cos"], ["xc"]),
             helper.make_node("Mul", ["x", "sin"], ["xs"]),
             helper.make_node("Add", ["xc", "xs"], ["y"])]
    m = make_model(nodes, [vi("x", F32, [1, 4, 16]), vi("position_ids", I64, [1, 4])], [vi("y", F32, [1, 4, 16])],
                   inits, ir_version=8, check=True)
    fp, details = convert(m)
    for op in ("Cos", "Sin"):
        (ins, outs), = node_types(fp, op)
        assert ins == [F32] and outs == [F32], op
    cast = [n for n in fp.graph.node if n.name == "pos_cast"][0]
    assert cast.attribute[0].i == F32  # the position cast feeding Cos/Sin stays float32
    inits_out = {t.name: t for t in fp.graph.initializer}
    assert inits_out["inv_freq"].data_type == F32
    no_redundant_casts(fp)
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 4, 16)),
             "position_ids": np.array([[0, 7, 12345, 30000]], np.int64)}
    assert_close_rel(run(m, feeds)["y"], run(fp, feeds)["y"], 2e-3, "rotary")


def test_matmulnbits_scales_become_fp16():
    from passes.matmul_nbits import MatMulNBitsPass
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                   [vi("x", F32, [2, 64])], [vi("y", F32, [2, 32])], [init("w", w)], ir_version=8, check=True)
    q = MatMulNBitsPass()(m).model
    fp, details = convert(q)
    mnb, = [n for n in fp.graph.node if n.op_type == "MatMulNBits"]
    inits_out = {t.name: t for t in fp.graph.initializer}
    assert inits_out[mnb.input[1]].data_type == TensorProto.UINT8
    assert inits_out[mnb.input[2]].data_type == F16  # scales follow A's type (T1)
    (ins, outs), = node_types(fp, "MatMulNBits")
    assert ins[0] == F16 and outs == [F16]
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert_close_rel(run(q, {"x": x})["y"], run(fp, {"x": x})["y"], 3e-3, "q4 -> q4f16")


def test_constant_of_shape_range_and_constant_nodes():
    """ConstantOfShape float value, a float Range (no fp16 in its schema), Constant nodes."""
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("ConstantOfShape", ["shp"], ["ones"],
                              value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Constant", [], ["start"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
             helper.make_node("Constant", [], ["limit"], value_float=4.0),
             helper.make_node("Constant", [], ["delta"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
             helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("Add", ["x", "ones"], ["a"]),
             helper.make_node("Mul", ["a", "r"], ["y"])]
    m = make_model(nodes, [vi("x", F32, [3, 4])], [vi("y", F32, [3, 4])], ir_version=8, check=True)
    fp, details = convert(m)
    (ins, outs), = node_types(fp, "Range")
    assert ins == [F32, F32, F32] and outs == [F32]
    (_, outs), = node_types(fp, "ConstantOfShape")
    assert outs == [F16]  # only read by fp16 math: produced in fp16 directly, no Cast
    no_redundant_casts(fp)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert_close_rel(run(m, {"x": x})["y"], run(fp, {"x": x})["y"], 1e-3)


def _decoder_like():
    """Past KV in, present out (Concat), logits out: the I/O shape of a Transformers.js decoder."""
    rng = np.random.default_rng(5)
    inits = [init("emb", rng.standard_normal((50, 8)).astype(np.float32)),
             init("wk", rng.standard_normal((8, 8)).astype(np.float32)),
             init("head", rng.standard_normal((8, 50)).astype(np.float32)),
             init("ax", np.array([1], np.int64))]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "wk"], ["k"]),
             helper.make_node("Unsqueeze", ["k", "ax"], ["k4"]),
             helper.make_node("Concat", ["past_key_values.0.key", "k4"], ["present.0.key"], axis=2),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]
    inputs = [vi("input_ids", I64, ["batch_size", "sequence_length"]),
              vi("past_key_values.0.key", F32, ["batch_size", 1, "past_sequence_length", 8])]
    outputs = [vi("logits", F32, ["batch_size", "sequence_length", 50]),
               vi("present.0.key", F32, ["batch_size", 1, "total_sequence_length", 8])]
    return make_model(nodes, inputs, outputs, inits, ir_version=8, check=True)


@pytest.mark.parametrize("opts,kv,logits", [({}, F16, F32), ({"keep_logits_fp32": False}, F16, F16),
                                            ({"keep_io_types": True}, F32, F32)])
def test_kv_io_fp16_and_logits_fp32(opts, kv, logits):
    m = _decoder_like()
    fp, details = convert(m, **opts)
    io = {v.name: v.type.tensor_type.elem_type for v in list(fp.graph.input) + list(fp.graph.output)}
    assert io["past_key_values.0.key"] == kv and io["present.0.key"] == kv and io["logits"] == logits
    assert io["input_ids"] == I64
    inits_out = {t.name: t.data_type for t in fp.graph.initializer}
    assert inits_out["emb"] == F16 and inits_out["head"] == F16
    no_redundant_casts(fp)
    feeds = {"input_ids": np.array([[1, 2, 3]], np.int64),
             "past_key_values.0.key": np.random.default_rng(6).standard_normal((1, 1, 2, 8))}
    ref, got = run(m, feeds), run(fp, feeds)
    assert got["present.0.key"].dtype == (np.float16 if kv == F16 else np.float32)
    assert got["logits"].dtype == (np.float16 if logits == F16 else np.float32)
    for k in ref:
        assert_close_rel(ref[k], got[k], 3e-3, k)


def test_fp32_ops_option_keeps_an_op_fp32():
    m = make_model([helper.make_node("Add", ["x", "x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                   [vi("x", F32, [4])], [vi("y", F32, [4])], ir_version=8, check=True)
    fp, details = convert(m, fp32_ops=["Add"], keep_io_types=True)
    (_, outs), = node_types(fp, "Add")
    assert outs == [F32]
    (_, outs), = node_types(fp, "Relu")
    assert outs == [F16]
    assert parse_spec("fp16(fp32_ops=Add|Mul)")[0].options.fp32_ops == ["Add", "Mul"]


def test_second_run_is_refused():
    fp, details = convert(_decoder_like())
    with pytest.raises(PreconditionError, match="already contains float16"):
        Fp16Pass()(fp)
    # also a graph that is float16 from the start
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", F16, [2])], [vi("y", F16, [2])],
                   ir_version=8, check=True)
    with pytest.raises(PreconditionError, match="already contains float16"):
        Fp16Pass()(m)


def test_integer_only_graph_is_not_applicable():
    m = make_model([helper.make_node("Add", ["a", "a"], ["b"])], [vi("a", I64, [2])], [vi("b", I64, [2])],
                   ir_version=8, check=True)
    res = Fp16Pass()(m)
    assert not res.modified and "not applicable" in res.summary


def test_input_model_is_not_modified():
    m = _decoder_like()
    before = m.SerializeToString()
    Fp16Pass()(m)
    assert m.SerializeToString() == before


# ------------------------------------------------------------------------------------------------
# end to end: the tiny Qwen2 (tests/tiny_decoder.py) exported with both torch exporters
# ------------------------------------------------------------------------------------------------
def _decoder_feeds(batch, seq, past, rng, left_pad=0):
    mask = np.ones((batch, past + seq), np.int64)
    if left_pad:
        mask[-1, :left_pad] = 0
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    feeds = {"input_ids": rng.integers(0, TINY["vocab_size"], (batch, seq)), "attention_mask": mask,
             "position_ids": pos[:, -seq:].astype(np.int64)}
    kv, head_dim = TINY["num_key_value_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    for i in range(TINY["num_hidden_layers"]):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = rng.standard_normal((batch, kv, past, head_dim)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_tiny_qwen2_end_to_end(tiny_decoder, exporter, tmp_path):
    from graphkit.ortrun import DecoderRunner, make_session
    m = tiny_decoder("qwen2", exporter).model()
    fp, details = convert(m)
    d = details
    assert d["norm_islands"] == 2 * 2 + 1 and d["softmax_islands"] == 2
    no_redundant_casts(fp)
    io = {v.name: v.type.tensor_type.elem_type for v in list(fp.graph.input) + list(fp.graph.output)}
    assert io["logits"] == F32 and io["present.1.value"] == F16 and io["past_key_values.0.key"] == F16

    rng = np.random.default_rng(7)
    agree = []
    for batch, seq, past, pad in [(1, 9, 0, 0), (2, 6, 0, 2), (2, 1, 7, 0), (3, 3, 4, 0)]:
        feeds = _decoder_feeds(batch, seq, past, rng, pad)
        ref, got = run(m, feeds), run(fp, feeds)
        for name in ref:
            r, g = ref[name], got[name].astype(np.float32)
            if pad:  # left-padded row: its pad positions are garbage (fully masked queries) in fp32 too
                if name == "logits":
                    r, g = r[:, pad:], g[:, pad:]
                else:
                    r, g = r[:, :, pad:], g[:, :, pad:]
            assert_close_rel(r, g, 1e-2, f"{exporter} {name} b{batch} s{seq} p{past}")
        agree.append(ref["logits"].argmax(-1) == got["logits"].argmax(-1))
    agreement = np.concatenate([a.ravel() for a in agree]).mean()
    assert agreement >= 0.9, agreement

    # Transformers.js-style run of the fp16 file: empty fp16 past, greedy decoding, finite logits
    path = tmp_path / "model_fp16.onnx"
    onnx.save(fp, path)
    runner = DecoderRunner(make_session(path))
    assert runner.empty_past(1)["past_key_values.0.key"].dtype == np.float16
    ids16, logits16 = runner.greedy([5, 17, 300, 42], 6)
    assert all(np.isfinite(x).all() for x in logits16)
    onnx.save(m, tmp_path / "model.onnx")
    ids32, _ = DecoderRunner(make_session(tmp_path / "model.onnx")).greedy([5, 17, 300, 42], 6)
    assert ids16[:2] == ids32[:2]


def test_pipeline_spec_with_q4f16(tiny_decoder):
    """matmul-nbits then fp16 through the pipeline (checker + strict type inference after each pass)."""
    m = tiny_decoder("qwen2", "torchscript").model()
    q4 = onnx.ModelProto()
    q4.CopyFrom(m)
    q4, _ = run_passes(q4, parse_spec("matmul-nbits"))
    out, reports = run_passes(onnx.load_from_string(q4.SerializeToString()), parse_spec("fp16"))
    assert reports[0].modified and "shapes ok" in reports[0].checked
    feeds = _decoder_feeds(2, 4, 3, np.random.default_rng(8))
    ref, got = run(q4, feeds)["logits"], run(out, feeds)["logits"]
    assert_close_rel(ref, got, 1e-2, "q4 vs q4f16")
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.85
