"""pack-gqa: GroupQueryAttention reading the packed q/k/v projection with its own rotary (do_rotary=1), on the
smallest attention block after fuse-gqa + pack-matmul, prefill then decode, and the look-alikes it must leave
alone. The pass on the exported tiny decoder: tests/test_fusion_chains.py."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_helpers import attn_feeds, attn_graph, copy_model, op_counts, run_graph, valid_rows
from passes.fuse_gqa import FuseGqaPass
from passes.pack_gqa import PackGqaPass
from passes.pack_matmul import PackMatMulPass


def _packed_attn(padding="bias", H=16):
    """_attn_graph after fuse-gqa + pack-matmul: Split -> 2 RotaryEmbedding -> GroupQueryAttention."""
    m = FuseGqaPass(padding=padding)(attn_graph(H=H)).model
    res = PackMatMulPass()(m)
    assert res.modified and op_counts(res.model)["Split"] == 1, res.summary
    return res.model


def _prefill_then_decode(model, pads, s=5, steps=2, seed=0):
    """attn_out and presents of a prefill from an empty past, then one-token steps fed the presents back."""
    f = attn_feeds(len(pads), s, 0, pads, H=16, seed=seed)
    runs = [(f, run_graph(model, f))]
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        prev_f, prev = runs[-1]
        mask = np.concatenate([prev_f["attention_mask"], np.ones((len(pads), 1), np.int64)], 1)
        pos = (np.cumsum(mask, 1) - 1)[:, -1:]
        f = {"x": rng.standard_normal((len(pads), 1, 16)).astype(np.float32), "attention_mask": mask,
             "position_ids": pos, "past_key_values.0.key": prev["present.0.key"],
             "past_key_values.0.value": prev["present.0.value"]}
        runs.append((f, run_graph(model, f)))
    return runs


def test_pack_gqa_smallest_block():
    """One attention block: GQA reads the packed projection with do_rotary=1; outputs equal the graph before."""
    m = _packed_attn()
    res = PackGqaPass()(copy_model(m))
    assert res.modified, res.summary
    ops = op_counts(res.model)
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
    packed = PackGqaPass()(copy_model(m)).model
    for (f, want), (_, got) in zip(_prefill_then_decode(m, (2, 0)), _prefill_then_decode(packed, (2, 0))):
        valid = valid_rows(f)
        assert np.abs(got["attn_out"] - want["attn_out"])[valid].max() < 1e-5
        assert np.abs(got["present.0.value"] - want["present.0.value"]).max() < 1e-5
        assert np.abs(got["present.0.key"][1] - want["present.0.key"][1]).max() < 1e-5  # the unpadded row


def test_pack_gqa_lookalikes_left_alone():
    m = _packed_attn()
    # GQA's own rotary needs head_dim % 16 == 0 (onnxruntime refuses to run it otherwise)
    res = PackGqaPass()(_packed_attn(H=8))
    assert not res.modified and "multiple of 16" in res.summary
    # q/k/v not split from one tensor: nothing to pack, says which pass is missing
    res = PackGqaPass()(FuseGqaPass(padding="bias")(attn_graph(H=16)).model)
    assert not res.modified and "pack-matmul" in res.summary
    # the q half of the split also read elsewhere (an output): the Split must stay
    extra = copy_model(m)
    split = next(n for n in extra.graph.node if n.op_type == "Split")
    extra.graph.output.append(onnx.ValueInfoProto(name=split.output[0]))
    before = extra.SerializeToString()
    res = PackGqaPass()(extra)
    assert not res.modified and "other readers" in res.summary and extra.SerializeToString() == before
    # q and k rotated with different positions
    other = copy_model(m)
    rot = [n for n in other.graph.node if n.op_type == "RotaryEmbedding"]
    other.graph.initializer.append(numpy_helper.from_array(np.zeros((64, 8), np.float32), "other_cos"))
    rot[1].input[2] = "other_cos"
    res = PackGqaPass()(other)
    assert not res.modified and "different positions or cos/sin" in res.summary
    # positions computed in the graph (an offset, say): GQA would rotate by cache index instead, so no
    shifted = copy_model(m)
    shifted.graph.node.insert(0, helper.make_node("Identity", ["position_ids"], ["positions_in_graph"]))
    for n in shifted.graph.node:
        if n.op_type == "RotaryEmbedding":
            n.input[1] = "positions_in_graph"
    res = PackGqaPass()(shifted)
    assert not res.modified and "computed in the graph" in res.summary
    # already packed: a second run is not applicable and changes nothing
    once = PackGqaPass()(copy_model(m)).model
    again = PackGqaPass()(once)
    assert not again.modified and again.summary.startswith("not applicable")
