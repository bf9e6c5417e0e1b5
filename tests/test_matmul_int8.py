"""`matmul-int8`: dynamic int8 MatMuls (DynamicQuantizeLinear + MatMulInteger), per-channel weights."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError, PassNotApplicable
from graphkit.passbase import coerce_option
from passes.matmul_int8 import (MatMulInt8Pass, dynamic_quantize_linear, int8_error_bound, per_token_quantize,
                                quantize_rows, quantize_weight, row_normalized_quantize)
from tiny_decoder import make_model, vi


def _model(weights: dict[str, np.ndarray], edges: list[tuple[str, str, str, str]], inputs: dict[str, int],
           outputs: list[str], extra_nodes=(), extra_inits=(), opset: int = 17) -> onnx.ModelProto:
    """edges: (node name, activation, weight name, output). Activations are [M, K] float inputs."""
    nodes = [helper.make_node("MatMul", [a, w], [o], name) for name, a, w, o in edges] + list(extra_nodes)
    return make_model(nodes, [vi(n, TensorProto.FLOAT, ["M", k]) for n, k in inputs.items()],
                      [vi(o, TensorProto.FLOAT, None) for o in outputs],
                      [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()]
                      + list(extra_inits), opset=opset)


def _run(model: onnx.ModelProto, feeds: dict, opt_path=None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if opt_path:
        so.optimized_model_filepath = str(opt_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}




@pytest.mark.parametrize("activations", ["per-token", "per-token-dql", "per-tensor"])
def test_rewrite_matches_x_at_w_within_int8_bound(activations):
    RNG = np.random.default_rng(0)
    W = RNG.normal(0, 0.05, (96, 40)).astype(np.float32)
    x = RNG.normal(0, 1.0, (7, 96)).astype(np.float32)
    m = _model({"W": W}, [("mm", "x", "W", "y")], {"x": 96}, ["y"])
    res = MatMulInt8Pass(activations=activations)(m)
    assert res.modified and res.details["activations"] == activations
    ops = _ops(res.model)
    assert ops["MatMul"] == 0 and ops["MatMulInteger"] == 1
    assert ops["DynamicQuantizeLinear"] == (0 if activations == "per-token" else 1)
    # dtypes of the emitted pattern: uint8 A, int8 [K, N] weight, int8 scalar zero point 0, float32 [N] scale
    mmi = next(n for n in res.model.graph.node if n.op_type == "MatMulInteger")
    inits = _inits(res.model)
    assert inits[mmi.input[1]].dtype == np.int8 and inits[mmi.input[1]].shape == (96, 40)
    assert inits[mmi.input[3]].dtype == np.int8 and inits[mmi.input[3]].shape == () and inits[mmi.input[3]] == 0
    assert "W" not in inits  # the float weight is gone
    y = _run(res.model, {"x": x})[0]
    ref = x.astype(np.float64) @ W.astype(np.float64)
    bound = int8_error_bound(x, W, activations=activations)
    assert np.all(np.abs(y - ref) <= bound * 1.001 + 1e-5)
    # and it is exactly the integer factorization, computed in numpy
    q, sw = quantize_weight(W)
    if activations == "per-tensor":
        xq, sx, zx = dynamic_quantize_linear(x)
    elif activations == "per-token-dql":
        xq, s_norm, zx, r = row_normalized_quantize(x)
        sx = s_norm * r
    else:
        (xq, sx), zx = per_token_quantize(x), 128
    emu = ((xq.astype(np.int32) - int(zx)) @ q.astype(np.int32)).astype(np.float32) * sw * sx
    np.testing.assert_allclose(y, emu, rtol=1e-5, atol=1e-6)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 0.02


def test_per_channel_scales_are_max_abs_column_over_127():
    RNG = np.random.default_rng(0)
    W = RNG.normal(0, 0.1, (32, 12)).astype(np.float32)
    W[:, 3] *= 20
    W[:, 5] = 0.0  # all-zero column: scale 0, no NaN
    q, s = quantize_weight(W, per_channel=True)
    np.testing.assert_array_equal(s, (np.abs(W).max(axis=0) / np.float32(127)).astype(np.float32))
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    assert np.all(np.abs(q.astype(np.float32) * s - W) <= s / 2 * (1 + 1e-6) + 1e-12)
    assert s[5] == 0 and not q[:, 5].any()
    qt, st = quantize_weight(W, per_channel=False)
    assert st.shape == () and st == np.float32(np.abs(W).max() / np.float32(127))
    # in the graph: the scale initializer is exactly s
    m = _model({"W": W}, [("mm", "x", "W", "y")], {"x": 32}, ["y"])
    out = MatMulInt8Pass()(m).model
    mul = next(n for n in out.graph.node if n.op_type == "Mul" and any(i.endswith("_scale") and i.startswith("W") for i in n.input))
    np.testing.assert_array_equal(_inits(out)[mul.input[1]], s)
    y = _run(out, {"x": RNG.normal(size=(3, 32)).astype(np.float32)})[0]
    assert np.all(y[:, 5] == 0)


@pytest.mark.parametrize("activations", ["per-token", "per-token-dql", "per-tensor"])
def test_one_activation_quantizer_per_activation_is_shared(activations):
    RNG = np.random.default_rng(0)
    Wq, Wk, Wv, Wo = (RNG.normal(0, 0.05, s).astype(np.float32) for s in [(64, 64), (64, 32), (64, 32), (64, 64)])
    m = _model({"Wq": Wq, "Wk": Wk, "Wv": Wv, "Wo": Wo},
               [("q_proj", "x", "Wq", "q"), ("k_proj", "x", "Wk", "k"), ("v_proj", "x", "Wv", "v"), ("o_proj", "h", "Wo", "o")],
               {"x": 64, "h": 64}, ["q", "k", "v", "o"])
    res = MatMulInt8Pass(activations=activations)(m)
    ops = _ops(res.model)
    assert ops["MatMulInteger"] == 4 and res.details["activation_quantizers"] == 2  # x (shared by 3) and h
    assert res.details["shared_dql"] == 1
    if activations == "per-tensor":
        assert ops["DynamicQuantizeLinear"] == 2
    elif activations == "per-token-dql":
        assert ops["DynamicQuantizeLinear"] == 2 and ops["ReduceMax"] == 2 and ops["Round"] == 0
    else:
        assert ops["ReduceMax"] == 2 and ops["Round"] == 2
    users = lambda t: sum(t in n.input for n in res.model.graph.node)  # noqa: E731
    mmis = [n for n in res.model.graph.node if n.op_type == "MatMulInteger"]
    x_q = next(n.input[0] for n in mmis if n.name.startswith("q_proj"))
    assert users(x_q) == 3 and all(n.input[0] == x_q for n in mmis if n.name[:6] in ("q_proj", "k_proj", "v_proj"))
    x, h = (RNG.normal(size=(5, 64)).astype(np.float32) for _ in range(2))
    for got, W, a in zip(_run(res.model, {"x": x, "h": h}), [Wq, Wk, Wv, Wo], [x, x, x, h]):
        assert np.all(np.abs(got - a @ W) <= int8_error_bound(a, W, activations=activations) * 1.001 + 1e-5)


def test_onnxruntime_fuses_the_emitted_pattern(tmp_path):
    """Regression guard on the exact node form: ORT turns it into MatMulIntegerToFloat (+ bias)."""
    RNG = np.random.default_rng(0)
    W1, W2 = (RNG.normal(0, 0.05, (32, 16)).astype(np.float32) for _ in range(2))
    bias = numpy_helper.from_array(RNG.normal(size=16).astype(np.float32), "b")
    add = helper.make_node("Add", ["b", "y1"], ["z"], "bias_add")  # bias first, as torchscript exports it
    m = _model({"W1": W1, "W2": W2}, [("mm1", "x", "W1", "y1"), ("mm2", "x", "W2", "y2")], {"x": 32}, ["z", "y2"],
               extra_nodes=[add], extra_inits=[bias])
    res = MatMulInt8Pass(activations="per-tensor")(m)
    assert res.details["bias_fusable"] == 1
    opt = tmp_path / "opt.onnx"
    x = RNG.normal(size=(4, 32)).astype(np.float32)
    z, y2 = _run(res.model, {"x": x}, opt_path=opt)
    fused = onnx.load(str(opt))
    kinds = _ops(fused)
    assert kinds["MatMulIntegerToFloat"] == 2 and kinds["MatMulInteger"] == 0 and kinds["Add"] == 0
    assert np.all(np.abs(z - (x @ W1 + numpy_helper.to_array(bias))) <= int8_error_bound(x, W1) * 1.001 + 1e-5)


def test_include_and_exclude_globs():
    RNG = np.random.default_rng(0)
    Ws = {f"W{i}": RNG.normal(0, 0.05, (16, 8)).astype(np.float32) for i in range(3)}
    edges = [("layers.0/q_proj/MatMul", "x", "W0", "a"), ("layers.0/k_proj/MatMul", "x", "W1", "b"),
             ("layers.1/q_proj/MatMul", "x", "W2", "c")]
    m = _model(Ws, edges, {"x": 16}, ["a", "b", "c"])

    def quantized(**kw):
        out = MatMulInt8Pass(**kw)(m).model
        return sorted(n.name.removesuffix("_quant") for n in out.graph.node if n.op_type == "MatMulInteger")

    assert quantized() == sorted(e[0] for e in edges)
    assert quantized(exclude=["*k_proj*"]) == ["layers.0/q_proj/MatMul", "layers.1/q_proj/MatMul"]
    assert quantized(include=["layers.1/*"]) == ["layers.1/q_proj/MatMul"]
    assert quantized(include=["layers.0/*"], exclude=["*q_proj*"]) == ["layers.0/k_proj/MatMul"]
    assert coerce_option(MatMulInt8Pass, "exclude", "*k_proj*|*v_proj*") == ["*k_proj*", "*v_proj*"]
    assert coerce_option(MatMulInt8Pass, "lm_head", "int8") == "int8"
    with pytest.raises(GraphkitError):
        coerce_option(MatMulInt8Pass, "lm_head", "int4")


def test_not_applicable_without_constant_weights():
    m = make_model([helper.make_node("MatMul", ["a", "b"], ["y"], "act_x_act")],
                   [vi("a", TensorProto.FLOAT, [2, 3]), vi("b", TensorProto.FLOAT, [3, 4])],
                   [vi("y", TensorProto.FLOAT, None)], opset=17)
    with pytest.raises(PassNotApplicable):
        MatMulInt8Pass().requires(m)
    res = MatMulInt8Pass()(m)
    assert not res.modified and "not applicable" in res.summary
    # everything excluded is also "nothing to do"
    m2 = _model({"W": np.ones((3, 4))}, [("mm", "x", "W", "y")], {"x": 3}, ["y"])
    assert not MatMulInt8Pass(exclude=["mm"])(m2).modified


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_raises_naming_the_tensor(bad):
    W = np.ones((8, 4), np.float32)
    W[2, 1] = bad
    m = _model({"decoder.w_bad": W}, [("mm", "x", "decoder.w_bad", "y")], {"x": 8}, ["y"])
    with pytest.raises(GraphkitError, match=r"decoder\.w_bad.*non-finite"):
        MatMulInt8Pass()(m)


def test_outlier_weights_per_channel_stays_accurate_per_tensor_does_not():
    """A few x50 outliers blow up the single per-tensor scale for every column; per-column scales
    confine the damage to the columns that hold them."""
    RNG = np.random.default_rng(0)
    K, N = 256, 64
    W = RNG.normal(0, 0.02, (K, N)).astype(np.float32)
    out_cols = [3, 40]
    W[10, 3] = 4.0  # ~50x the largest ordinary |w| (about 0.09)
    W[200, 40] = -4.0
    x = RNG.normal(size=(16, K)).astype(np.float32)
    ref = x.astype(np.float64) @ W
    m = _model({"W": W}, [("mm", "x", "W", "y")], {"x": K}, ["y"])
    y_pc = _run(MatMulInt8Pass(activations="per-tensor")(m).model, {"x": x})[0]
    y_pt = _run(MatMulInt8Pass(activations="per-tensor", per_channel=False)(m).model, {"x": x})[0]
    assert np.all(np.abs(y_pc - ref) <= int8_error_bound(x, W, True) * 1.001 + 1e-5)
    assert np.all(np.abs(y_pt - ref) <= int8_error_bound(x, W, False) * 1.001 + 1e-5)
    clean = [c for c in range(N) if c not in out_cols]
    rel = lambda y: np.linalg.norm(y[:, clean] - ref[:, clean]) / np.linalg.norm(ref[:, clean])  # noqa: E731
    assert rel(y_pc) < 0.02
    assert rel(y_pt) > 10 * rel(y_pc)


def _lm_graph(V=50, H=16, separate_copy=False):
    """ids -> Gather(table) -> MatMul(Wp) -> MatMul(table^T) -> logits (a two-layer toy LM)."""
    RNG = np.random.default_rng(0)
    table = RNG.normal(0, 0.5, (V, H)).astype(np.float32)
    Wp = RNG.normal(0, 0.2, (H, H)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], "embed_tokens/Gather", axis=0),
             helper.make_node("MatMul", ["emb", "Wp"], ["h"], "layers.0/mlp/MatMul")]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(Wp, "Wp")]
    if separate_copy:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(table.T), "lm_w"))
        nodes.append(helper.make_node("MatMul", ["h", "lm_w"], ["logits"], "node_linear_9"))
    else:
        nodes += [helper.make_node("Transpose", ["table"], ["table_T"], "tr", perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "table_T"], ["logits"], "node_linear_9")]
    m = make_model(nodes, [vi("ids", TensorProto.INT64, ["B", "S"])], [vi("logits", TensorProto.FLOAT, None)], inits,
                   opset=18, name="lm")
    return m, table, Wp


def test_lm_head_int8_by_default_and_kept_on_request():
    m, table, Wp = _lm_graph()
    ids = np.array([[1, 7, 49, 3]], np.int64)
    ref = table[ids] @ Wp @ table.T
    keep = MatMulInt8Pass(lm_head="keep")(m)
    assert _ops(keep.model)["MatMulInteger"] == 1 and _ops(keep.model)["MatMul"] == 1
    assert any("lm_head kept float" in s for s in keep.details["skipped"])
    q = MatMulInt8Pass()(m)
    assert _ops(q.model)["MatMulInteger"] == 2 and _ops(q.model)["MatMul"] == 0
    assert "tr" not in {n.name for n in q.model.graph.node}  # the float Transpose went away
    assert "table" in _inits(q.model)  # still read by the float Gather
    for res in (keep, q):
        got = _run(res.model, {"ids": ids})[0]
        assert np.abs(got - ref).max() / np.abs(ref).max() < 0.03


def test_lm_head_only_leaves_the_body_to_another_pass():
    """lm_head=only (q4 for Transformers.js 3.x): the vocabulary projection and the lookup read one int8 table; the
    body MatMul stays float for matmul-nbits."""
    m, table, Wp = _lm_graph()
    ids = np.array([[1, 7, 49, 3]], np.int64)
    res = MatMulInt8Pass(lm_head="only", quantize_embedding_gather=True)(m)
    assert _ops(res.model)["MatMulInteger"] == 1 and _ops(res.model)["MatMul"] == 1
    assert any("not the lm_head" in s for s in res.details["skipped"]) and res.details["tied_lm_head_shared"] == 1
    assert "Wp" in _inits(res.model) and "table" not in _inits(res.model)
    got = _run(res.model, {"ids": ids})[0]
    ref = table[ids] @ Wp @ table.T
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


@pytest.mark.parametrize("separate_copy", [False, True])
def test_embedding_gather_int8_per_row_and_tied_lm_head_shares_it(separate_copy):
    m, table, Wp = _lm_graph(separate_copy=separate_copy)
    ids = np.array([[0, 5, 49, 5, 12]], np.int64)
    res = MatMulInt8Pass(quantize_embedding_gather=True)(m)
    inits = _inits(res.model)
    assert "table" not in inits and "lm_w" not in inits  # no float copy of the table is left
    int8_tables = [n for n, a in inits.items() if a.dtype == np.int8 and a.shape == table.shape]
    assert len(int8_tables) == 1 and res.details["tied_lm_head_shared"] == 1
    q, s = quantize_rows(table)
    np.testing.assert_array_equal(inits[int8_tables[0]], q)
    np.testing.assert_array_equal(s, (np.abs(table).max(axis=1) / np.float32(127)).astype(np.float32))
    # the gathered rows dequantize within half a step of their row scale
    emb_only = MatMulInt8Pass(quantize_embedding_gather=True, include=["nothing"])(m)
    assert _ops(emb_only.model)["MatMul"] == 2
    sub = onnx.ModelProto()
    sub.CopyFrom(emb_only.model)
    sub.graph.output.append(helper.make_tensor_value_info("emb", TensorProto.FLOAT, None))
    emb = _run(sub, {"ids": ids})[1]
    assert np.all(np.abs(emb - table[ids]) <= s[ids][..., None] / 2 * 1.0001 + 1e-7)
    got = _run(res.model, {"ids": ids})[0]
    ref = table[ids] @ Wp @ table.T
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


def test_opset_too_old_is_refused():
    from graphkit.errors import PreconditionError
    m = _model({"W": np.ones((3, 4))}, [("mm", "x", "W", "y")], {"x": 3}, ["y"], opset=10)
    with pytest.raises(PreconditionError, match="opset"):
        MatMulInt8Pass()(m)


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_qwen2_export(tiny_decoder):
    """The tiny Qwen2 (tests/tiny_decoder.py) with the initializer's default weights and a smaller init range."""
    return tiny_decoder("qwen2", "torchscript", perturb=False, initializer_range=0.05).path


def _agreement(fp32_path, model: onnx.ModelProto, prompts, n_new=32):
    from graphkit.ortrun import DecoderRunner, kl_divergence, make_session
    ref = DecoderRunner(make_session(fp32_path))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    q = DecoderRunner(ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]))
    agree, kl = [], []
    for p in prompts:
        cont, _ = ref.greedy(p, n_new)
        lr, lq = ref.teacher_forced_logits(p, cont), q.teacher_forced_logits(p, cont)
        agree.append(lr.argmax(-1) == lq.argmax(-1))
        kl.append(kl_divergence(lr, lq))
    return float(np.concatenate(agree).mean()), float(np.concatenate(kl).mean())


def test_end_to_end_tiny_qwen2_top1_agreement(tiny_qwen2_export):
    m = onnx.load(str(tiny_qwen2_export))
    res = MatMulInt8Pass()(m)
    # 2 layers x 7 projections + lm_head; q/k/v share one activation quantizer, gate/up another
    assert res.details["matmuls"] == 15 and res.details["activation_quantizers"] == 9
    prompts = [[3, 17, 42, 99, 7, 250, 11], [5, 5, 300, 1, 77], [400, 2, 9, 31, 64, 128, 200, 256]]
    top1, kl = _agreement(tiny_qwen2_export, res.model, prompts)
    assert top1 >= 0.95 and kl < 1e-3, (top1, kl)


def test_end_to_end_shipped_example_top1_agreement(example_dir, tmp_path):
    """The trained example (peaked distributions): defaults keep teacher-forced top-1 with fp32."""
    if not (example_dir / "adapter" / "adapter_model.safetensors").exists():
        pytest.skip("shipped example not built")
    from transformers import AutoTokenizer

    from graphkit.export import export_model
    fp32 = tmp_path / "model.onnx"
    export_model(example_dir / "base", fp32, example_dir / "adapter", exporter="torchscript")
    tok = AutoTokenizer.from_pretrained(example_dir / "base")
    texts = ["<|im_start|>user\nRedacta la epicrisis del paciente: varón de 67 años, neumonía adquirida en la "
             "comunidad.<|im_end|>\n<|im_start|>assistant\n", "Paciente de 54 años que ingresa por"]
    prompts = [tok(t)["input_ids"] for t in texts]
    for activations in ("per-token", "per-token-dql"):  # the default, and the same accuracy in ORT's fused form
        res = MatMulInt8Pass(activations=activations)(onnx.load(str(fp32)))
        top1, kl = _agreement(fp32, res.model, prompts)
        assert top1 >= 0.95 and kl < 0.01, (activations, top1, kl)


def test_per_token_activations_are_not_swamped_by_one_massive_token(tmp_path):
    """The failure mode measured in docs/q8.md: one token with a huge activation (as SwiGLU outputs
    produce at down_proj inputs) sets DynamicQuantizeLinear's single scale for the whole prefill, so
    every other row is quantized with a few levels; per-token scales keep the other rows exact-ish."""
    RNG = np.random.default_rng(0)
    K, N = 384, 64
    W = RNG.normal(0, 0.05, (K, N)).astype(np.float32)
    x = RNG.normal(0, 1.0, (1, 12, K)).astype(np.float32)
    x[0, 3, 17] = 300.0  # a massive activation on token 3
    ref = x.astype(np.float64) @ W
    m = _model({"W": W}, [("down_proj", "x", "W", "y")], {"x": K}, ["y"])
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K]))
    pt = MatMulInt8Pass(activations="per-tensor")(m).model
    tok = MatMulInt8Pass()(m)  # per-token is the default
    assert _ops(tok.model)["DynamicQuantizeLinear"] == 0 and _ops(tok.model)["MatMulInteger"] == 1
    mmi = next(n for n in tok.model.graph.node if n.op_type == "MatMulInteger")
    assert _inits(tok.model)[mmi.input[2]] == 128 and _inits(tok.model)[mmi.input[2]].dtype == np.uint8
    opt = tmp_path / "opt.onnx"
    y_tok = _run(tok.model, {"x": x}, opt_path=opt)[0]
    # the [.., 1] row scale must not be fused into MatMulIntegerToFloat (its a_scale is per tensor)
    assert _ops(onnx.load(str(opt)))["MatMulIntegerToFloat"] == 0
    y_pt = _run(pt, {"x": x})[0]
    assert np.all(np.abs(y_tok - ref) <= int8_error_bound(x, W, activations="per-token") * 1.001 + 1e-5)
    assert np.all(np.abs(y_pt - ref) <= int8_error_bound(x, W) * 1.001 + 1e-5)
    others = [t for t in range(12) if t != 3]
    rel = lambda y: np.linalg.norm((y - ref)[0, others]) / np.linalg.norm(ref[0, others])  # noqa: E731
    assert rel(y_tok) < 0.02 and rel(y_pt) > 5 * rel(y_tok), (rel(y_tok), rel(y_pt))
    # per-token-dql: the same per-row accuracy, in the form onnxruntime fuses into one DynamicQuantizeMatMul
    dql = MatMulInt8Pass(activations="per-token-dql")(m).model
    y_dql = _run(dql, {"x": x}, opt_path=opt)[0]
    fused = _ops(onnx.load(str(opt)))
    assert fused["DynamicQuantizeMatMul"] == 1 and fused["MatMulInteger"] == 0 and fused["Round"] == 0, fused
    assert np.all(np.abs(y_dql - ref) <= int8_error_bound(x, W, activations="per-token-dql") * 1.001 + 1e-5)
    assert rel(y_dql) < 1.2 * rel(y_tok) and rel(y_pt) > 5 * rel(y_dql), (rel(y_dql), rel(y_tok))


def test_per_token_on_opset_17_and_18_graphs():
    RNG = np.random.default_rng(0)
    W = RNG.normal(0, 0.05, (32, 8)).astype(np.float32)
    for opset, activations in [(17, "per-token"), (18, "per-token"), (17, "per-token-dql"), (18, "per-token-dql")]:
        x = RNG.normal(size=(5, 32)).astype(np.float32)
        m = _model({"W": W}, [("mm", "x", "W", "y")], {"x": 32}, ["y"], opset=opset)
        out = MatMulInt8Pass(activations=activations)(m).model
        y = _run(out, {"x": x})[0]
        assert np.all(np.abs(y - x @ W) <= int8_error_bound(x, W, activations=activations) * 1.001 + 1e-5)
        x[2] = 0.0  # an all-zero row: scale floor, no NaN
        assert np.isfinite(_run(out, {"x": x})[0]).all() and not _run(out, {"x": x})[0][2].any()
        y0 = _run(out, {"x": np.zeros_like(x)})[0]  # an all-zero tensor (DynamicQuantizeLinear's scale 0)
        assert np.isfinite(y0).all() and not y0.any()
