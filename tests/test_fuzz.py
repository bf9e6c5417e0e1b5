"""Property tests: random small *valid* MatMul graphs through every weight pass.

For each generated graph a pass must either

* apply, and then every rewritten layer's output stays within the error bound derived below from the
  pass's documented tolerance (compared with ``a @ W + b`` in float64, where ``a`` is the layer's
  actual input as onnxruntime computed it), and no output is NaN/inf where the float64 reference is
  finite and representable; or
* refuse with a :class:`GraphkitError` (never another exception type). Weights with inf/NaN must be
  refused by the quantizing passes, naming the weight.

Graphs: a chain of 1-3 ``MatMul`` layers with constant weights of random shapes (K below the block
size, K not a multiple of it, odd N, 1-wide dims), each layer's output also a graph output (so each
layer can be checked on its real input), optional constant bias ``Add``, weights stored as an
initializer, a ``Constant`` node or ``Transpose`` of a ``[N, K]`` initializer, weights shared by a
"twin" MatMul and, for square layers, by a later layer. Weight values: normal, tiny (1e-30), huge
(1e30), all zeros, constant, one-hot, outliers, per-column mixed magnitudes, exact rounding ties;
optionally poisoned with inf/NaN.

Size: ``GRAPHKIT_FUZZ_EXAMPLES`` examples per property (default 25, derandomized so CI is
reproducible; setting the variable switches to random exploration).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError
from graphkit.pipeline import parse_spec, run_passes
from tiny_decoder import make_model, matmul_model, vi

_ENV = os.environ.get("GRAPHKIT_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_ENV) if _ENV else 25,
    deadline=None,
    derandomize=_ENV is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

U32 = 2.0 ** -24          # float32 unit roundoff
U16 = 2.0 ** -11          # float16 unit roundoff
FP16_MAX = 65504.0
FP32_MAX = float(np.finfo(np.float32).max)
# absolute slack per rounding near zero: float32 subnormals / flush-to-zero, float16 subnormals
ABS32 = 2.0 ** -126
ABS16 = 2.0 ** -24

DIMS = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 127, 129, 255, 257]),
                 st.integers(1, 300))
WEIGHT_KINDS = ["normal", "tiny", "huge", "zeros", "constant", "onehot", "outliers", "mixed_columns", "ties"]


# ------------------------------------------------------------------------------------------ graphs

@dataclass
class Layer:
    W: np.ndarray            # [K, N] float32, as MatMul's B
    b: np.ndarray | None     # [N] float32
    inp: str
    out: str
    weight: str              # name of the tensor holding the weight data (initializer or Constant output)


@dataclass
class Case:
    model: onnx.ModelProto
    layers: list[Layer]
    x: np.ndarray
    poisoned: set[str] = field(default_factory=set)

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        parts = [f"{layer.inp}->{layer.out} W{list(layer.W.shape)}[{layer.weight}]"
                 f"{' +b' if layer.b is not None else ''}" for layer in self.layers]
        return f"Case(x{list(self.x.shape)}, {'; '.join(parts)}, poisoned={sorted(self.poisoned)})"


def _weights(rng: np.random.Generator, kind: str, K: int, N: int) -> np.ndarray:
    if kind == "normal":
        w = rng.standard_normal((K, N))
    elif kind == "tiny":
        w = rng.standard_normal((K, N)) * 1e-30
    elif kind == "huge":
        w = rng.standard_normal((K, N)) * 1e30
    elif kind == "zeros":
        w = np.zeros((K, N))
    elif kind == "constant":
        w = np.full((K, N), rng.choice([-3.0, 0.5, 7.0]))
    elif kind == "onehot":
        w = np.zeros((K, N))
        w[rng.integers(K), rng.integers(N)] = rng.choice([-1.0, 1.0]) * 10.0 ** rng.integers(-3, 4)
    elif kind == "outliers":
        w = rng.standard_normal((K, N)) * 0.02
        idx = rng.integers(0, K * N, size=max(1, K * N // 50))
        w.flat[idx] = rng.choice([-1, 1], size=len(idx)) * 1e3
    elif kind == "mixed_columns":  # per-column scales over 60 orders of magnitude
        w = rng.standard_normal((K, N)) * (10.0 ** rng.integers(-30, 31, size=N))[None, :]
    elif kind == "ties":  # integers and halves: exact rounding ties for every scheme
        w = rng.integers(-16, 17, size=(K, N)) / 2.0
    else:
        raise AssertionError(kind)
    return w.astype(np.float32)


@st.composite
def cases(draw, poison: bool = True) -> Case:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rank = draw(st.sampled_from([2, 3]))
    lead = [draw(st.integers(1, 3))] + ([draw(st.integers(1, 3))] if rank == 3 else [])
    sym = ["batch_size"] + (["sequence_length"] if rank == 3 else [])
    K0 = draw(DIMS)
    n_layers = draw(st.integers(1, 3))

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    layers: list[Layer] = []
    weights: list[tuple[str, np.ndarray]] = []   # distinct weights, for sharing
    poisoned: set[str] = set()

    def new_weight(i: int, K: int, N: int) -> tuple[str, np.ndarray]:
        kind = draw(st.sampled_from(WEIGHT_KINDS))
        W = _weights(rng, kind, K, N)
        name = f"w{i}"
        if poison and draw(st.integers(0, 5)) == 0:
            for _ in range(draw(st.integers(1, 3))):
                W[rng.integers(K), rng.integers(N)] = rng.choice([np.inf, -np.inf, np.nan])
            poisoned.add(name)
        storage = draw(st.sampled_from(["initializer", "initializer", "constant", "transpose"]))
        if storage == "initializer":
            inits.append(numpy_helper.from_array(W, name))
            ref = name
        elif storage == "constant":
            nodes.append(helper.make_node("Constant", [], [name], name=f"const_{i}",
                                          value=numpy_helper.from_array(W, name)))
            ref = name
        else:  # the float data is stored [N, K]; MatMul reads Transpose(perm=[1, 0]) of it
            inits.append(numpy_helper.from_array(np.ascontiguousarray(W.T), name))
            ref = f"{name}_T"
            nodes.append(helper.make_node("Transpose", [name], [ref], name=f"transpose_{i}", perm=[1, 0]))
        weights.append((ref, W))
        return ref, W

    def add_layer(i: int, inp: str, K: int, shared: tuple[str, np.ndarray] | None = None,
                  out_name: str | None = None) -> tuple[str, int]:
        if shared is not None:
            ref, W = shared
        else:
            ref, W = new_weight(i, K, draw(DIMS))
        N = W.shape[1]
        mm = f"mm{i}_out"
        nodes.append(helper.make_node("MatMul", [inp, ref], [mm], name=f"mm{i}"))
        out = mm
        b = None
        if draw(st.booleans()):
            b = (rng.standard_normal(N) * draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3]))).astype(np.float32)
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            out = out_name or f"y{i}"
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [out], name=f"add{i}"))
        elif out_name:
            nodes[-1].output[0] = out = out_name
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, sym + [N]))
        base = (ref, W) if shared is None else shared
        layers.append(Layer(W, b, inp, out, base[0].removesuffix("_T")))
        return out, N

    cur, width = "x", K0
    for i in range(n_layers):
        share = None
        square = [w for w in weights if w[1].shape == (width, width)]
        if square and draw(st.integers(0, 3)) == 0:
            share = draw(st.sampled_from(square))
        cur, width = add_layer(i, cur, width, shared=share)
    if draw(st.integers(0, 3)) == 0:  # a twin MatMul on x sharing the first weight
        add_layer(n_layers, "x", K0, shared=weights[0], out_name="twin")

    model = make_model(nodes, [vi("x", TensorProto.FLOAT, sym + [K0])], outputs, inits, opset=17, ir_version=8,
                       name="fuzz", check=True)

    x_kind = draw(st.sampled_from(["normal", "normal", "small", "large", "zeros", "positive"]))
    x = rng.standard_normal(lead + [K0])
    x = {"normal": x, "small": x * 1e-3, "large": x * 100, "zeros": x * 0, "positive": np.abs(x)}[x_kind]
    x = x.astype(np.float16).astype(np.float32)  # exactly representable for the fp16 variants too
    return Case(model, layers, x, poisoned)


# ------------------------------------------------------------------------------------------ running

def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x_type = sess.get_inputs()[0].type
    feed = {"x": x.astype(np.float16 if x_type == "tensor(float16)" else np.float32)}
    names = [o.name for o in sess.get_outputs()]
    return {n: np.asarray(v) for n, v in zip(names, sess.run(None, feed))}


def _apply(case: Case, spec: str) -> tuple[onnx.ModelProto | None, GraphkitError | None]:
    """Run the passes; a GraphkitError is a refusal, any other exception fails the test."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    try:
        out, _ = run_passes(model, parse_spec(spec))
    except GraphkitError as exc:
        return None, exc
    return out, None


def _check_layers(case: Case, outs: dict[str, np.ndarray], bound, limit: float) -> None:
    """Every layer on its actual input: finite where the reference is, and within ``bound``."""
    for layer in case.layers:
        a = (case.x if layer.inp == "x" else outs[layer.inp]).astype(np.float64)
        y = outs[layer.out].astype(np.float64)
        if not np.isfinite(a).all():
            continue  # the layer before overflowed its dtype: this layer is not comparable
        W = layer.W.astype(np.float64)
        with np.errstate(all="ignore"):
            ref = a @ W + (0 if layer.b is None else layer.b.astype(np.float64))
            mag = np.abs(a) @ np.where(np.isfinite(W), np.abs(W), 0) + (0 if layer.b is None else np.abs(layer.b))
        err_bound = bound(a, layer)
        # comparable: the exact result, every partial sum and the documented error bound are representable in
        # the output dtype (an allowed error beyond the dtype's range, e.g. int8 with per-tensor scales over
        # 1e28-sized activations, where s_x * s_w overflows, makes the value meaningless, NaN included)
        ok = np.isfinite(ref) & (mag < limit) & (err_bound < limit)
        bad_nan = ok & ~np.isfinite(y)
        assert not bad_nan.any(), (f"{layer.out}: {int(bad_nan.sum())} non-finite outputs where the float64 "
                                   f"reference is finite, e.g. {y[bad_nan][:3]} vs {ref[bad_nan][:3]}")
        with np.errstate(all="ignore"):
            err = np.abs(y - ref)
        over = ok & (err > err_bound)
        if over.any():
            i = np.argwhere(over)[0]
            raise AssertionError(f"{layer.out}{list(i)}: |error| {err[tuple(i)]:.6g} > bound "
                                 f"{err_bound[tuple(i)]:.6g} (ref {ref[tuple(i)]:.6g}, got {y[tuple(i)]:.6g}); "
                                 f"{int(over.sum())} element(s) over")


def _float_slack(a: np.ndarray, Wabs: np.ndarray, b, K: int, u: float, tiny: float) -> np.ndarray:
    """Rounding of a length-K dot product (+ bias) in unit roundoff ``u``: gamma_{K+2} * sum |a||W|."""
    mag = np.abs(a) @ Wabs + (0 if b is None else np.abs(b.astype(np.float64)))
    return (K + 2) * u / (1 - (K + 2) * u) * mag + (K + 2) * tiny


def _expect_refusal(case: Case, exc: GraphkitError | None, spec: str) -> None:
    assert exc is not None, f"{spec} quantized weights with inf/NaN ({sorted(case.poisoned)}) instead of refusing"
    msg = str(exc)
    assert "\n" not in msg.strip()
    assert "non-finite" in msg and any(f"'{p}'" in msg for p in case.poisoned), msg


# ------------------------------------------------------------------------------------------ matmul-nbits

def nbits_weight_error(W: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """Per-element bound on |dequant(W) - W|, as documented (passes/_quant.py, matmul-nbits tolerance).

    Blocks of ``block_size`` along K, per column; step = |scale| of the block. Symmetric: step =
    |m| / 2^(bits-1), m the block's value of largest magnitude (with its sign, ties to the minimum); error
    <= step/2, except elements of sign opposite to m and magnitude above (2^(bits-1) - 1/2) * step, which
    clip to the last level: <= one step. Asymmetric: step = (max(W_block, 0) - min(W_block, 0)) /
    (2^bits - 1), error <= step/2. Float32 slack: the scale is rounded to float32 and w * (1/scale) is
    computed in float32, which can move a value lying on a rounding tie: + 2^bits * step * 2^-22.
    """
    K, N = W.shape
    kb = -(-K // block_size)
    Wp = np.zeros((kb * block_size, N))
    Wp[:K] = W
    blocks = Wp.reshape(kb, block_size, N)
    bmax, bmin = blocks.max(axis=1), blocks.min(axis=1)
    if symmetric:
        m = np.where(np.abs(bmax) > np.abs(bmin), bmax, bmin)
        step = np.repeat(np.abs(m) / 2 ** (bits - 1), block_size, axis=0)[:K]
        m_el = np.repeat(m, block_size, axis=0)[:K]
        clipped = (np.sign(W) == -np.sign(m_el)) & (np.abs(W) > (2 ** (bits - 1) - 0.5) * step)
        per = np.where(clipped, step, step / 2)
    else:
        step = np.repeat((np.maximum(bmax, 0) - np.minimum(bmin, 0)) / (2 ** bits - 1), block_size, axis=0)[:K]
        per = step / 2
    return per + step * 2 ** bits * 4 * U32


@given(case=cases(), bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64, 128, 256]),
       symmetric=st.booleans(), fold_bias=st.booleans())
@FUZZ
def test_matmul_nbits_applies_within_tolerance_or_refuses(case, bits, block_size, symmetric, fold_bias):
    spec = f"matmul-nbits(bits={bits},block_size={block_size},symmetric={symmetric},fold_bias={fold_bias})"
    out, exc = _apply(case, spec)
    if case.poisoned:
        return _expect_refusal(case, exc, spec)
    assert exc is None, f"{spec} refused a valid finite graph: {exc}"
    assert any(n.op_type == "MatMulNBits" for n in out.graph.node)
    outs = _run(out, case.x)

    def bound(a, layer):
        dw = nbits_weight_error(layer.W.astype(np.float64), bits, block_size, symmetric)
        quant = np.abs(a) @ dw
        return quant * (1 + 1e-6) + _float_slack(a, np.abs(layer.W.astype(np.float64)) + dw, layer.b,
                                                 layer.W.shape[0], U32, ABS32)

    _check_layers(case, outs, bound, FP32_MAX / 4)


# ------------------------------------------------------------------------------------------ matmul-int8

@given(case=cases(), per_channel=st.booleans(), fold_bias=st.booleans())
@FUZZ
def test_matmul_int8_applies_within_tolerance_or_refuses(case, per_channel, fold_bias):
    spec = f"matmul-int8(per_channel={per_channel},fold_bias={fold_bias})"
    out, exc = _apply(case, spec)
    if case.poisoned:
        return _expect_refusal(case, exc, spec)
    assert exc is None, f"{spec} refused a valid finite graph: {exc}"
    assert any(n.op_type == "MatMulInteger" for n in out.graph.node)
    outs = _run(out, case.x)

    def bound(a, layer):
        """|(a + da)(W + dW) - aW| <= |da||W| + |a||dW| + |da||dW|, summed over K, with
        |da| <= s_x/2 (DynamicQuantizeLinear, s_x = (max(a,0) - min(a,0))/255 over the whole tensor) and
        |dW| <= s_w/2 (s_w = max|W[:, n]|/127 per column, or max|W|/127): the documented tolerance."""
        W = layer.W.astype(np.float64)
        K = W.shape[0]
        s_x = (max(a.max(), 0.0) - min(a.min(), 0.0)) / 255
        s_w = np.abs(W).max(axis=0) / 127 if per_channel else np.full(W.shape[1], np.abs(W).max() / 127)
        quant = (np.abs(a).sum(axis=-1, keepdims=True) * s_w / 2 + s_x / 2 * np.abs(W).sum(axis=0)
                 + K * s_x * s_w / 4)
        # integer accumulation is exact; float32: the scales (2 roundings each), the final Mul, the bias Add
        approx = np.abs(a) @ np.abs(W) + quant + (0 if layer.b is None else np.abs(layer.b))
        return quant * (1 + 1e-5) + 8 * U32 * approx + 8 * ABS32

    _check_layers(case, outs, bound, FP32_MAX / 4)


# ------------------------------------------------------------------------------------------ fp16

def _fp16_weight_error(W: np.ndarray) -> np.ndarray:
    return U16 * np.abs(W) + ABS16 / 2


def _fp16_input_slack(a: np.ndarray, Wabs: np.ndarray, layer: Layer) -> np.ndarray:
    """A layer reading another layer's float16 output may see that value before its rounding to float16
    (observed with onnxruntime 1.32's CPU MatMul chains: a subnormal 2.98e-7 output was consumed as the
    unrounded 2.745e-7), so its input is only known within one float16 rounding."""
    if layer.inp == "x":
        return np.zeros(())
    return (U16 * np.abs(a) + ABS16 / 2) @ Wabs


@given(case=cases())
@FUZZ
def test_fp16_applies_within_tolerance_or_refuses(case):
    """fp16 keeps inf/NaN constants as they are (documented), so poisoned graphs may convert; only
    outputs whose float64 reference is finite and within float16 range are compared. Weights beyond
    +-65504 are excluded here: see test_fp16_weight_beyond_range_is_refused_not_clamped."""
    if any(np.abs(np.where(np.isfinite(layer.W), layer.W, 0)).max(initial=0) > FP16_MAX for layer in case.layers):
        out, exc = _apply(case, "fp16")  # must not crash; its numbers are the clamping bug's business
        return
    out, exc = _apply(case, "fp16")
    assert exc is None, f"fp16 refused a float32 graph: {exc}"
    outs = _run(out, case.x)

    def bound(a, layer):
        """Weights rounded to fp16 (relative 2^-11, absolute 2^-25 near zero); the dot product and the
        bias Add computed, in the worst case, in float16 arithmetic: gamma_{K+2} with u = 2^-11."""
        W = layer.W.astype(np.float64)
        W = np.where(np.isfinite(W), W, 0)
        dw = _fp16_weight_error(W)
        b = None if layer.b is None else layer.b.astype(np.float64)
        return np.abs(a) @ dw + (0 if b is None else _fp16_weight_error(b)) + _float_slack(
            a, np.abs(W) + dw, b, W.shape[0], U16, ABS16) + _fp16_input_slack(a, np.abs(W) + dw, layer)

    _check_layers(case, outs, bound, FP16_MAX / 2)


@given(case=cases(poison=False), bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 128]),
       symmetric=st.booleans())
@FUZZ
def test_q4f16_pipeline_within_tolerance_or_refuses(case, bits, block_size, symmetric):
    """matmul-nbits then fp16 (the q4f16 pipeline of `graphkit convert`): the scales become float16."""
    if any(np.abs(layer.W).max() > FP16_MAX for layer in case.layers):
        _apply(case, f"matmul-nbits(bits={bits},block_size={block_size}),fp16")  # must not crash
        return
    spec = f"matmul-nbits(bits={bits},block_size={block_size},symmetric={symmetric}),fp16"
    out, exc = _apply(case, spec)
    assert exc is None, f"{spec} refused a valid finite graph: {exc}"
    outs = _run(out, case.x)

    def bound(a, layer):
        W = layer.W.astype(np.float64)
        dq = nbits_weight_error(W, bits, block_size, symmetric)
        # scale rounded to fp16: |q - zp| <= 2^bits levels of a scale off by 2^-11 relative, or subnormal
        levels = 2 ** bits
        K, N = W.shape
        kb = -(-K // block_size)
        Wp = np.zeros((kb * block_size, N))
        Wp[:K] = np.abs(W)
        bmax = np.repeat(Wp.reshape(kb, block_size, N).max(axis=1), block_size, axis=0)[:K]
        dw = dq + U16 * (bmax + dq) * 2 + levels * ABS16
        b = None if layer.b is None else layer.b.astype(np.float64)
        return np.abs(a) @ dw + (0 if b is None else _fp16_weight_error(b)) + _float_slack(
            a, np.abs(W) + dw, b, K, U16, ABS16) + _fp16_input_slack(a, np.abs(W) + dw, layer)

    _check_layers(case, outs, bound, FP16_MAX / 2)


# ------------------------------------------------------------------------------------------ known bugs

@pytest.mark.parametrize("spec", ["fp16", "matmul-nbits(bits=4,block_size=16),fp16"])
def test_fp16_weight_beyond_range_is_refused_not_clamped(spec):
    """A weight of 1e6 read by an input of 1e-4: the product (100) fits float16, the weight does not.
    Clamping the weight to 65504 makes the output ~6.5 instead of 100 with no error."""
    W = np.zeros((16, 2), np.float32)
    W[0, 0] = 1e6
    W[1:, 1] = 1.0
    model = matmul_model(weight=W)
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = np.float16(1e-4)
    ref = x.astype(np.float64) @ W
    try:
        out, _ = run_passes(model, parse_spec(spec))
    except GraphkitError:
        return  # refused: the fixed behaviour
    y = _run(out, x)["y"].astype(np.float64)
    assert np.allclose(y, ref, rtol=1e-2), f"{spec}: got {y.tolist()}, float32 model gives {ref.tolist()}"
