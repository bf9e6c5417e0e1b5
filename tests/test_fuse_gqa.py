"""fuse-gqa: one decoder attention block (after fuse-rotary) -> com.microsoft GroupQueryAttention, on the
smallest hand-built block (graph_helpers.attn_graph) run in onnxruntime against the unfused block: prefill,
decode with past, left padding (padding=seqlens vs bias), masks it must refuse. The pass on the exported tiny
decoder: tests/test_fusion_chains.py."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graph_helpers import attn_feeds, attn_graph, copy_model, op_counts, run_graph, valid_rows
from graphkit.errors import GraphkitError
from passes.fuse_gqa import FuseGqaPass


@pytest.mark.parametrize("scale_split", [True, False])
def test_gqa_smallest_block(scale_split):
    m = attn_graph(scale_split=scale_split)
    res = FuseGqaPass()(copy_model(m))
    assert res.modified, res.summary
    ops = op_counts(res.model)
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
        f = attn_feeds(b, s, p, pads)
        want, got = run_graph(m, f), run_graph(res.model, f)
        for k in want:
            assert got[k].shape == want[k].shape
        assert np.abs(got["attn_out"] - want["attn_out"]).max() < 1e-5, (b, s, p)
        assert np.array_equal(got["present.0.key"], want["present.0.key"])
        assert np.array_equal(got["present.0.value"], want["present.0.value"])


def test_gqa_left_padding_seqlens_vs_bias():
    """padding=seqlens (genai style) is wrong for left-padded rows; padding=bias is exact."""
    m = attn_graph()
    seq = FuseGqaPass()(copy_model(m)).model
    bias = FuseGqaPass(padding="bias")(copy_model(m)).model
    assert op_counts(bias)["GroupQueryAttention"] == 1
    for s, p in [(5, 0), (1, 6)]:  # prefill with empty past, then one-token decode
        f = attn_feeds(2, s, p, pads=(2, 0))
        valid = valid_rows(f)
        want = run_graph(m, f)["attn_out"]
        got_b = run_graph(bias, f)["attn_out"]
        got_s = run_graph(seq, f)["attn_out"]
        assert np.abs(got_b - want)[valid].max() < 1e-5
        assert np.abs(got_s - want)[1].max() < 1e-5            # the unpadded row is exact
        assert np.abs(got_s - want)[0][valid[0]].max() > 1e-2  # the left-padded row is not
    # GQA refuses batch > 1 with S > 1 and a past (chunked prefill), whatever the mask mode
    with pytest.raises(Exception, match="batch_size must be 1"):
        run_graph(bias, attn_feeds(2, 3, 2))


@pytest.mark.parametrize("mask", ["window", "bidirectional"])
def test_gqa_other_masks_not_fused(mask):
    m = attn_graph(mask=mask)
    before = m.SerializeToString()
    res = FuseGqaPass()(m)
    assert not res.modified and "mask" in res.summary
    assert m.SerializeToString() == before


def test_gqa_needs_rotary_fused_first():
    m = attn_graph()
    for n in m.graph.node:
        if n.op_type == "RotaryEmbedding":  # a rotary the pass does not know: plain Identity
            n.op_type, n.domain = "Identity", ""
            del n.input[1:]
    res = FuseGqaPass()(m)
    assert not res.modified and "fuse-rotary" in res.summary
    with pytest.raises(GraphkitError):
        FuseGqaPass(padding="left")
