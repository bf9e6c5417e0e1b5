"""fuse-rotary: HF apply_rotary_pos_emb as exported -> com.microsoft RotaryEmbedding with cos/sin caches, on
the smallest hand-built graph (both exporters' slice styles) and its look-alikes. The pass on the exported tiny
decoder: tests/test_fusion_chains.py."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_helpers import copy_model, op_counts, run_graph
from graphkit.errors import GraphkitError
from passes.fuse_rotary import FuseRotaryPass
from tiny_decoder import make_model, vi

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(7)


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
    return make_model(nodes, [vi("q", F32, ["B", N, "S", D]), vi("position_ids", I64, ["B", "S"])],
                  [vi("out", F32, ["B", N, "S", D])], c, opset=opset, ir_version=8)


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
    want = run_graph(m, {"q": q, "position_ids": pos})["out"]
    res = FuseRotaryPass(max_positions=1024)(copy_model(m))
    assert res.modified and res.details["fused"] == 1
    assert op_counts(res.model) == {"RotaryEmbedding": 1}
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert sorted(inits) == ["rotary_cos_cache", "rotary_sin_cache"]
    assert inits["rotary_cos_cache"].shape == (1024, D // 2)
    got = run_graph(res.model, {"q": q, "position_ids": pos})["out"]
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(got - _rotary_ref(q, pos, D, 0.9)).max() < 1e-4  # vs float64-ish numpy (cos of 700 rad)
    with pytest.raises(Exception, match="out of range"):
        run_graph(res.model, {"q": q, "position_ids": pos + 1024})


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
