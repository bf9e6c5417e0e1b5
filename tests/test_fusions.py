"""fuse-rmsnorm, fuse-rotary, fuse-gqa: smallest hand-built graphs first (each run in onnxruntime and
compared with the unfused graph), then a tiny Qwen2 exported with both torch exporters (prefill,
decode with past, prefill with past, batch 2 with left padding; node counts before/after)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError, PassNotApplicable
from passes.fuse_rmsnorm import FuseRmsNormPass
from passes.fuse_gqa import FuseGqaPass
from passes.fuse_rotary import FuseRotaryPass
from passes.pack_gqa import PackGqaPass
from passes.pack_matmul import PackMatMulPass

F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
RNG = np.random.default_rng(7)


# ----------------------------------------------------------------------------- helpers
def _model(nodes, inputs, outputs, inits=None, opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def _sess(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, feeds):
    s = _sess(model)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _copy(model):
    return onnx.ModelProto.FromString(model.SerializeToString())


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _rel(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(1e-12, float(np.abs(want).max())))


# ============================================================================= fuse-rmsnorm
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
    m = _model(nodes, [_vi("x", F32, ["B", "S", H])], [_vi("y", F32, ["B", "S", H])], consts,
               opset=18 if axes_input else 17)
    x = (3 * RNG.standard_normal((2, 5, H))).astype(np.float32)
    want = _run(m, {"x": x})["y"]
    res = FuseRmsNormPass()(_copy(m))
    assert res.modified and res.details["plain"] == 1 and res.details["skip"] == 0
    assert _ops(res.model) == {"SimplifiedLayerNormalization": 1}
    assert not res.model.graph.initializer or {t.name for t in res.model.graph.initializer} == {"w"}
    got = _run(res.model, {"x": x})["y"]
    assert _rel(got, want) < 1e-5 and _rel(got, _rms_ref(x, consts["w"])) < 1e-5
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
    io = lambda n: _vi(n, F32, ["B", "S", H])  # noqa: E731
    m = _model(nodes, [io("a"), io("b")], [io("z"), io("h")], consts)
    feeds = {"a": RNG.standard_normal((2, 3, H)).astype(np.float32),
             "b": RNG.standard_normal((2, 3, H)).astype(np.float32)}
    want = _run(m, feeds)
    res = FuseRmsNormPass()(_copy(m))
    assert res.details["skip"] == 1
    assert _ops(res.model) == {"SkipSimplifiedLayerNormalization": 1, "Mul": 1}
    skip = next(n for n in res.model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert skip.domain == "com.microsoft" and list(skip.output) == ["y", "", "", "h"]
    got = _run(res.model, feeds)
    assert np.array_equal(got["h"], want["h"])
    assert _rel(got["z"], want["z"]) < 1e-5


def test_skip_rmsnorm_through_noop_cast_and_option_off():
    """TorchScript writes Cast(to=FLOAT) on the float residual; its readers move to the sum output."""
    H = 32
    nodes = [helper.make_node("Add", ["a", "b"], ["h"]), helper.make_node("Cast", ["h"], ["hc"], to=F32)]
    n2, consts = _rms_nodes("hc", "y", "n_", cast=F32, axes_input=False)
    nodes += n2 + [helper.make_node("Add", ["hc", "y"], ["z"])]
    consts["w"] = (1 + 0.3 * RNG.standard_normal(H)).astype(np.float32)
    io = lambda n: _vi(n, F32, ["B", "S", H])  # noqa: E731
    m = _model(nodes, [io("a"), io("b")], [io("z")], consts, opset=17)
    feeds = {"a": RNG.standard_normal((1, 4, H)).astype(np.float32),
             "b": RNG.standard_normal((1, 4, H)).astype(np.float32)}
    want = _run(m, feeds)["z"]
    res = FuseRmsNormPass()(_copy(m))
    assert _ops(res.model) == {"SkipSimplifiedLayerNormalization": 1, "Add": 1}
    assert _rel(_run(res.model, feeds)["z"], want) < 1e-5
    off = FuseRmsNormPass(skip=False)(_copy(m))
    assert _ops(off.model) == {"Add": 2, "SimplifiedLayerNormalization": 1}  # the no-op Cast goes too
    assert _rel(_run(off.model, feeds)["z"], want) < 1e-5


def test_rmsnorm_fp32_compute_fp16_weight():
    """HF in half precision: x up-cast to fp32, normalized, cast back to fp16, times the fp16 weight."""
    H = 64
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=F32)]
    n2, consts = _rms_nodes("x32", "y", "n_", cast=F16)
    nodes += n2
    consts["w"] = (1 + 0.3 * RNG.standard_normal(H)).astype(np.float16)
    m = _model(nodes, [_vi("x", F16, ["B", "S", H])], [_vi("y", F16, ["B", "S", H])], consts)
    x = (4 * RNG.standard_normal((2, 3, H))).astype(np.float16)
    want = _run(m, {"x": x})["y"]
    res = FuseRmsNormPass()(_copy(m))
    assert _ops(res.model) == {"Cast": 1, "SimplifiedLayerNormalization": 1}
    got = _run(res.model, {"x": x})["y"]
    assert got.dtype == np.float16 and _rel(got, want) < 2e-3  # one fp16 rounding less than the original


def test_skip_not_fused_for_bias_or_broadcast_add():
    H = 16
    nodes = [helper.make_node("Add", ["a", "bias"], ["h"])]
    n2, consts = _rms_nodes("h", "y", "n_")
    consts.update(w=np.ones(H, np.float32), bias=RNG.standard_normal(H).astype(np.float32))
    m = _model(nodes + n2, [_vi("a", F32, ["B", "S", H])], [_vi("y", F32, ["B", "S", H])], consts)
    res = FuseRmsNormPass()(_copy(m))
    assert _ops(res.model) == {"Add": 1, "SimplifiedLayerNormalization": 1}
    nodes = [helper.make_node("Add", ["a", "p"], ["h"])]
    m = _model(nodes + n2, [_vi("a", F32, ["B", "S", H]), _vi("p", F32, [1, "S", H])],
               [_vi("y", F32, ["B", "S", H])], consts)
    res = FuseRmsNormPass()(_copy(m))
    assert res.details["skip"] == 0 and "broadcast" in " ".join(res.details["not_fused"].values())


@pytest.mark.parametrize("breakage", ["exponent3", "axis0", "weight_input", "weight_2d", "keepdims0", "shared_inv"])
def test_rmsnorm_lookalikes_leave_graph_unchanged(breakage):
    H = 16
    nodes, consts = _rms_nodes("x", "y", "n_")
    consts["w"] = np.ones(H, np.float32)
    inputs = [_vi("x", F32, ["B", "S", H])]
    outputs = [_vi("y", F32, ["B", "S", H])]
    if breakage == "exponent3":
        consts["n_two"] = np.array(3.0, np.float32)
    elif breakage == "axis0":
        consts["n_axes"] = np.array([0], np.int64)
    elif breakage == "weight_input":
        del consts["w"]
        inputs.append(_vi("w", F32, [H]))
    elif breakage == "weight_2d":
        consts["w"] = np.ones((1, H), np.float32)
    elif breakage == "keepdims0":
        nodes[1] = helper.make_node("ReduceMean", ["n_sq", "n_axes"], ["n_mean"], keepdims=0)
    elif breakage == "shared_inv":
        outputs.append(_vi("n_inv", F32, None))
    m = _model(nodes, inputs, outputs, consts)
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


# ============================================================================= fuse-rotary
def _rotary_graph(D=16, N=3, *, torchscript_slices=False, interleaved=False, scaling=1.0, opset=18):
    """q [B, N, S, D] and position_ids [B, S] -> HF apply_rotary_pos_emb(q) as exported."""
    h = D // 2
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, D, 2, dtype=np.float32) / D))).astype(np.float32)
    c = {"inv_freq": inv_freq, "ax2": np.array([2], np.int64), "ax1": np.array([1], np.int64),
         "scaling": np.array(scaling, np.float32), "s0": np.array([0], np.int64), "sh": np.array([h], np.int64),
         "send": np.array([2**62], np.int64), "ax3": np.array([3], np.int64), "one": np.array([1], np.int64),
         "i3": np.array(3, np.int64), "two": np.array(2, np.int64), "ax0": np.array([0], np.int64)}
    nodes = [
        helper.make_node("Unsqueeze", ["position_ids", "ax2"], ["pu"]),
        helper.make_node("Cast", ["pu"], ["pf"], to=F32),
        helper.make_node("Mul", ["pf", "inv_freq"], ["freqs"]),
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
        helper.make_node("Cos", ["emb"], ["cos0"]), helper.make_node("Sin", ["emb"], ["sin0"]),
        helper.make_node("Mul", ["cos0", "scaling"], ["cos"]), helper.make_node("Mul", ["sin0", "scaling"], ["sin"]),
        helper.make_node("Unsqueeze", ["cos", "ax1"], ["C"]), helper.make_node("Unsqueeze", ["sin", "ax1"], ["S"]),
    ]
    if torchscript_slices:  # half = Shape(q)[3] / 2, as the TorchScript exporter computes it
        nodes += [helper.make_node("Shape", ["q"], ["qs"]), helper.make_node("Gather", ["qs", "i3"], ["qd"], axis=0),
                  helper.make_node("Div", ["qd", "two"], ["qh"]), helper.make_node("Unsqueeze", ["qh", "ax0"], ["qh1"])]
        half = "qh1"
    else:
        half = "sh"
    if interleaved:  # not rotate_half: swaps the wrong halves (a look-alike that must not fuse)
        nodes += [helper.make_node("Slice", ["q", "s0", half, "ax3", "one"], ["x1"]),
                  helper.make_node("Slice", ["q", half, "send", "ax3", "one"], ["x2"]),
                  helper.make_node("Neg", ["x1"], ["nx"]),
                  helper.make_node("Concat", ["nx", "x2"], ["rot"], axis=-1)]
    else:
        nodes += [helper.make_node("Slice", ["q", "s0", half, "ax3", "one"], ["x1"]),
                  helper.make_node("Slice", ["q", half, "send", "ax3", "one"], ["x2"]),
                  helper.make_node("Neg", ["x2"], ["nx"]),
                  helper.make_node("Concat", ["nx", "x1"], ["rot"], axis=-1)]
    nodes += [helper.make_node("Mul", ["q", "C"], ["qc"]), helper.make_node("Mul", ["S", "rot"], ["rs"]),
              helper.make_node("Add", ["rs", "qc"], ["out"])]
    return _model(nodes, [_vi("q", F32, ["B", N, "S", D]), _vi("position_ids", I64, ["B", "S"])],
                  [_vi("out", F32, ["B", N, "S", D])], c, opset=opset)


def _rotary_ref(q, pos, D, scaling=1.0):
    inv = (1.0 / (10000.0 ** (np.arange(0, D, 2, dtype=np.float32) / D))).astype(np.float32)
    f = pos[..., None].astype(np.float32) * inv
    emb = np.concatenate([f, f], -1)
    c, s = (np.cos(emb) * scaling)[:, None], (np.sin(emb) * scaling)[:, None]
    return q * c + np.concatenate([-q[..., D // 2:], q[..., :D // 2]], -1) * s


@pytest.mark.parametrize("torchscript_slices", [False, True])
def test_rotary_fuses_and_matches(torchscript_slices):
    D, N = 16, 3
    m = _rotary_graph(D, N, torchscript_slices=torchscript_slices, scaling=0.9)
    q = RNG.standard_normal((2, N, 5, D)).astype(np.float32)
    pos = np.array([[1, 1, 0, 1, 2], [3, 4, 5, 6, 700]], np.int64)  # left padding style + a large position
    want = _run(m, {"q": q, "position_ids": pos})["out"]
    res = FuseRotaryPass(max_positions=1024)(_copy(m))
    assert res.modified and res.details["fused"] == 1
    assert _ops(res.model) == {"RotaryEmbedding": 1}
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert sorted(inits) == ["rotary_cos_cache", "rotary_sin_cache"]
    assert inits["rotary_cos_cache"].shape == (1024, D // 2)
    got = _run(res.model, {"q": q, "position_ids": pos})["out"]
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(got - _rotary_ref(q, pos, D, 0.9)).max() < 1e-4  # vs float64-ish numpy (cos of 700 rad)
    with pytest.raises(Exception, match="out of range"):
        _run(res.model, {"q": q, "position_ids": pos + 1024})


def test_rotary_lookalike_not_fused():
    m = _rotary_graph(interleaved=True)
    before = m.SerializeToString()
    res = FuseRotaryPass(max_positions=64)(m)
    assert not res.modified and "rotate_half" in res.summary
    assert res.model.SerializeToString() == before
    with pytest.raises(GraphkitError):
        FuseRotaryPass(max_positions=0)


def test_rotary_needs_position_input():
    """cos/sin built from a constant position table (no graph input): nothing to look up by."""
    m = _rotary_graph()
    g = m.graph
    g.node[0].input[0] = "const_pos"
    g.initializer.append(numpy_helper.from_array(np.arange(5, dtype=np.int64)[None], "const_pos"))
    res = FuseRotaryPass(max_positions=64)(m)
    assert not res.modified and "position input" in res.summary


# ============================================================================= fuse-gqa
def _attn_graph(N=4, KV=2, H=8, hidden=16, mask="causal", scale_split=True):
    """One decoder attention block the way the exporters write it after fuse-rotary: projections,
    head split, RotaryEmbedding, past concat (present.* outputs), repeat_kv, scaled QK^T + mask bias
    (from attention_mask), softmax, PV, head merge."""
    from passes._graph import MS_DOMAIN
    rep = N // KV
    rng = np.random.default_rng(5)
    L = 64
    inv = (1.0 / (10000.0 ** (np.arange(0, H, 2, dtype=np.float32) / H))).astype(np.float32)
    ang = np.arange(L, dtype=np.float32)[:, None] * inv[None]
    c = {
        "Wq": (0.3 * rng.standard_normal((hidden, N * H))).astype(np.float32),
        "Wk": (0.3 * rng.standard_normal((hidden, KV * H))).astype(np.float32),
        "Wv": (0.3 * rng.standard_normal((hidden, KV * H))).astype(np.float32),
        "cos_cache": np.cos(ang).astype(np.float32), "sin_cache": np.sin(ang).astype(np.float32),
        "shape_q": np.array([0, 0, N, H], np.int64), "shape_kv": np.array([0, 0, KV, H], np.int64),
        "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": np.array([0], np.int64),
        "ax1": np.array([1], np.int64), "ax2": np.array([2], np.int64), "ax12": np.array([1, 2], np.int64),
        "sq": np.array(H ** -0.25, np.float32), "zero": np.array(0.0, np.float32),
        "neg": np.array(np.finfo(np.float32).min, np.float32), "win": np.array(2, np.int64),
        "rep_c": np.array([rep], np.int64), "kvh": np.array([KV], np.int64), "nh": np.array([N], np.int64),
        "hd": np.array([H], np.int64), "merge": np.array([0, 0, N * H], np.int64),
    }
    nd = helper.make_node
    nodes = [
        nd("MatMul", ["x", "Wq"], ["q_lin"]), nd("MatMul", ["x", "Wk"], ["k_lin"]),
        nd("MatMul", ["x", "Wv"], ["v_lin"]),
        nd("Reshape", ["q_lin", "shape_q"], ["q4"]), nd("Transpose", ["q4"], ["q_t"], perm=[0, 2, 1, 3]),
        nd("Reshape", ["k_lin", "shape_kv"], ["k4"]), nd("Transpose", ["k4"], ["k_t"], perm=[0, 2, 1, 3]),
        nd("Reshape", ["v_lin", "shape_kv"], ["v4"]), nd("Transpose", ["v4"], ["v_t"], perm=[0, 2, 1, 3]),
        nd("RotaryEmbedding", ["q_t", "position_ids", "cos_cache", "sin_cache"], ["q_rot"], domain=MS_DOMAIN),
        nd("RotaryEmbedding", ["k_t", "position_ids", "cos_cache", "sin_cache"], ["k_rot"], domain=MS_DOMAIN),
        nd("Concat", ["past_key_values.0.key", "k_rot"], ["present.0.key"], axis=-2),
        nd("Concat", ["past_key_values.0.value", "v_t"], ["present.0.value"], axis=-2),
    ]
    # repeat_kv: [B, KV, T, H] -> [B, KV, rep, T, H] -> [B, N, T, H]
    for w in ("key", "value"):
        src = f"present.0.{w}"
        nodes += [nd("Shape", [src], [f"{w}_shp"]),
                  nd("Slice", [f"{w}_shp", "ax0", "ax1", "ax0"], [f"{w}_b"]),
                  nd("Gather", [f"{w}_shp", "ax2"], [f"{w}_t"], axis=0),
                  nd("Unsqueeze", [src, "ax2"], [f"{w}_u"]),
                  nd("Concat", [f"{w}_b", "kvh", "rep_c", f"{w}_t", "hd"], [f"{w}_tgt"], axis=0),
                  nd("Expand", [f"{w}_u", f"{w}_tgt"], [f"{w}_e"]),
                  nd("Concat", [f"{w}_b", "nh", f"{w}_t", "hd"], [f"{w}_shape_rep"], axis=0),
                  nd("Reshape", [f"{w}_e", f"{w}_shape_rep"], [f"{w}_rep"])]
    nodes += [nd("Transpose", ["key_rep"], ["kT"], perm=[0, 1, 3, 2])]
    if scale_split:
        nodes += [nd("Mul", ["q_rot", "sq"], ["qs"]), nd("Mul", ["kT", "sq"], ["ks"]),
                  nd("MatMul", ["qs", "ks"], ["scores"])]
    else:
        c["scale"] = np.array(H ** -0.5, np.float32)
        nodes += [nd("MatMul", ["q_rot", "kT"], ["raw"]), nd("Mul", ["raw", "scale"], ["scores"])]
    # mask: causal (key j <= past + i) and attention_mask[b, j]
    nodes += [
        nd("Shape", ["attention_mask"], ["m_shape"]), nd("Gather", ["m_shape", "i1"], ["T"], axis=0),
        nd("Shape", ["x"], ["x_shape"]), nd("Gather", ["x_shape", "i1"], ["S"], axis=0),
        nd("Sub", ["T", "S"], ["P"]),
        nd("Range", ["i0", "S", "i1"], ["rows0"]), nd("Add", ["rows0", "P"], ["rows1"]),
        nd("Unsqueeze", ["rows1", "ax1"], ["rows"]),
        nd("Range", ["i0", "T", "i1"], ["cols0"]), nd("Unsqueeze", ["cols0", "ax0"], ["cols"]),
        nd("LessOrEqual", ["cols", "rows"], ["causal"]),
        nd("Cast", ["attention_mask"], ["mb"], to=TensorProto.BOOL), nd("Unsqueeze", ["mb", "ax12"], ["pad"]),
    ]
    if mask == "causal":
        nodes += [nd("And", ["causal", "pad"], ["allowed"])]
    elif mask == "window":  # sliding window of 2: a look-alike GQA must not take for plain causal
        nodes += [nd("Sub", ["rows", "win"], ["lo"]), nd("Greater", ["cols", "lo"], ["inwin"]),
                  nd("And", ["causal", "inwin"], ["cw"]), nd("And", ["cw", "pad"], ["allowed"])]
    else:  # bidirectional
        nodes += [nd("Identity", ["pad"], ["allowed"])]
    nodes += [
        nd("Where", ["allowed", "zero", "neg"], ["bias"]), nd("Add", ["scores", "bias"], ["masked"]),
        nd("Softmax", ["masked"], ["probs"], axis=-1),
        nd("MatMul", ["probs", "value_rep"], ["ctx"]), nd("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        nd("Reshape", ["ctx_t", "merge"], ["attn_out"]),
    ]
    inputs = [_vi("x", F32, ["batch_size", "sequence_length", hidden]),
              _vi("attention_mask", I64, ["batch_size", "total_sequence_length"]),
              _vi("position_ids", I64, ["batch_size", "sequence_length"]),
              _vi("past_key_values.0.key", F32, ["batch_size", KV, "past_sequence_length", H]),
              _vi("past_key_values.0.value", F32, ["batch_size", KV, "past_sequence_length", H])]
    outputs = [_vi("attn_out", F32, ["batch_size", "sequence_length", N * H]),
               _vi("present.0.key", F32, ["batch_size", KV, "total_sequence_length", H]),
               _vi("present.0.value", F32, ["batch_size", KV, "total_sequence_length", H])]
    g = helper.make_graph(nodes, "attn", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in c.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    m.ir_version = 8
    return m


def _attn_feeds(b, s, p, pads=(), hidden=16, KV=2, H=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, p + s), np.int64)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    pos = np.cumsum(mask, 1) - 1
    pos[mask == 0] = 1
    return {"x": rng.standard_normal((b, s, hidden)).astype(np.float32), "attention_mask": mask,
            "position_ids": pos[:, -s:], "past_key_values.0.key": rng.standard_normal((b, KV, p, H)).astype(np.float32),
            "past_key_values.0.value": rng.standard_normal((b, KV, p, H)).astype(np.float32)}


def _valid_rows(feeds):
    s = feeds["x"].shape[1]
    return feeds["attention_mask"][:, -s:] > 0  # [b, s] query positions that are real tokens


@pytest.mark.parametrize("scale_split", [True, False])
def test_gqa_smallest_block(scale_split):
    m = _attn_graph(scale_split=scale_split)
    res = FuseGqaPass()(_copy(m))
    assert res.modified, res.summary
    ops = _ops(res.model)
    assert ops["GroupQueryAttention"] == 1 and ops["RotaryEmbedding"] == 2 and "Softmax" not in ops
    assert "Concat" not in ops and "Expand" not in ops and "Transpose" not in ops
    gqa = next(n for n in res.model.graph.node if n.op_type == "GroupQueryAttention")
    a = {x.name: helper.get_attribute_value(x) for x in gqa.attribute}
    assert (a["num_heads"], a["kv_num_heads"], a["do_rotary"]) == (4, 2, 0)
    assert abs(a["scale"] - 8 ** -0.5) < 1e-7
    assert list(gqa.output) == ["attn_out", "present.0.key", "present.0.value"]
    ins = [i.name for i in res.model.graph.input]
    assert ins == [i.name for i in m.graph.input]  # I/O unchanged
    for b, s, p, pads in [(1, 5, 0, ()), (1, 1, 6, ()), (1, 3, 4, ()), (2, 4, 0, ()), (2, 1, 5, ())]:
        f = _attn_feeds(b, s, p, pads)
        want, got = _run(m, f), _run(res.model, f)
        for k in want:
            assert got[k].shape == want[k].shape
        assert np.abs(got["attn_out"] - want["attn_out"]).max() < 1e-5, (b, s, p)
        assert np.array_equal(got["present.0.key"], want["present.0.key"])
        assert np.array_equal(got["present.0.value"], want["present.0.value"])


def test_gqa_left_padding_seqlens_vs_bias():
    """padding=seqlens (genai style) is wrong for left-padded rows; padding=bias is exact."""
    m = _attn_graph()
    seq = FuseGqaPass()(_copy(m)).model
    bias = FuseGqaPass(padding="bias")(_copy(m)).model
    assert _ops(bias)["GroupQueryAttention"] == 1
    for s, p in [(5, 0), (1, 6)]:  # prefill with empty past, then one-token decode
        f = _attn_feeds(2, s, p, pads=(2, 0))
        valid = _valid_rows(f)
        want = _run(m, f)["attn_out"]
        got_b = _run(bias, f)["attn_out"]
        got_s = _run(seq, f)["attn_out"]
        assert np.abs(got_b - want)[valid].max() < 1e-5
        assert np.abs(got_s - want)[1].max() < 1e-5            # the unpadded row is exact
        assert np.abs(got_s - want)[0][valid[0]].max() > 1e-2  # the left-padded row is not
    # GQA refuses batch > 1 with S > 1 and a past (chunked prefill), whatever the mask mode
    with pytest.raises(Exception, match="batch_size must be 1"):
        _run(bias, _attn_feeds(2, 3, 2))


@pytest.mark.parametrize("mask", ["window", "bidirectional"])
def test_gqa_other_masks_not_fused(mask):
    m = _attn_graph(mask=mask)
    before = m.SerializeToString()
    res = FuseGqaPass()(m)
    assert not res.modified and "mask" in res.summary
    assert m.SerializeToString() == before


def test_gqa_needs_rotary_fused_first():
    m = _attn_graph()
    for n in m.graph.node:
        if n.op_type == "RotaryEmbedding":  # a rotary the pass does not know: plain Identity
            n.op_type, n.domain = "Identity", ""
            del n.input[1:]
    res = FuseGqaPass()(m)
    assert not res.modified and "fuse-rotary" in res.summary
    with pytest.raises(GraphkitError):
        FuseGqaPass(padding="left")


def _packed_attn(padding="bias", H=16):
    """_attn_graph after fuse-gqa + pack-matmul: Split -> 2 RotaryEmbedding -> GroupQueryAttention."""
    m = FuseGqaPass(padding=padding)(_attn_graph(H=H)).model
    res = PackMatMulPass()(m)
    assert res.modified and _ops(res.model)["Split"] == 1, res.summary
    return res.model


def _prefill_then_decode(model, pads, s=5, steps=2, seed=0):
    """attn_out and presents of a prefill from an empty past, then one-token steps fed the presents back."""
    f = _attn_feeds(len(pads), s, 0, pads, H=16, seed=seed)
    runs = [(f, _run(model, f))]
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        prev_f, prev = runs[-1]
        mask = np.concatenate([prev_f["attention_mask"], np.ones((len(pads), 1), np.int64)], 1)
        pos = (np.cumsum(mask, 1) - 1)[:, -1:]
        f = {"x": rng.standard_normal((len(pads), 1, 16)).astype(np.float32), "attention_mask": mask,
             "position_ids": pos, "past_key_values.0.key": prev["present.0.key"],
             "past_key_values.0.value": prev["present.0.value"]}
        runs.append((f, _run(model, f)))
    return runs


def test_pack_gqa_smallest_block():
    """One attention block: GQA reads the packed projection with do_rotary=1; outputs equal the graph before."""
    m = _packed_attn()
    res = PackGqaPass()(_copy(m))
    assert res.modified, res.summary
    ops = _ops(res.model)
    assert "Split" not in ops and "RotaryEmbedding" not in ops and ops["GroupQueryAttention"] == 1
    gqa = next(n for n in res.model.graph.node if n.op_type == "GroupQueryAttention")
    a = {x.name: helper.get_attribute_value(x) for x in gqa.attribute}
    assert (a["do_rotary"], a["rotary_interleaved"], a["num_heads"], a["kv_num_heads"]) == (1, 0, 4, 2)
    assert gqa.input[1] == gqa.input[2] == "" and gqa.input[7:9] == ["cos_cache", "sin_cache"]
    assert [i.name for i in res.model.graph.input] == [i.name for i in m.graph.input]
    for pads in [(0,), (0, 0)]:  # batch 1 and an unpadded batch: everything equal, presents included
        for (_, want), (_, got) in zip(_prefill_then_decode(m, pads), _prefill_then_decode(res.model, pads)):
            for k in want:
                assert np.abs(got[k] - want[k]).max() < 1e-5, (pads, k)


def test_pack_gqa_left_padding_exact_on_real_tokens():
    """Left padding (padding=bias): GQA rotates by the cache index, the graph before by position_ids; rotary
    is relative, so every real token's attention output is the same through prefill and decode."""
    m = _packed_attn()
    packed = PackGqaPass()(_copy(m)).model
    for (f, want), (_, got) in zip(_prefill_then_decode(m, (2, 0)), _prefill_then_decode(packed, (2, 0))):
        valid = _valid_rows(f)
        assert np.abs(got["attn_out"] - want["attn_out"])[valid].max() < 1e-5
        assert np.abs(got["present.0.value"] - want["present.0.value"]).max() < 1e-5
        assert np.abs(got["present.0.key"][1] - want["present.0.key"][1]).max() < 1e-5  # the unpadded row


def test_pack_gqa_lookalikes_left_alone():
    m = _packed_attn()
    # GQA's own rotary needs head_dim % 16 == 0 (onnxruntime refuses to run it otherwise)
    res = PackGqaPass()(_packed_attn(H=8))
    assert not res.modified and "multiple of 16" in res.summary
    # q/k/v not split from one tensor: nothing to pack, says which pass is missing
    res = PackGqaPass()(FuseGqaPass(padding="bias")(_attn_graph(H=16)).model)
    assert not res.modified and "pack-matmul" in res.summary
    # the q half of the split also read elsewhere (an output): the Split must stay
    extra = _copy(m)
    split = next(n for n in extra.graph.node if n.op_type == "Split")
    extra.graph.output.append(onnx.ValueInfoProto(name=split.output[0]))
    before = extra.SerializeToString()
    res = PackGqaPass()(extra)
    assert not res.modified and "other readers" in res.summary and extra.SerializeToString() == before
    # q and k rotated with different positions
    other = _copy(m)
    rot = [n for n in other.graph.node if n.op_type == "RotaryEmbedding"]
    other.graph.initializer.append(numpy_helper.from_array(np.zeros((64, 8), np.float32), "other_cos"))
    rot[1].input[2] = "other_cos"
    res = PackGqaPass()(other)
    assert not res.modified and "different positions or cos/sin" in res.summary
    # positions computed in the graph (an offset, say): GQA would rotate by cache index instead, so no
    shifted = _copy(m)
    shifted.graph.node.insert(0, helper.make_node("Identity", ["position_ids"], ["positions_in_graph"]))
    for n in shifted.graph.node:
        if n.op_type == "RotaryEmbedding":
            n.input[1] = "positions_in_graph"
    res = PackGqaPass()(shifted)
    assert not res.modified and "computed in the graph" in res.summary
    # already packed: a second run is not applicable and changes nothing
    once = PackGqaPass()(_copy(m)).model
    again = PackGqaPass()(once)
    assert not again.modified and again.summary.startswith("not applicable")


# ============================================================================= tiny exported models
TOL = 1e-4  # logits vs the unfused model (float32)
FUSIONS = {"rmsnorm": lambda: FuseRmsNormPass(), "rotary": lambda: FuseRotaryPass(max_positions=256),
           "gqa": lambda: FuseGqaPass(), "gqa-bias": lambda: FuseGqaPass(padding="bias"),
           "pack-matmul": lambda: PackMatMulPass(), "pack-gqa": lambda: PackGqaPass()}


@pytest.fixture(scope="module", params=["dynamo", "torchscript", "llama-torchscript"])
def tiny_export(request, tmp_path_factory):
    """A tiny random Qwen2 (norm weights and q/k/v biases perturbed, so the fused weights matter),
    exported with each torch exporter; plus a tiny Llama (no biases, untied head) via TorchScript."""
    import torch

    from conftest import build_tiny_model
    from graphkit.export import export_loaded
    from graphkit.hfmodel import load_causal_lm
    arch = "llama" if request.param.startswith("llama") else "qwen2"
    exporter = request.param.split("-")[-1]
    folder = build_tiny_model(tmp_path_factory.mktemp(arch) / "m", arch)
    model, _ = load_causal_lm(folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return request.param, export_loaded(model, exporter), model.config.num_hidden_layers


def _decoder_runs(model):
    """Logits (and presents) of the runs Transformers.js makes: batch 1 prefill + 3 decode steps,
    prefill after a past (S=3, P=4), batch 2 with left padding: prefill + 2 decode steps."""
    from graphkit.ortrun import DecoderRunner
    r = DecoderRunner(_sess(model))
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
    ops0 = _ops(model)
    m = _copy(model)
    summaries = []
    for step in chain:
        res = FUSIONS[step]()(m)
        assert res.modified, f"{name}: {step}: {res.summary}"
        assert not res.details.get("not_fused") or step == "rmsnorm", res.details["not_fused"]
        assert not res.details.get("not_packed"), res.details["not_packed"]
        summaries.append(res.summary)
        m = res.model
    ops = _ops(m)
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
    m = _copy(model)
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
    if name.startswith("llama"):
        pytest.skip("one architecture is enough here")
    m = _copy(model)
    for step in ("rmsnorm", "rotary", "gqa") + (("pack-matmul", "pack-gqa") if packed else ()):
        res = FUSIONS[step]()(m)
        assert res.modified, f"{step}: {res.summary}"
        m = res.model
    if variant == "q4f16":
        m = Fp16Pass()(MatMulNBitsPass()(m).model).model
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    kv = np.float16 if variant == "q4f16" else np.float32
    sess = _sess(m)
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


def test_rmsnorm_plain_off_is_checker_clean():
    """plain=false: only Skip norms (com.microsoft, which onnx.checker skips) are written."""
    H = 32
    nodes = [helper.make_node("Add", ["a", "b"], ["h"])]
    n1, c1 = _rms_nodes("a", "ya", "p_")
    n2, c2 = _rms_nodes("h", "y", "n_")
    consts = {**c1, **c2, "w": np.ones(H, np.float32)}
    io = lambda n: _vi(n, F32, ["B", "S", H])  # noqa: E731
    m = _model(nodes + n1 + n2, [io("a"), io("b")], [io("y"), io("ya")], consts)
    res = FuseRmsNormPass(plain=False)(_copy(m))
    ops = _ops(res.model)
    assert ops["SkipSimplifiedLayerNormalization"] == 1 and "SimplifiedLayerNormalization" not in ops
    assert ops["ReduceMean"] == 1
    onnx.checker.check_model(res.model)
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(FuseRmsNormPass()(_copy(m)).model)
