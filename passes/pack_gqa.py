"""pack-gqa: GroupQueryAttention reads the packed q/k/v projection and applies the rotary itself.

Run it after ``fuse-gqa`` and ``pack-matmul``. What is matched, per ``com.microsoft.GroupQueryAttention``
node with ``do_rotary=0`` (what ``fuse-gqa`` writes)::

    qkv [B, S, (N + 2*KV)*H] -Split(axis=-1, [N*H, KV*H, KV*H])-> q_lin, k_lin, v_lin
    RotaryEmbedding(q_lin, position_ids, cos, sin) -> q;  RotaryEmbedding(k_lin, position_ids, cos, sin) -> k
    GroupQueryAttention(q, k, v_lin, past_key, past_value, seqlens_k, total_sequence_length[, ..., attention_bias])

checked by name and shape: the Split's three outputs are read by these nodes alone, its sizes are the
GQA's ``num_heads * head_dim`` and ``kv_num_heads * head_dim``; both RotaryEmbedding nodes share
``position_ids`` (a graph input) and the cos/sin caches (``[max_positions, head_dim / 2]``: full-width rotary), have
the same ``interleaved`` and no ``scale`` other than 1; ``head_dim`` is a multiple of 16 (onnxruntime's
GQA refuses to rotate other head sizes: "head_size shall be a multiple of 16").

Result::

    GroupQueryAttention(qkv, '', '', past_key, past_value, seqlens_k, total_sequence_length,
                        cos, sin[, '', attention_bias ...]; do_rotary=1, rotary_interleaved=interleaved)

The Split and the two RotaryEmbedding nodes go (three kernels per layer fewer at every decode step:
the form onnxruntime-genai's builder writes). Graph I/O, KV layout and names are unchanged.

Positions: GQA is **not** given ``position_ids``; it rotates each new token by its index in the KV
cache (``seqlens_k + 1 - sequence_length + s``). With ``position_ids`` supplied, onnxruntime 1.32 CPU
treats a prompt (its schema: "uses only the first element") differently from a decode step, so a
left-padded batch drifts between prefill and decode (measured on the shipped example, batch 2 with
left padding: decode logits off by up to 5.5, prefill exact).
By cache index, batch 1 and unpadded batches get exactly the positions Transformers.js computes
(``cumsum(mask) - 1``); a left-padded row's real tokens are all shifted by its pad count, which rotary
attention cannot see (scores depend on position differences only): their outputs are equal, the
keys stored for such a row differ from the graph before the pass (rotated by cache index). Custom
``position_ids`` that are not ``cumsum(mask) - 1`` (packed sequences, position offsets) are ignored by
the packed graph: do not use this pass for them. The ``position_ids`` graph input stays declared.

Tolerance: the same rotary formula applied by another kernel: logits within 1e-4 of the graph before
this pass (batch 1, prefill with past, batch 2 left-padded: prefill and decode), presents within 1e-5
except the keys of left-padded rows (float32, tiny test models of tests/test_pack_gqa.py).

Runtimes: onnxruntime 1.32 CPU; onnxruntime-node 1.30 and onnxruntime-web 1.31-dev wasm (the builds
Transformers.js 4.3.1 ships) are held to it by tests. onnxruntime-web WebGPU: packed QKV with
``do_rotary`` takes the same flash-attention prefill path as the unpacked node, which is wrong for
prompts of 32+ tokens on adapters with subgroup size < 8 (``passes/fuse_gqa.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from graphkit.errors import PassNotApplicable, PostconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance
from passes._graph import (MS_DOMAIN, Graph, attr, check_rewrite, fresh_name, node_label, remove_unused,
                            taken_names, toposort, why_detail)


@dataclass
class _Site:
    gqa: onnx.NodeProto
    split: onnx.NodeProto
    rotary_q: onnx.NodeProto
    rotary_k: onnx.NodeProto
    interleaved: int


def _split_sizes(gi: Graph, split: onnx.NodeProto) -> list[int] | None:
    if len(split.input) > 1 and split.input[1]:
        v = gi.const(split.input[1])
        return None if v is None else [int(x) for x in v.reshape(-1)]
    sizes = attr(split, "split")
    return [int(x) for x in sizes] if sizes else None


class PackGqaPass(GraphPass):
    name = "pack-gqa"
    tolerance = Tolerance("max_abs", 1e-4, "the graph before the pass",
                          "float32, left padding included; present KV within 1e-5 except left-padded rows' keys "
                          "(rotated by cache index)")
    mutates_input = True
    after = "fuse-rotary,fuse-gqa(padding=bias),pack-matmul"

    def _match(self, gi: Graph, gqa: onnx.NodeProto) -> _Site | str:
        if attr(gqa, "do_rotary", 0):
            return "already applies the rotary (do_rotary=1)"
        ins = list(gqa.input) + [""] * (10 - len(gqa.input))
        if not ins[1] or not ins[2] or any(ins[7:10]):
            return "query is already packed, or cos/sin/position_ids inputs are set"
        rq = gi.node_of(ins[0], "RotaryEmbedding", domain=(MS_DOMAIN,))
        rk = gi.node_of(ins[1], "RotaryEmbedding", domain=(MS_DOMAIN,))
        if rq is None or rk is None:
            return "query/key are not RotaryEmbedding outputs (run fuse-rotary and fuse-gqa first)"
        if list(rq.input[1:4]) != list(rk.input[1:4]) or len(rq.input) < 4:
            return "the q and k RotaryEmbedding nodes use different positions or cos/sin caches"
        interleaved = attr(rq, "interleaved", 0)
        if attr(rk, "interleaved", 0) != interleaved:
            return "q and k rotary differ in interleaving"
        if any(attr(r, "scale", 1.0) != 1.0 or attr(r, "is_packed_batching", 0) for r in (rq, rk)):
            return "RotaryEmbedding with scale or packed batching"
        split = gi.node_of(rq.input[0], "Split")
        if split is None or gi.node_of(rk.input[0], "Split") is not split or gi.node_of(ins[2], "Split") is not split:
            return "q/k/v are not the three outputs of one Split (run pack-matmul first)"
        if list(split.output) != [rq.input[0], rk.input[0], ins[2]]:
            return "the Split's outputs are not q, k, v in this order"
        rank, axis = gi.rank(split.input[0]), attr(split, "axis", 0)
        if rank not in (None, 3) or axis not in (-1, 2 if rank == 3 else -1):
            return "the Split is not along the last axis of a [batch, seq, features] tensor"
        cos = gi.shape(rq.input[2])
        num_heads, kv_heads = attr(gqa, "num_heads"), attr(gqa, "kv_num_heads")
        if not cos or len(cos) != 2 or not isinstance(cos[1], int):
            return "cos cache shape unknown"
        head_dim = 2 * cos[1]
        if head_dim % 16:
            return f"head_dim {head_dim} is not a multiple of 16 (GroupQueryAttention's own rotary needs it)"
        if attr(rq, "rotary_embedding_dim", 0) not in (0, head_dim) or attr(rk, "rotary_embedding_dim", 0) not in (0, head_dim):
            return "partial rotary"
        sizes = _split_sizes(gi, split)
        if sizes != [num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]:
            return (f"Split sizes {sizes} are not [num_heads*head_dim, kv_heads*head_dim] x2 "
                    f"for heads {num_heads}/{kv_heads}, head_dim {head_dim} (partial rotary?)")
        for t, reader in ((rq.input[0], rq), (rk.input[0], rk), (ins[2], gqa), (ins[0], gqa), (ins[1], gqa)):
            if not gi.only_user(t, reader):
                return f"'{t}' has other readers"
        if rq.input[1] not in gi.graph_inputs:
            # GQA will rotate by cache index: only the client's own cumsum(mask)-1 positions are known to agree
            return f"rotary positions '{rq.input[1]}' are computed in the graph, not a graph input"
        return _Site(gqa, split, rq, rk, int(interleaved))

    def _plan(self, model: onnx.ModelProto) -> tuple[list[_Site], dict[str, str]]:
        gi = Graph(model)
        sites, why = [], {}
        for n in model.graph.node:
            if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN:
                res = self._match(gi, n)
                if isinstance(res, str):
                    why[node_label(n)] = res
                else:
                    sites.append(res)
        return sites, why

    def match(self, model: onnx.ModelProto):
        plan = self._plan(model)
        sites, why = plan
        if not sites:
            detail = why_detail(why)
            raise PassNotApplicable("no GroupQueryAttention reading a split q/k/v projection through "
                                    "RotaryEmbedding" + detail)
        return plan

    def rewrite(self, model: onnx.ModelProto, plan) -> PassResult:
        sites, why = plan
        before = len(model.graph.node)
        removed = {id(n) for s in sites for n in (s.split, s.rotary_q, s.rotary_k)}
        rewired: dict[int, onnx.NodeProto] = {}
        taken = taken_names(model.graph)
        for s in sites:
            ins = list(s.gqa.input) + [""] * (10 - len(s.gqa.input))
            packed = s.split.input[0]
            cos, sin = s.rotary_q.input[2:4]
            new_inputs = [packed, "", "", *ins[3:7], cos, sin, "", *ins[10:]]
            while new_inputs and not new_inputs[-1]:
                new_inputs.pop()
            node = onnx.NodeProto()
            node.CopyFrom(s.gqa)
            if not node.name:  # the postcondition finds the rewritten nodes by name
                node.name = fresh_name("pack_gqa/GroupQueryAttention", taken)
            del node.input[:]
            node.input.extend(new_inputs)
            for a in list(node.attribute):
                if a.name in ("do_rotary", "rotary_interleaved"):
                    node.attribute.remove(a)
            node.attribute.extend([helper.make_attribute("do_rotary", 1),
                                   helper.make_attribute("rotary_interleaved", s.interleaved)])
            rewired[id(s.gqa)] = node
        keep = [rewired.get(id(n), n) for n in model.graph.node if id(n) not in removed]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        seeds = {x for s in sites for n in (s.split, s.rotary_q, s.rotary_k) for x in n.output}
        remove_unused(model, seeds)
        toposort(model)
        created = {n.name for n in rewired.values()}
        after = len(model.graph.node)
        details = {"packed": len(sites), "nodes_before": before, "nodes_after": after, "not_packed": why}
        return PassResult(model, True, f"{len(sites)} GroupQueryAttention nodes read packed q/k/v with do_rotary=1 "
                                       f"(Split + 2 RotaryEmbedding removed each); nodes {before} -> {after}", details,
                          created=created)

    def postconditions(self, result: PassResult) -> None:
        model = result.model
        check_rewrite(model, result.created, "pack-gqa", "GroupQueryAttention node")
        names = result.created
        for n in model.graph.node:
            if n.name in names and (attr(n, "do_rotary", 0) != 1 or n.input[1] or n.input[2]):
                raise PostconditionError(f"pack-gqa: '{n.name}' is not a packed do_rotary GroupQueryAttention")

