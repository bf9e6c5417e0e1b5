"""tied-embedding: one quantized table serves the lookup (standard ops) and the lm_head (MatMulNBits)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError
from graphkit.modelio import load_model
from passes._quant import dequantize_blockwise, quantize_blockwise
from passes.tied_embedding import TiedEmbeddingPass
from tiny_decoder import make_model, vi


def tied_graph(vocab=50, hidden=40, shared=True, seed=0) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids → Gather(E) → Mul(2) → MatMul(·, E.T) → logits; E.T via Transpose (dynamo) or a copy (TorchScript)."""
    E = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(E, "E"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
             helper.make_node("Mul", ["emb", "two"], ["h"], name="body")]
    if shared:
        nodes.append(helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="t"))
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(E.T), "Et"))
    nodes.append(helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head"))
    m = make_model(nodes, [vi("ids", TensorProto.INT64, ["b", "s"])],
                   [vi("logits", TensorProto.FLOAT, ["b", "s", vocab]),
                    vi("emb", TensorProto.FLOAT, ["b", "s", hidden])], inits, opset=17)
    return m, E


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (8, 32, True), (4, 16, True), (8, 64, True),
                                                  (4, 16, False), (4, 32, False), (8, 16, False)])
def test_lookup_and_head_use_the_same_dequantized_table(shared, bits, block, symmetric):
    model, E = tied_graph(shared=shared)  # hidden 40: k_blocks 3 at block 16 (odd: a zero-point nibble unused), 2 at 32
    result = TiedEmbeddingPass(bits=bits, block_size=block, symmetric=symmetric)(model)
    assert result.modified
    ops = [n.op_type for n in result.model.graph.node]
    assert "MatMulNBits" in ops and "GatherBlockQuantized" not in ops and "Transpose" not in ops
    names = {t.name for t in result.model.graph.initializer}
    assert "E" not in names and "Et" not in names  # the float table is gone: stored once, quantized
    packed, scales, zps = quantize_blockwise(E.T, bits, block, symmetric=symmetric)
    assert (zps is None) == symmetric and (zps is None or any(n.op_type == "MatMulNBits" and len(n.input) == 4
                                                              for n in result.model.graph.node))
    Eq = dequantize_blockwise(packed, scales, zps, bits, block, E.shape[1]).T  # [vocab, hidden]
    ids = np.array([[0, 7, 49, 3], [1, 1, 2, 48]], np.int64)
    logits, emb = run(result.model, {"ids": ids})
    np.testing.assert_allclose(emb, Eq[ids], rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits, (2 * Eq[ids]) @ Eq.T, rtol=1e-4, atol=1e-3)
    step = np.abs(scales).max()
    assert np.abs(emb - E[ids]).max() <= step + 1e-6


def test_not_applicable_when_untied():
    model, _ = tied_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((40, 50), np.float32), "W"))
    for n in model.graph.node:
        if n.op_type == "MatMul":
            n.input[1] = "W"
    result = TiedEmbeddingPass()(model)
    assert not result.modified and "not applicable" in result.summary


def test_bad_options():
    with pytest.raises(GraphkitError, match="bits"):
        TiedEmbeddingPass(bits=3)
    with pytest.raises(GraphkitError, match="block_size"):
        TiedEmbeddingPass(block_size=48)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_exported_decoder_equals_dequantized_table(tmp_path, tiny_decoder, exporter):
    """On a real export the pass equals the original graph with E replaced by dequant(quant(E))."""
    from graphkit.ortrun import DecoderRunner
    export = tiny_decoder("qwen2", exporter).path
    original = load_model(export)
    result = TiedEmbeddingPass(bits=4)(load_model(export))
    assert result.modified
    table = result.details["table"]
    E = next(numpy_helper.to_array(t) for t in original.graph.initializer if t.name == table)
    packed, scales, _ = quantize_blockwise(E.T, 4, 32)
    Eq = dequantize_blockwise(packed, scales, None, 4, 32, E.shape[1]).T
    for t in original.graph.initializer:  # the reference: same graph, dequantized table (and its copy)
        a = numpy_helper.to_array(t)
        if a.shape == E.shape and np.array_equal(a, E):
            t.CopyFrom(numpy_helper.from_array(Eq, t.name))
        elif a.shape == E.T.shape and np.array_equal(a, E.T):
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(Eq.T), t.name))
    onnx.save(original, str(tmp_path / "ref.onnx"))
    onnx.save(result.model, str(tmp_path / "tied.onnx"))
    ref, got = DecoderRunner.from_file(tmp_path / "ref.onnx"), DecoderRunner.from_file(tmp_path / "tied.onnx")
    ids = np.array([[5, 9, 100, 3, 77, 12]], np.int64)
    mask = np.ones_like(ids)
    a = ref.step(ids, mask, ref.empty_past(1))
    b = got.step(ids, mask, got.empty_past(1))
    assert np.abs(a.logits - b.logits).max() < 1e-3
    nxt = np.array([[int(a.logits[0, -1].argmax())]], np.int64)
    mask2 = np.ones((1, 7), np.int64)
    assert np.abs(ref.step(nxt, mask2, a.present).logits - got.step(nxt, mask2, b.present).logits).max() < 1e-3
