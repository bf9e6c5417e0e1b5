"""matmul-nbits and passes._quant on the smallest hand-built graphs (no exported model here)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError, PassNotApplicable
from graphkit.passbase import coerce_option
from graphkit.pipeline import verify_graph
from passes._quant import dequantize_blockwise, quantize_blockwise, unpack_bits
from passes.matmul_nbits import MatMulNBitsPass
from tiny_decoder import make_model, vi

RNG = np.random.default_rng(1234)
F32 = TensorProto.FLOAT


# ----------------------------------------------------------------------------- helpers
def _single(K, N, bias=False, dtype=np.float32, rank=3, seed=0):
    """y = x @ W (+ b), x: [B, S, K]; W and b are initializers."""
    rng = np.random.default_rng(seed)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    W = rng.standard_normal((K, N)).astype(dtype)
    inits = {"W": W}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="/proj/MatMul")]
    out = "y"
    if bias:
        inits["b"] = rng.standard_normal(N).astype(dtype)
        nodes.append(helper.make_node("Add", ["y", "b"], ["z"], name="/proj/Add"))
        out = "z"
    xshape = ["B", "S", K] if rank == 3 else ["B", K]
    oshape = xshape[:-1] + [N]
    return make_model(nodes, [vi("x", t, xshape)], [vi(out, t, oshape)], inits, opset=17), inits


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _nbits_nodes(model):
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequant_node(model, node):
    a, ini = _attrs(node), _inits(model)
    zp = ini[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    return dequantize_blockwise(ini[node.input[1]], ini[node.input[2]], zp, a["bits"], a["block_size"], a["K"])


def _close(got, want, rtol=1e-4):
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got.astype(np.float64) - want).max() <= rtol * scale, np.abs(got - want).max()


# ----------------------------------------------------------------------------- _quant
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K,N,bs", [(96, 40, 16), (100, 33, 32), (300, 7, 128), (5, 3, 16), (64, 1, 32)])
def test_roundtrip_within_half_step(bits, symmetric, K, N, bs):
    W = (RNG.standard_normal((K, N)) * RNG.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    packed, scales, zp = quantize_blockwise(W, bits, bs, symmetric)
    kb = -(-K // bs)
    assert packed.shape == (N, kb, bs * bits // 8) and packed.dtype == np.uint8
    assert scales.shape == (N, kb) and scales.dtype == np.float32
    if symmetric:
        assert zp is None
    else:
        assert zp.shape == (N, -(-kb * bits // 8)) and zp.dtype == np.uint8
    D = dequantize_blockwise(packed, scales, zp, bits, bs, K)
    assert D.shape == (K, N) and D.dtype == np.float32
    s = np.repeat(scales.T, bs, axis=0)[:K]  # per-element (signed) scale, [K, N]
    err = np.abs(D - W)
    allowed = 0.5 * np.abs(s)
    if symmetric:
        # The positive side has one level fewer: values beyond 7.5 steps (127.5 for 8 bits) on the
        # side opposite to the block's largest magnitude clip to the last level (< 1 step error).
        top = (1 << (bits - 1)) - 0.5
        with np.errstate(divide="ignore", invalid="ignore"):
            clipped = np.where(s != 0, W / s, 0) > top - 1e-4
        allowed = np.where(clipped, np.abs(s), allowed)
        assert clipped.mean() < 0.1
    assert (err <= allowed * (1 + 1e-5) + 1e-12).all(), (err - allowed).max()


def test_symmetric_signed_scale_and_clipping():
    # Largest magnitude negative -> positive scale; largest positive -> negative scale (ORT's MLAS rule).
    W = np.zeros((32, 2), np.float32)
    W[:, 0] = np.linspace(-1.0, 0.5, 32)
    W[:, 1] = np.linspace(-0.5, 1.0, 32)
    packed, scales, _ = quantize_blockwise(W, 4, 32, True)
    assert scales[0, 0] == np.float32(1 / 8) and scales[1, 0] == np.float32(-1 / 8)
    q = unpack_bits(packed, 4)
    assert q[0, 0, 0] == 0 and q[1, 0, -1] == 0  # the extreme value maps to -8 (stored 0)
    # a +-x tie keeps the negative one: +x clips to level 7, one whole step off
    T = np.zeros((16, 1), np.float32)
    T[0, 0], T[1, 0] = 1.0, -1.0
    p, s, _ = quantize_blockwise(T, 4, 16, True)
    D = dequantize_blockwise(p, s, None, 4, 16, 16)
    assert D[1, 0] == -1.0 and D[0, 0] == np.float32(7 / 8)


def test_packing_layout_low_nibble_first():
    W = np.zeros((32, 1), np.float32)
    W[0, 0], W[1, 0], W[31, 0] = -8.0, 1.0, 7.0  # scale 1, q = w + 8
    packed, scales, _ = quantize_blockwise(W, 4, 32, True)
    assert scales[0, 0] == 1.0
    assert packed[0, 0, 0] == (0 | (9 << 4))  # element 0 low nibble, element 1 high nibble
    assert packed[0, 0, 15] >> 4 == 15 and packed[0, 0, 15] & 0xF == 8


def test_asymmetric_zero_point_packing_odd_blocks():
    W = RNG.standard_normal((80, 3)).astype(np.float32) + 0.7  # 3 blocks of 32 (last padded)
    _, _, zp = quantize_blockwise(W, 4, 32, False)
    assert zp.shape == (3, 2)
    assert (zp[:, 1] >> 4 == 8).all()  # unused slot: default zero point, as MLAS writes it


def test_all_zero_blocks_are_safe():
    W = RNG.standard_normal((64, 4)).astype(np.float32)
    W[:32, 1] = 0
    W[:, 3] = 0
    for bits in (4, 8):
        for sym in (True, False):
            p, s, zp = quantize_blockwise(W, bits, 32, sym)
            assert s[3, 0] == 0 and s[3, 1] == 0 and s[1, 0] == 0
            D = dequantize_blockwise(p, s, zp, bits, 32, 64)
            assert np.isfinite(D).all()
            assert (D[:32, 1] == 0).all() and (D[:, 3] == 0).all()


def test_float16_weights_keep_float16_scales():
    W = RNG.standard_normal((64, 8)).astype(np.float16)
    p, s, zp = quantize_blockwise(W, 4, 32, True)
    assert s.dtype == np.float16
    D = dequantize_blockwise(p, s, zp, 4, 32, 64)
    assert D.dtype == np.float16
    assert np.abs(D.astype(np.float32) - W.astype(np.float32)).max() <= np.abs(s).max() * 1.01


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weight_is_a_clear_error(bad):
    W = np.ones((32, 4), np.float32)
    W[5, 2] = bad
    with pytest.raises(GraphkitError, match=r"weight 'my\.w'.*non-finite.*\(5, 2\)"):
        quantize_blockwise(W, 4, 32, True, name="my.w")
    model, _ = _single(32, 4)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(W, "W"))
    before = model.SerializeToString()
    with pytest.raises(GraphkitError, match="weight 'W'"):
        MatMulNBitsPass()(model)
    assert model.SerializeToString() == before  # failed before touching the graph


# ----------------------------------------------------------------------------- ORT runs it
@pytest.mark.parametrize("bits,symmetric,bias,K,N,bs", [
    (4, True, False, 96, 40, 32),
    (4, True, True, 96, 40, 32),
    (4, False, True, 100, 33, 16),
    (8, True, False, 72, 17, 32),
    (8, False, True, 200, 9, 64),
    (4, True, True, 300, 20, 128),
])
def test_onnxruntime_matches_x_times_dequant(bits, symmetric, bias, K, N, bs):
    model, inits = _single(K, N, bias=bias)
    res = MatMulNBitsPass(bits=bits, symmetric=symmetric, block_size=bs)(model)
    assert res.modified and res.details["quantized"] == 1
    assert res.details["bias_folded"] == int(bias)
    out = verify_graph(res.model)[0]
    (node,) = _nbits_nodes(out)
    a = _attrs(node)
    assert node.domain == "com.microsoft" and "accuracy_level" not in a
    assert (a["K"], a["N"], a["bits"], a["block_size"]) == (K, N, bits, bs)
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits"]  # MatMul (+ Add) replaced
    assert "W" not in _inits(out)  # float weight dropped
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in out.opset_import)
    if bias:
        assert len(node.input) == 6 and node.input[5] == "b" and node.output[0] == "z"
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    (got,) = _run(out, {"x": x})
    want = x.astype(np.float64) @ _dequant_node(out, node).astype(np.float64)
    if bias:
        want = want + inits["b"]
    _close(got, want)


def test_accuracy_level_written_and_runs():
    model, _ = _single(64, 16, rank=2)
    out = MatMulNBitsPass(accuracy_level=1).call(model).model
    (node,) = _nbits_nodes(out)
    assert _attrs(node)["accuracy_level"] == 1
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    _close(_run(out, {"x": x})[0], x @ _dequant_node(out, node))


def test_float16_model_runs():
    model, _ = _single(64, 16, dtype=np.float16, rank=2)
    out = MatMulNBitsPass().call(model).model
    (node,) = _nbits_nodes(out)
    assert _inits(out)[node.input[2]].dtype == np.float16
    x = RNG.standard_normal((3, 64)).astype(np.float16)
    want = x.astype(np.float32) @ _dequant_node(out, node).astype(np.float32)
    _close(_run(out, {"x": x})[0].astype(np.float32), want, rtol=5e-3)


# ----------------------------------------------------------------------------- byte-equal to ORT
def _ort_quantize(model, **kw):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), **kw)
    q.process()
    return q.model.model


@pytest.mark.parametrize("K,N,bits,symmetric", [
    (96, 40, 4, True), (72, 24, 4, True), (128, 17, 4, True), (40, 5, 4, True),
    (96, 40, 4, False), (72, 24, 8, True), (100, 7, 8, False),
])
def test_byte_identical_to_onnxruntime_quantizer(K, N, bits, symmetric):
    model, _ = _single(K, N, seed=K + N)
    W = numpy_helper.to_array(model.graph.initializer[0]).copy()
    W[:, 0] = 0  # an all-zero column too
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(W, "W"))
    theirs = _ort_quantize(model, bits=bits, block_size=32, is_symmetric=symmetric)
    ours = MatMulNBitsPass(bits=bits, block_size=32, symmetric=symmetric).call(
        onnx.ModelProto.FromString(model.SerializeToString())).model
    (tn,), (on,) = _nbits_nodes(theirs), _nbits_nodes(ours)
    assert _attrs(tn) == _attrs(on)
    ti, oi = _inits(theirs), _inits(ours)
    assert len(tn.input) == len(on.input)
    for k in range(1, len(tn.input)):  # B, scales (, zero_points)
        a, b = ti[tn.input[k]], oi[on.input[k]]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape)
        assert a.tobytes() == b.tobytes(), k


def test_odd_K_differs_from_onnxruntime_only_in_its_unwritten_nibble():
    # MLAS never writes the high nibble of the last byte for odd K (it keeps a stale value);
    # we write 0. The op never reads it (it knows K).
    model, _ = _single(45, 6, seed=3)
    theirs = _ort_quantize(model, block_size=32, is_symmetric=True)
    ours = MatMulNBitsPass().call(onnx.ModelProto.FromString(model.SerializeToString())).model
    (tn,), (on,) = _nbits_nodes(theirs), _nbits_nodes(ours)
    a, b = _inits(theirs)[tn.input[1]], _inits(ours)[on.input[1]]
    assert _inits(theirs)[tn.input[2]].tobytes() == _inits(ours)[on.input[2]].tobytes()
    diff = np.argwhere(a != b)
    assert all(tuple(d[1:]) == (1, 6) for d in diff)  # block 1, byte (45-1-32)//2
    assert ((a ^ b) & 0x0F == 0).all()


# ----------------------------------------------------------------------------- graph handling
def _two_layer(shared=True, names=("/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul")):
    K = 32
    W1 = RNG.standard_normal((K, K)).astype(np.float32)
    inits = {"W1": W1}
    if not shared:
        inits["W2"] = RNG.standard_normal((K, K)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name=names[0]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W1" if shared else "W2"], ["y"], name=names[1])]
    return make_model(nodes, [vi("x", F32, ["B", K])], [vi("y", F32, ["B", K])], inits, opset=17), inits


def test_shared_weight_quantized_once():
    model, inits = _two_layer(shared=True)
    res = MatMulNBitsPass()(model)
    nodes = _nbits_nodes(res.model)
    assert len(nodes) == 2 and res.details["weights"] == 1 and res.details["quantized"] == 2
    assert nodes[0].input[1:] == nodes[1].input[1:]
    names = [t.name for t in res.model.graph.initializer]
    assert names == ["W1_Q4", "W1_scales"]
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    D = _dequant_node(res.model, nodes[0])
    _close(_run(res.model, {"x": x})[0], np.maximum(x @ D, 0) @ D)


def test_weight_read_by_another_op_is_kept():
    model, _ = _two_layer(shared=False)
    model.graph.node.append(helper.make_node("Identity", ["W2"], ["w2_out"]))
    model.graph.output.append(vi("w2_out", F32, [32, 32]))
    out = MatMulNBitsPass()(model).model
    names = {t.name for t in out.graph.initializer}
    assert "W2" in names and "W1" not in names


@pytest.mark.parametrize("opts,expected", [
    ({"exclude": ["*/down_proj/*"]}, {"/model/layers.0/mlp/up_proj/MatMul"}),
    ({"include": ["*down_proj*"]}, {"/model/layers.0/mlp/down_proj/MatMul"}),
    ({"include": ["/model/*"], "exclude": ["*up_proj*"]}, {"/model/layers.0/mlp/down_proj/MatMul"}),
])
def test_include_exclude_globs(opts, expected):
    model, _ = _two_layer(shared=False)
    res = MatMulNBitsPass(**opts)(model)
    done = {n.name[: -len("_Q4")] for n in _nbits_nodes(res.model)}
    assert done == expected
    (left,) = set(res.details["skipped"])
    assert left not in expected
    assert res.details["skipped"][left] in ("not matched by include", "matched by exclude")
    verify_graph(res.model)


def test_everything_excluded_is_not_applicable():
    model, _ = _two_layer()
    res = MatMulNBitsPass(exclude=["*"])(model)
    assert not res.modified and "not applicable" in res.summary


def test_constant_node_and_transposed_weights():
    K, N = 64, 24
    A = RNG.standard_normal((K, N)).astype(np.float32)
    Bt = RNG.standard_normal((N, K)).astype(np.float32)  # used as Transpose(Bt) = [K, N]
    nodes = [helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(A, "wc_value")),
             helper.make_node("MatMul", ["x", "wc"], ["y1"], name="mm_const"),
             helper.make_node("Transpose", ["Bt"], ["bt_T"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "bt_T"], ["y2"], name="mm_transposed")]
    model = make_model(nodes, [vi("x", F32, ["B", K])], [vi("y1", F32, ["B", N]), vi("y2", F32, ["B", N])], {"Bt": Bt},
                       opset=17)
    res = MatMulNBitsPass()(model)
    out = verify_graph(res.model)[0]
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits", "MatMulNBits"]
    assert {t.name for t in out.graph.initializer} == {"wc_Q4", "wc_scales", "Bt_T_Q4", "Bt_T_scales"}
    x = RNG.standard_normal((3, K)).astype(np.float32)
    y1, y2 = _run(out, {"x": x})
    n1, n2 = _nbits_nodes(out)
    _close(y1, x @ _dequant_node(out, n1))
    _close(y2, x @ _dequant_node(out, n2))
    assert np.abs(_dequant_node(out, n2) - Bt.T).max() <= np.abs(_inits(out)["Bt_T_scales"]).max()


def test_bias_not_folded_when_matmul_output_has_other_readers():
    model, _ = _single(64, 8, bias=True)
    model.graph.output.append(vi("y", F32, ["B", "S", 8]))
    out = MatMulNBitsPass()(model)
    assert out.details["bias_folded"] == 0
    assert [n.op_type for n in out.model.graph.node] == ["MatMulNBits", "Add"]
    model, _ = _single(64, 8, bias=True)
    out = MatMulNBitsPass(fold_bias=False)(model)
    assert [n.op_type for n in out.model.graph.node] == ["MatMulNBits", "Add"]


def test_min_elements_and_non_constant_b_reported():
    model, _ = _two_layer(shared=False)
    model.graph.node.append(helper.make_node("MatMul", ["x", "x_T"], ["xx"], name="dyn"))
    model.graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_T"]))
    model.graph.output.append(vi("xx", F32, ["B", "B"]))
    res = MatMulNBitsPass()(model)
    assert res.details["skipped"] == {"dyn": "B is not a constant weight"}
    res = MatMulNBitsPass(min_elements=32 * 32 + 1)(_two_layer()[0])
    assert not res.modified and "min_elements" in res.summary


def test_not_applicable_without_eligible_matmul():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="dyn")]
    model = make_model(nodes, [vi("a", F32, [2, 3]), vi("b", F32, [3, 4])], [vi("y", F32, [2, 4])], {}, opset=17)
    p = MatMulNBitsPass()
    with pytest.raises(PassNotApplicable, match="no MatMul with a constant"):
        p.requires(model)
    res = p(model)
    assert not res.modified and res.model is model
    # an already-quantized graph: nothing left to do, not a crash
    once = MatMulNBitsPass()(_single(64, 8)[0]).model
    again = MatMulNBitsPass()(once)
    assert not again.modified and "1 MatMulNBits already present" in again.summary


@pytest.mark.parametrize("kw,match", [
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"bits": 2}, "bits must be 4 or 8"),
    ({"block_size": 24}, "block_size"),
    ({"block_size": 8}, "block_size"),
    ({"block_size": 512}, "block_size"),
    ({"accuracy_level": 7}, "accuracy_level"),
    ({"lm_head": "16"}, "lm_head"),
    ({"include": [1]}, "include"),
    ({"min_elements": -1}, "min_elements"),
    ({"blocksize": 32}, "unknown option"),
])
def test_invalid_options(kw, match):
    with pytest.raises(GraphkitError, match=match):
        MatMulNBitsPass(**kw)


def test_option_coercion_from_spec_text():
    assert coerce_option(MatMulNBitsPass, "lm_head", "8") == "8"
    assert coerce_option(MatMulNBitsPass, "accuracy_level", "none") is None
    assert coerce_option(MatMulNBitsPass, "exclude", "*lm_head*|*/down_proj/*") == ["*lm_head*", "*/down_proj/*"]
    with pytest.raises(GraphkitError):
        coerce_option(MatMulNBitsPass, "lm_head", "16")
    assert MatMulNBitsPass(lm_head=8).options.lm_head == "8"


# ----------------------------------------------------------------------------- tied lm_head
V, H = 200, 64


def _tied(form: str):
    """ids -> Gather(E) -> MatMul(h, Wproj) -> lm_head MatMul -> logits.

    form: 'shared' (head reads Transpose(E)), 'duplicate' (head reads a separate E.T initializer).
    """
    E = RNG.standard_normal((V, H)).astype(np.float32)
    P = RNG.standard_normal((H, H)).astype(np.float32)
    inits = {"embed.weight": E, "proj": P}
    nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["h0"], name="/embed_tokens/Gather"),
             helper.make_node("MatMul", ["h0", "proj"], ["h"], name="/layers.0/proj/MatMul")]
    if form == "shared":
        nodes.append(helper.make_node("Transpose", ["embed.weight"], ["embed_T"], perm=[1, 0]))
        head_w = "embed_T"
    else:
        inits["onnx::MatMul_99"] = np.ascontiguousarray(E.T)
        head_w = "onnx::MatMul_99"
    nodes.append(helper.make_node("MatMul", ["h", head_w], ["logits"], name="/lm_head/MatMul"))
    model = make_model(nodes, [vi("ids", TensorProto.INT64, ["B", "S"])], [vi("logits", F32, ["B", "S", V])], inits,
                       opset=17)
    return model, E, P


def _check_runs(model, E, P):
    ids = RNG.integers(0, V, (2, 5)).astype(np.int64)
    nodes = {n.name: n for n in model.graph.node}
    Pd = _dequant_node(model, nodes["/layers.0/proj/MatMul_Q4"])
    head = nodes.get("/lm_head/MatMul_Q8") or nodes.get("/lm_head/MatMul_Q4")
    Hd = _dequant_node(model, head) if head is not None else E.T
    (got,) = _run(model, {"ids": ids})
    _close(got, (E[ids] @ Pd) @ Hd)
    return head


def test_tied_shared_head_stays_float_by_default():
    model, E, P = _tied("shared")
    res = MatMulNBitsPass()(model)
    out = verify_graph(res.model)[0]
    assert res.details["quantized"] == 1
    reason = res.details["skipped"]["/lm_head/MatMul"]
    assert "Gather '/embed_tokens/Gather'" in reason and "kept float" in reason and "add bytes" in reason
    assert res.details["lm_head"] == {"/lm_head/MatMul": reason}
    assert {"embed.weight"} <= {t.name for t in out.graph.initializer}
    assert _check_runs(out, E, P) is None


def test_tied_shared_head_only_is_not_applicable():
    model, _, _ = _tied("shared")
    res = MatMulNBitsPass(exclude=["*proj*"])(model)
    assert not res.modified and "tied lm_head" in res.summary


@pytest.mark.parametrize("form,policy,bits", [
    ("shared", "8", 8), ("shared", "4", 4),
    ("duplicate", "auto", 8), ("duplicate", "4", 4), ("duplicate", "8", 8),
])
def test_tied_head_quantized_per_option(form, policy, bits):
    model, E, P = _tied(form)
    res = MatMulNBitsPass(lm_head=policy)(model)
    out = verify_graph(res.model)[0]
    assert res.details["quantized"] == 2
    note = res.details["lm_head"]["/lm_head/MatMul"]
    assert f"quantized to {bits} bits" in note
    assert ("duplicates" in note) == (form == "duplicate")
    head = _check_runs(out, E, P)
    assert _attrs(head)["bits"] == bits
    names = {t.name for t in out.graph.initializer}
    assert "embed.weight" in names  # the Gather still needs it
    assert "onnx::MatMul_99" not in names  # a duplicate float copy is gone
    assert all(n.op_type != "Transpose" for n in out.graph.node)


def test_tied_duplicate_head_kept_float_with_keep():
    model, E, P = _tied("duplicate")
    res = MatMulNBitsPass(lm_head="keep")(model)
    assert "lm_head=keep" in res.details["skipped"]["/lm_head/MatMul"]
    assert _check_runs(verify_graph(res.model)[0], E, P) is None


def test_untied_head_is_an_ordinary_matmul():
    model, E, P = _tied("duplicate")
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(
        np.ascontiguousarray(E.T) + np.float32(1e-3), "onnx::MatMul_99"))
    res = MatMulNBitsPass()(model)
    assert res.details["lm_head"] == {} and res.details["quantized"] == 2
    assert {_attrs(n)["bits"] for n in _nbits_nodes(res.model)} == {4}


def test_runs_from_a_pipeline_spec():
    from graphkit.pipeline import parse_spec, run_passes
    (p,) = parse_spec("matmul-nbits(bits=8, block_size=16, symmetric=false, accuracy_level=4, "
                      "lm_head=keep, exclude=*down_proj*|*nothing*)")
    assert (p.options.bits, p.options.block_size, p.options.symmetric, p.options.accuracy_level) == (8, 16, False, 4)
    assert p.options.exclude == ["*down_proj*", "*nothing*"]
    model, _ = _two_layer(shared=False)
    out, (rep,) = run_passes(model, [p])
    assert rep.modified and rep.checked == "checker ok, shapes ok"
    (node,) = _nbits_nodes(out)
    assert _attrs(node)["accuracy_level"] == 4 and len(node.input) == 4  # zero points present


def test_weight_and_bias_through_identity():
    # the torchscript exporter deduplicates equal initializers (e.g. zero biases) through Identity
    K, N = 64, 16
    S = RNG.standard_normal((N, K)).astype(np.float32)  # stored [N, K]; the MatMul reads S.T
    b = RNG.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("Identity", ["S"], ["S_id"]),
             helper.make_node("Transpose", ["S_id"], ["S_T"], perm=[1, 0]),
             helper.make_node("Identity", ["S_T"], ["S_T_id"]),
             helper.make_node("MatMul", ["x", "S_T_id"], ["y"], name="mm"),
             helper.make_node("Identity", ["b"], ["b_id"]),
             helper.make_node("Add", ["b_id", "y"], ["z"], name="add")]
    model = make_model(nodes, [vi("x", F32, ["B", K])], [vi("z", F32, ["B", N])], {"S": S, "b": b}, opset=17)
    res = MatMulNBitsPass()(model)
    out = verify_graph(res.model)[0]
    assert [n.op_type for n in out.graph.node] == ["Identity", "MatMulNBits"]  # the bias Identity stays
    assert res.details["bias_folded"] == 1
    assert res.details["removed"] == ["S", "S_T", "S_T_id", "S_id"]
    (node,) = _nbits_nodes(out)
    assert node.input[1] == "S_T_Q4" and node.input[5] == "b_id"
    x = RNG.standard_normal((3, K)).astype(np.float32)
    _close(_run(out, {"x": x})[0], x @ _dequant_node(out, node) + b)
