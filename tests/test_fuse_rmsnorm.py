"""fuse-rmsnorm: RMSNorm (and Add + RMSNorm) as the exporters write it -> (Skip)SimplifiedLayerNormalization,
on the smallest hand-built graphs, each run in onnxruntime and compared with the unfused graph. The pass on
the exported tiny decoder: tests/test_fusion_chains.py."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graph_helpers import copy_model, op_counts, rel_err, run_graph
from graphkit.errors import GraphkitError, PassNotApplicable
from passes.fuse_rmsnorm import FuseRmsNormPass
from tiny_decoder import make_model, vi

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
RNG = np.random.default_rng(7)


def _rms_nodes(x, y, prefix, *, square="pow", inv="reciprocal", axes_input=True, weight_first=True,
               cast=False, eps=1e-6, weight="w"):
    """HF Qwen2RMSNorm as the exporters write it, with the variations seen in the wild."""
    p = prefix
    nodes = []
    if square == "pow":
        nodes.append(helper.make_node("Pow", [x, f"{p}two"], [f"{p}sq"]))
    else:
        nodes.append(helper.make_node("Mul", [x, x], [f"{p}sq"]))
    if axes_input:
        nodes.append(helper.make_node("ReduceMean", [f"{p}sq", f"{p}axes"], [f"{p}mean"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", [f"{p}sq"], [f"{p}mean"], axes=[-1], keepdims=1))
    nodes.append(helper.make_node("Add", [f"{p}mean", f"{p}eps"], [f"{p}var"]))
    nodes.append(helper.make_node("Sqrt", [f"{p}var"], [f"{p}std"]))
    if inv == "reciprocal":
        nodes.append(helper.make_node("Reciprocal", [f"{p}std"], [f"{p}inv"]))
        nodes.append(helper.make_node("Mul", [x, f"{p}inv"], [f"{p}normed"]))
    elif inv == "div1":
        nodes.append(helper.make_node("Div", [f"{p}one", f"{p}std"], [f"{p}inv"]))
        nodes.append(helper.make_node("Mul", [f"{p}inv", x], [f"{p}normed"]))
    else:
        nodes.append(helper.make_node("Div", [x, f"{p}std"], [f"{p}normed"]))
    normed = f"{p}normed"
    if cast:
        nodes.append(helper.make_node("Cast", [normed], [f"{p}normed_c"], to=cast))
        normed = f"{p}normed_c"
    ins = [weight, normed] if weight_first else [normed, weight]
    nodes.append(helper.make_node("Mul", ins, [y]))
    consts = {f"{p}two": np.array(2.0, np.float32), f"{p}eps": np.array(eps, np.float32),
              f"{p}one": np.array(1.0, np.float32)}
    if axes_input:
        consts[f"{p}axes"] = np.array([-1], np.int64)
    return nodes, consts


def _rms_ref(x, w, eps=1e-6):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("inv", ["reciprocal", "div1", "divx"])
@pytest.mark.parametrize("axes_input,weight_first", [(True, True), (False, False)])
def test_rmsnorm_variants_fuse_to_one_node(square, inv, axes_input, weight_first):
    H = 48
    nodes, consts = _rms_nodes("x", "y", "n_", square=square, inv=inv, axes_input=axes_input,
                               weight_first=weight_first)
    consts["w"] = (1 + 0.3 * RNG.standard_normal(H)).astype(np.float32)
    m = make_model(nodes, [vi("x", F32, ["B", "S", H])], [vi("y", F32, ["B", "S", H])], consts,
               opset=18 if axes_input else 17, ir_version=8)
    x = (3 * RNG.standard_normal((2, 5, H))).astype(np.float32)
    want = run_graph(m, {"x": x})["y"]
    res = FuseRmsNormPass()(copy_model(m))
    assert res.modified and res.details["plain"] == 1 and res.details["skip"] == 0
    assert op_counts(res.model) == {"SimplifiedLayerNormalization": 1}
    assert not res.model.graph.initializer or {t.name for t in res.model.graph.initializer} == {"w"}
    got = run_graph(res.model, {"x": x})["y"]
    assert rel_err(got, want) < 1e-5 and rel_err(got, _rms_ref(x, consts["w"])) < 1e-5
    n = res.model.graph.node[0]
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    assert n.domain == "" and a["axis"] == -1 and a["stash_type"] == 1 and abs(a["epsilon"] - 1e-6) < 1e-12


def test_skip_rmsnorm_residual_keeps_its_name():
    """Add(a, b) -> norm, with the sum read further on (the residual stream) and a graph output."""
    H = 32
    nodes = [helper.make_node("Add", ["a", "b"], ["h"])]
    n2, consts = _rms_nodes("h", "y", "n_")
    nodes += n2 + [helper.make_node("Mul", ["h", "y"], ["z"])]  # the residual read after the norm
    consts["w"] = (1 + 0.3 * RNG.standard_normal(H)).astype(np.float32)
    io = lambda n: vi(n, F32, ["B", "S", H])  # noqa: E731
    m = make_model(nodes, [io("a"), io("b")], [io("z"), io("h")], consts, ir_version=8)
    feeds = {"a": RNG.standard_normal((2, 3, H)).astype(np.float32),
             "b": RNG.standard_normal((2, 3, H)).astype(np.float32)}
    want = run_graph(m, feeds)
    res = FuseRmsNormPass()(copy_model(m))
    assert res.details["skip"] == 1
    assert op_counts(res.model) == {"SkipSimplifiedLayerNormalization": 1, "Mul": 1}
    skip = next(n for n in res.model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert skip.domain == "com.microsoft" and list(skip.output) == ["y", "", "", "h"]
    got = run_graph(res.model, feeds)
    assert np.array_equal(got["h"], want["h"])
    assert rel_err(got["z"], want["z"]) < 1e-5


def test_skip_rmsnorm_through_noop_cast_and_option_off():
    """TorchScript writes Cast(to=FLOAT) on the float residual; its readers move to the sum output."""
    H = 32
    nodes = [helper.make_node("Add", ["a", "b"], ["h"]), helper.make_node("Cast", ["h"], ["hc"], to=F32)]
    n2, consts = _rms_nodes("hc", "y", "n_", cast=F32, axes_input=False)
    nodes += n2 + [helper.make_node("Add", ["hc", "y"], ["z"])]
    consts["w"] = (1 + 0.3 * RNG.standard_normal(H)).astype(np.float32)
    io = lambda n: vi(n, F32, ["B", "S", H])  # noqa: E731
    m = make_model(nodes, [io("a"), io("b")], [io("z")], consts, opset=17, ir_version=8)
    feeds = {"a": RNG.standard_normal((1, 4, H)).astype(np.float32),
             "b": RNG.standard_normal((1, 4, H)).astype(np.float32)}
    want = run_graph(m, feeds)["z"]
    res = FuseRmsNormPass()(copy_model(m))
    assert op_counts(res.model) == {"SkipSimplifiedLayerNormalization": 1, "Add": 1}
    assert rel_err(run_graph(res.model, feeds)["z"], want) < 1e-5
    off = FuseRmsNormPass(skip=False)(copy_model(m))
    assert op_counts(off.model) == {"Add": 2, "SimplifiedLayerNormalization": 1}  # the no-op Cast goes too
    assert rel_err(run_graph(off.model, feeds)["z"], want) < 1e-5


def test_rmsnorm_fp32_compute_fp16_weight():
    """HF in half precision: x up-cast to fp32, normalized, cast back to fp16, times the fp16 weight."""
    H = 64
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=F32)]
    n2, consts = _rms_nodes("x32", "y", "n_", cast=F16)
    nodes += n2
    consts["w"] = (1 + 0.3 * RNG.standard_normal(H)).astype(np.float16)
    m = make_model(nodes, [vi("x", F16, ["B", "S", H])], [vi("y", F16, ["B", "S", H])], consts, ir_version=8)
    x = (4 * RNG.standard_normal((2, 3, H))).astype(np.float16)
    want = run_graph(m, {"x": x})["y"]
    res = FuseRmsNormPass()(copy_model(m))
    assert op_counts(res.model) == {"Cast": 1, "SimplifiedLayerNormalization": 1}
    got = run_graph(res.model, {"x": x})["y"]
    assert got.dtype == np.float16 and rel_err(got, want) < 2e-3  # one fp16 rounding less than the original


def test_skip_not_fused_for_bias_or_broadcast_add():
    H = 16
    nodes = [helper.make_node("Add", ["a", "bias"], ["h"])]
    n2, consts = _rms_nodes("h", "y", "n_")
    consts.update(w=np.ones(H, np.float32), bias=RNG.standard_normal(H).astype(np.float32))
    m = make_model(nodes + n2, [vi("a", F32, ["B", "S", H])], [vi("y", F32, ["B", "S", H])], consts, ir_version=8)
    res = FuseRmsNormPass()(copy_model(m))
    assert op_counts(res.model) == {"Add": 1, "SimplifiedLayerNormalization": 1}
    nodes = [helper.make_node("Add", ["a", "p"], ["h"])]
    m = make_model(nodes + n2, [vi("a", F32, ["B", "S", H]), vi("p", F32, [1, "S", H])],
               [vi("y", F32, ["B", "S", H])], consts, ir_version=8)
    res = FuseRmsNormPass()(copy_model(m))
    assert res.details["skip"] == 0 and "broadcast" in " ".join(res.details["not_fused"].values())


@pytest.mark.parametrize("breakage", ["exponent3", "axis0", "weight_input", "weight_2d", "keepdims0", "shared_inv"])
def test_rmsnorm_lookalikes_leave_graph_unchanged(breakage):
    H = 16
    nodes, consts = _rms_nodes("x", "y", "n_")
    consts["w"] = np.ones(H, np.float32)
    inputs = [vi("x", F32, ["B", "S", H])]
    outputs = [vi("y", F32, ["B", "S", H])]
    if breakage == "exponent3":
        consts["n_two"] = np.array(3.0, np.float32)
    elif breakage == "axis0":
        consts["n_axes"] = np.array([0], np.int64)
    elif breakage == "weight_input":
        del consts["w"]
        inputs.append(vi("w", F32, [H]))
    elif breakage == "weight_2d":
        consts["w"] = np.ones((1, H), np.float32)
    elif breakage == "keepdims0":
        nodes[1] = helper.make_node("ReduceMean", ["n_sq", "n_axes"], ["n_mean"], keepdims=0)
    elif breakage == "shared_inv":
        outputs.append(vi("n_inv", F32, None))
    m = make_model(nodes, inputs, outputs, consts, ir_version=8)
    before = m.SerializeToString()
    res = FuseRmsNormPass()(m)
    assert not res.modified and res.summary.startswith("not applicable")
    assert res.model.SerializeToString() == before
    with pytest.raises(PassNotApplicable):
        FuseRmsNormPass().requires(m)


def test_rmsnorm_option_validation():
    with pytest.raises(GraphkitError):
        FuseRmsNormPass(skip="yes")
    with pytest.raises(GraphkitError):
        FuseRmsNormPass(nope=1)


def test_rmsnorm_plain_off_is_checker_clean():
    """plain=false: only Skip norms (com.microsoft, which onnx.checker skips) are written."""
    H = 32
    nodes = [helper.make_node("Add", ["a", "b"], ["h"])]
    n1, c1 = _rms_nodes("a", "ya", "p_")
    n2, c2 = _rms_nodes("h", "y", "n_")
    consts = {**c1, **c2, "w": np.ones(H, np.float32)}
    io = lambda n: vi(n, F32, ["B", "S", H])  # noqa: E731
    m = make_model(nodes + n1 + n2, [io("a"), io("b")], [io("y"), io("ya")], consts, ir_version=8)
    res = FuseRmsNormPass(plain=False)(copy_model(m))
    ops = op_counts(res.model)
    assert ops["SkipSimplifiedLayerNormalization"] == 1 and "SimplifiedLayerNormalization" not in ops
    assert ops["ReduceMean"] == 1
    onnx.checker.check_model(res.model)
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(FuseRmsNormPass()(copy_model(m)).model)
