"""fuse-gqa: attention with KV cache -> ``com.microsoft.GroupQueryAttention`` (run ``fuse-rotary`` first).

The graph I/O does not change: ``past_key_values.{i}.key/value`` ``[batch, kv_heads, past, head_dim]``
in, ``present.{i}.key/value`` ``[batch, kv_heads, total, head_dim]`` out (GQA's BNSH past/present
layout), ``position_ids`` still read (by the rotary nodes), ``attention_mask`` still read (by the
mask subgraph below). Transformers.js sees the same session inputs and outputs.

What is matched, per layer (HF eager/SDPA attention as the torch exporters write it, after
``fuse-rotary``)::

    q_lin [B,S,N*H] -Reshape/Transpose-> [B,N,S,H] -RotaryEmbedding-> q_rot [-Mul/Div by a scalar]-> A
    k_lin -> ... -RotaryEmbedding-> k_rot;  present.key = Concat(past.key, k_rot, axis=2)  (graph output)
    v_lin -> ... -> v_t;                    present.value = Concat(past.value, v_t, axis=2) (graph output)
    B = repeat_kv(present.key)^T [* scalar];  V = repeat_kv(present.value)
    Softmax(MatMul(A, B) + bias, axis=-1) [-IsNaN/Where->0] -MatMul(., V)-> ctx [B,N,S,H]
    ctx -[Reshape]-Transpose(0,2,1,3)-Reshape-> attn_out [B,S,N*H]  (the o_proj input)

Op types anchor the match (Softmax, its Add and MatMuls, the RotaryEmbedding nodes, the present
Concats that are graph outputs); every piece whose form differs between exporters (head split,
repeat_kv, the K transpose, the output merge, the mask) is then checked by **running it** with
onnxruntime on a copy of just those nodes, fed random tensors in the roles above for a batch of 2 with
past, and compared with what it must compute: the head split/merge reshapes exactly, repeat_kv
exactly, ``A = s_q * q_rot`` and ``B = s_k * repeat_kv(K)^T`` (the GQA ``scale`` is ``s_q * s_k``, times
a scalar ``Mul``/``Div`` right after ``MatMul(A, B)`` as eager attention writes it),
``present = concat(past, new)`` along the sequence axis, and ``bias`` must be the causal + padding
mask built from ``attention_mask`` (0 where allowed, <= -1e4 where not). These pieces may read only
their own block's tensors, constants and graph inputs (never the model's weights), else the layer is
left alone and the reason reported.

Result per layer: ``RotaryEmbedding(q_lin, position_ids, cos, sin, num_heads=N)`` and the same for k on
the packed ``[B, S, hidden]`` tensors, then ``GroupQueryAttention(q, k, v_lin, past.key, past.value,
seqlens_k, total_sequence_length)`` with ``num_heads``, ``kv_num_heads``, ``scale``,
``do_rotary=0`` (webgpu in older onnxruntime-web rejected ``do_rotary``: microsoft/onnxruntime#22987)
whose outputs take the names ``attn_out``, ``present.{i}.key``, ``present.{i}.value``. After
``pack-matmul``, ``pack-gqa`` feeds GQA the packed q/k/v and moves the rotary into it (``do_rotary=1``).

Mask (computed once from ``attention_mask`` [B, T], option ``padding``):

* ``seqlens`` (default; what the onnxruntime-genai builder emits, loads in every runtime with GQA):
  ``seqlens_k = int32(ReduceSum(mask, 1) - 1)``, ``total_sequence_length = int32(T)``. GQA then
  assumes the valid tokens of a row are the **first** ``seqlens_k + 1`` positions (right padding):
  exact for batch 1 (Transformers.js's case) and for unpadded batches; **rows with left padding get
  wrong outputs** (they attend to the pads and lose their last tokens).
* ``bias``: ``seqlens_k = T - 1`` for every row and the padding passed as GQA's ``attention_bias``
  input ``[B, 1, S, T]`` (0 / finfo.min): exact for left padding too (checked on onnxruntime 1.32 CPU).
  Needs an onnxruntime whose GQA schema has ``attention_bias`` (input 10): a runtime without it
  refuses to load the model.

Limits of GQA itself (onnxruntime 1.32 CPU): batch > 1 with ``sequence_length > 1`` **and** a
non-empty past (chunked prefill of a batch) is refused with "batch_size must be 1 when
sequence_length > 1 and past context is given"; prefill with an empty past and decoding one token at
a time work for any batch. Positions where a query row is entirely masked (pad queries) produce
different values than the unfused graph (which writes 0 there); logits of real tokens are unaffected.

Tolerance: logits within 1e-5 of the unfused graph on the tiny test model (float32; softmax over
the same scores, scale applied once instead of to q and k separately); presents bit-identical.

Pass order: ``fuse-rotary`` before this pass; all fusions before ``fp16`` (on an fp16 graph the softmax
runs in an fp32 island with Casts around it, which this matcher does not follow: not applicable);
before or after ``matmul-nbits`` (MatMulNBits projections are recognised). Checked runtimes: Python
onnxruntime 1.32 CPU, and the builds Transformers.js 4.3.1 ships (onnxruntime-node 1.30,
onnxruntime-web 1.31-dev wasm), fp32 and q4f16 with a float16 KV cache. Known failure: fp16 with
``keep_io_types`` (fp32 KV cache Cast to fp16 in front of GQA) fails in onnxruntime-node 1.30 /
-web 1.31 with "Shape mismatch attempting to re-use buffer {1,2,0,16} != {1,2,6,16}" (GQA reuses the
Cast output's buffer for ``present``); onnxruntime 1.32 runs it. WebGPU (onnxruntime-web 1.31-dev, tested only on
SwiftShader, subgroup size 4): single-token decode and chunks under 32 tokens are exact; prefill of 32+ tokens is
wrong on adapters with subgroup size < 8 (an upstream flash-attention shader bug, tests/test_gqa_runtimes.py; packed
QKV with ``do_rotary=1`` takes the same path and is equally wrong there).
Not matched (reported): q/k norms inside attention (Qwen3), sliding-window or bidirectional masks,
packed QKV projections, attention without a KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError, PassNotApplicable
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from graphkit.tjs_contract import ATTENTION_MASK, BATCH, PAST_SEQUENCE, POSITION_IDS, SEQUENCE, TOTAL_SEQUENCE
from passes._graph import (MS_DOMAIN, ONNX_DOMAINS, Graph, attr, check_rewrite, declare, ensure_opset,
                            node_label, node_scope, remove_unused, toposort, why_detail)
from passes._evaluate import cone_walk, run_nodes, tensor_nbytes

_WORLD = dict(b=2, s=3, p=2)            # the batch used for the numeric checks (row 0 left-padded by 1)
_MAX_CONE_NODES = 400
_MAX_CONE_INIT_BYTES = 1 << 20


# ============================================================================ evaluation helpers
class _Evaluator:
    """Runs small cones of the graph with onnxruntime, fed role tensors + a consistent set of inputs."""

    def __init__(self, gi: Graph) -> None:
        self.gi = gi
        self.world = self._world()

    def _world(self) -> dict[str, np.ndarray] | None:
        gi = self.gi
        b, s, p = _WORLD["b"], _WORLD["s"], _WORLD["p"]
        t = p + s
        dims = {BATCH: b, SEQUENCE: s, PAST_SEQUENCE: p, TOTAL_SEQUENCE: t}
        mask = np.ones((b, t), np.int64)
        mask[0, 0] = 0
        rng = np.random.default_rng(3)
        feeds: dict[str, np.ndarray] = {}
        for vi in gi.graph.input:
            if vi.name not in gi.graph_inputs:
                continue
            tt = vi.type.tensor_type
            shape = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                elif d.dim_param in dims:
                    shape.append(dims[d.dim_param])
                else:
                    return None
            dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if vi.name == ATTENTION_MASK:
                feeds[vi.name] = mask.astype(dt)
            elif vi.name == POSITION_IDS:
                pos = np.cumsum(mask, 1) - 1
                pos[mask == 0] = 1
                feeds[vi.name] = pos[:, -s:].astype(dt)
            elif np.issubdtype(dt, np.integer):
                feeds[vi.name] = rng.integers(0, 8, size=shape).astype(dt)
            else:
                feeds[vi.name] = rng.standard_normal(shape).astype(dt)
        self.mask = mask
        return feeds

    def _dummy_shape(self, name: str) -> list[int] | None:
        shape = self.gi.shape(name)
        if shape is None:
            return None
        b, s, p = _WORLD["b"], _WORLD["s"], _WORLD["p"]
        dims = {BATCH: b, SEQUENCE: s, PAST_SEQUENCE: p, TOTAL_SEQUENCE: p + s}
        out = []
        for d in shape:
            if isinstance(d, int) and d > 0:
                out.append(d)
            elif isinstance(d, str) and d in dims:
                out.append(dims[d])
            else:
                return None
        return out

    def run(self, targets: list[str], roles: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        """Evaluate ``targets`` from ``roles`` + the world's graph inputs. A tensor read only through
        ``Shape`` (e.g. the embedding output, whose shape the mask code reads) is fed as zeros of its
        inferred shape instead of being computed from the model's weights."""
        gi = self.gi
        if self.world is None:
            return None
        feeds = dict(self.world)
        feeds.update(roles)
        roots = list(targets)
        for _ in range(8):
            w = cone_walk(gi, roots, set(feeds), through_shape=False, max_nodes=_MAX_CONE_NODES)
            if w is None:
                return None
            nodes_d, leaves, shape_refs, seen = w
            pending = [t for t in shape_refs
                       if t not in feeds and t not in seen and gi.initializer(t) is None]
            if not pending:
                break
            for t in pending:
                shp = self._dummy_shape(t)
                if shp is not None:
                    dt = gi.elem_type(t) or TensorProto.FLOAT
                    feeds[t] = np.zeros(shp, helper.tensor_dtype_to_np_dtype(dt))
                else:
                    roots.append(t)  # needed after all: compute it
        else:
            return None
        nodes = sorted(nodes_d.values(), key=lambda n: gi.index[id(n)])
        if leaves:
            return None
        used = {i for n in nodes for i in n.input if i} | set(targets)
        inits = [gi.inits[k] for k in used if k in gi.inits]
        if sum(tensor_nbytes(t) for t in inits) > _MAX_CONE_INIT_BYTES:
            return None  # reads model weights: not shape plumbing
        if any(n.domain not in ONNX_DOMAINS for n in nodes):
            return None
        return run_nodes(gi, nodes, targets, feeds, used - set(targets), inits)


def _scalar_fit(got: np.ndarray, ref: np.ndarray) -> float | None:
    """s with got == s * ref (float32 rounding allowed), else None."""
    if got.shape != ref.shape:
        return None
    r = ref.astype(np.float64)
    den = float((r * r).sum())
    if den == 0:
        return None
    s = float((got.astype(np.float64) * r).sum() / den)
    if not np.allclose(got, s * r, rtol=1e-5, atol=1e-6 * max(1.0, abs(s) * float(np.abs(r).max()))):
        return None
    return s


# ============================================================================ the pass
@dataclass
class FuseGqaOptions:
    padding: Literal["seqlens", "bias"] = option(
        "seqlens", "how attention_mask reaches GQA: seqlens = seqlens_k from the mask sum (genai style; exact "
                   "for batch 1 / right padding, wrong for left-padded rows); bias = seqlens_k = T-1 plus the "
                   "padding as attention_bias (exact for left padding; needs a runtime whose GQA has attention_bias)")


@dataclass
class _Attn:
    softmax: onnx.NodeProto
    q_lin: str
    k_lin: str
    v_lin: str
    past_k: str
    past_v: str
    present_k: str
    present_v: str
    attn_out: str
    positions: str
    cos: str
    sin: str
    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    dtype: int
    removed_outputs: list[str] = field(default_factory=list)   # tensors whose producers are replaced
    seeds: set[str] = field(default_factory=set)               # tensors of the old block (cleanup)


class FuseGqaPass(GraphPass):
    name = "fuse-gqa"
    Options = FuseGqaOptions
    tolerance = Tolerance("max_abs", 1e-4, "the unfused graph",
                          "float32, same softmax over the same scores; present KV bit-identical; padding=seqlens exact "
                          "only without left padding")
    mutates_input = True
    after = "fuse-rotary"  # q/k must come from RotaryEmbedding

    def validate_options(self) -> None:
        if self.options.padding not in ("seqlens", "bias"):
            raise GraphkitError(f"fuse-gqa: padding must be seqlens or bias, got {self.options.padding!r}")

    # ------------------------------------------------------------------ structure helpers
    @staticmethod
    def _back_through(gi: Graph, name: str, ops: tuple[str, ...], limit: int = 6) -> str:
        """Follow producers of type ``ops`` (first input) backwards; returns the first tensor not so produced."""
        for _ in range(limit):
            p = gi.node_of(name, ops)
            if p is None:
                return name
            name = p.input[0]
        return name

    @staticmethod
    def _proj(gi: Graph, name: str) -> tuple[str, int, int] | None:
        """(projection input, input width, output width) for q/k/v_lin = [Add(bias)] of MatMul / MatMulNBits."""
        n = gi.producer(name)
        if n is not None and n.op_type == "Add" and n.domain in ONNX_DOMAINS:
            for k in (0, 1):
                p = gi.producer(n.input[k])
                if p is not None and p.op_type in ("MatMul", "MatMulNBits") and gi.is_const(n.input[1 - k]):
                    n = p
                    break
        if n is None:
            return None
        if n.op_type == "MatMul" and n.domain in ONNX_DOMAINS:
            w = gi.inits.get(gi.const_root(n.input[1]))
            if w is not None and len(w.dims) == 2:
                return n.input[0], int(w.dims[0]), int(w.dims[1])
            d, k = gi.last_dim(name), gi.last_dim(n.input[0])
            return (n.input[0], k, d) if d and k else None
        if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN:
            return n.input[0], int(attr(n, "K")), int(attr(n, "N"))
        return None

    def _match(self, gi: Graph, ev: _Evaluator, sm: onnx.NodeProto, mask_cache: dict) -> _Attn | str:
        if attr(sm, "axis", -1) not in (-1, 3):
            return "Softmax is not over the last axis"
        add = gi.node_of(sm.input[0], "Add")
        if add is None:
            return "Softmax input is not scores + mask"
        mm, s_post, post = None, 1.0, None
        for k in (0, 1):
            cand = gi.node_of(add.input[k], "MatMul")
            sc = gi.node_of(add.input[k], ("Mul", "Div"))
            if cand is None and sc is not None:  # eager attention: MatMul(q, k^T) * scaling
                val = gi.scalar(sc.input[1])
                inner = gi.node_of(sc.input[0], "MatMul")
                if inner is not None and val and gi.only_user(inner.output[0], sc):
                    cand, post = inner, sc
                    s_post = val if sc.op_type == "Mul" else 1.0 / val
            if cand is not None:
                mm, bias = cand, add.input[1 - k]
                break
        if mm is None:
            return "no Q*K^T MatMul before the mask Add"
        A, B = mm.input
        # probabilities (optionally NaN-guarded) -> MatMul with V
        probs = sm.output[0]
        users = gi.users(probs)
        if {u.op_type for u in users} == {"IsNaN", "Where"} and len(users) == 2:
            isnan = next(u for u in users if u.op_type == "IsNaN")
            where = next(u for u in users if u.op_type == "Where")
            if where.input[0] == isnan.output[0] and where.input[2] == probs and gi.scalar(where.input[1]) == 0.0:
                probs = where.output[0]
                users = gi.users(probs)
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != probs:
            return "softmax output does not feed MatMul(probs, V)"
        pv = users[0]
        ctx, Vop = pv.output[0], pv.input[1]
        # forward from ctx through Reshape/Transpose to the merged [B, S, N*H] tensor
        chain_out = [ctx]
        cur = ctx
        for _ in range(4):
            us = [u for u in gi.users(cur) if u.op_type != "Shape"]  # shape plumbing may read it too
            if len(us) != 1 or us[0].op_type not in ("Reshape", "Transpose") or us[0].domain not in ONNX_DOMAINS \
                    or cur in gi.graph_outputs:
                break
            cur = us[0].output[0]
            chain_out.append(cur)
        if len(chain_out) < 2:
            return "attention output is not merged with Transpose/Reshape"
        attn_out = chain_out[-1]
        # q side: A = [scale *] RotaryEmbedding(...)
        q_rot = self._back_through(gi, A, ("Mul", "Div")) if gi.node_of(A, ("Mul", "Div")) else A
        qrot_node = gi.node_of(q_rot, "RotaryEmbedding", (MS_DOMAIN,))
        if qrot_node is None:
            return "q does not come from com.microsoft.RotaryEmbedding (run fuse-rotary first)"
        if attr(qrot_node, "interleaved", 0) != 0 or attr(qrot_node, "rotary_embedding_dim", 0):
            return "q rotary is interleaved or partial"
        q_t, positions, cos, sin = qrot_node.input[:4]
        q_lin = self._back_through(gi, q_t, ("Transpose", "Reshape"))
        # present key / value: graph outputs produced by a Concat in the cones of B and V
        pk = self._find_present(gi, B)
        pvv = self._find_present(gi, Vop)
        if pk is None or pvv is None or pk == pvv:
            return "K/V do not come from present.* Concat graph outputs"
        pk_node, pv_node = gi.producers[pk], gi.producers[pvv]
        k_rot = next((x for x in pk_node.input if gi.node_of(x, "RotaryEmbedding", (MS_DOMAIN,))), None)
        if k_rot is None:
            return "the new key is not produced by RotaryEmbedding"
        krot_node = gi.producers[k_rot]
        if list(krot_node.input[1:4]) != [positions, cos, sin] or attr(krot_node, "interleaved", 0) != 0:
            return "q and k rotary use different positions or caches"
        k_t = krot_node.input[0]
        k_lin = self._back_through(gi, k_t, ("Transpose", "Reshape"))
        v_t = pv_node.input[-1]
        v_lin = self._back_through(gi, v_t, ("Transpose", "Reshape"))
        if len({q_lin, k_lin, v_lin}) != 3 or q_lin == q_t or k_lin == k_t or v_lin == v_t:
            return "q/k/v head split not found"
        # dimensions from the past input (static kv_heads and head_dim: the Transformers.js contract)
        pkin = self._past_input(gi, pk_node)
        pvin = self._past_input(gi, pv_node)
        if pkin is None or pvin is None:
            return "present Concat does not start from a past_key_values graph input"
        past_k_vi = next(vi for vi in gi.graph.input if vi.name == pkin)
        past_v_vi = next(vi for vi in gi.graph.input if vi.name == pvin)
        dk = [d.dim_value if d.HasField("dim_value") else None for d in past_k_vi.type.tensor_type.shape.dim]
        dv = [d.dim_value if d.HasField("dim_value") else None for d in past_v_vi.type.tensor_type.shape.dim]
        if len(dk) != 4 or dk != dv or not dk[1] or not dk[3]:
            return "past key/value are not [batch, kv_heads, past, head_dim] with static kv_heads/head_dim"
        kvh, H = dk[1], dk[3]
        pq, pk_, pv_ = self._proj(gi, q_lin), self._proj(gi, k_lin), self._proj(gi, v_lin)
        if pq is None or pk_ is None or pv_ is None:
            return "q/k/v are not projections (MatMul / MatMulNBits [+ bias])"
        if pk_[2] != kvh * H or pv_[2] != kvh * H or pq[2] % H:
            return f"projection widths {pq[2]}/{pk_[2]}/{pv_[2]} do not fit kv_heads={kvh}, head_dim={H}"
        N = pq[2] // H
        if N % kvh:
            return f"num_heads {N} is not a multiple of kv_heads {kvh}"
        dtype = gi.elem_type(pkin)
        if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return "KV cache is not float32/float16"
        # ---------------------------------------------------------------- numeric checks
        b, s, p = _WORLD["b"], _WORLD["s"], _WORLD["p"]
        t = p + s
        npdt = helper.tensor_dtype_to_np_dtype(dtype)
        rng = np.random.default_rng(11)
        r = lambda *shape: rng.standard_normal(shape).astype(npdt)  # noqa: E731
        x_in = {pq[0]: r(b, s, pq[1])} if pq[0] == pk_[0] == pv_[0] else {}
        ql, kl, vl = r(b, s, N * H), r(b, s, kvh * H), r(b, s, kvh * H)
        qt, kt, vt = (ql.reshape(b, s, N, H).transpose(0, 2, 1, 3), kl.reshape(b, s, kvh, H).transpose(0, 2, 1, 3),
                      vl.reshape(b, s, kvh, H).transpose(0, 2, 1, 3))
        qr, kr = r(b, N, s, H), r(b, kvh, s, H)
        past_k, past_v = ev.world[pkin] if ev.world else None, ev.world[pvin] if ev.world else None
        if past_k is None:
            return "graph inputs have dims other than batch_size/sequence_length/past_/total_sequence_length"
        PK, PV = np.concatenate([past_k, kr], 2), np.concatenate([past_v, vt], 2)
        roles = {**x_in, q_lin: ql, k_lin: kl, v_lin: vl, q_rot: qr, k_rot: kr}
        # head split
        got = ev.run([q_t, k_t, v_t], {**x_in, q_lin: ql, k_lin: kl, v_lin: vl})
        if got is None or not all(g.shape == w.shape and np.array_equal(g, w) for g, w in zip(got, (qt, kt, vt))):
            return "q/k/v head split is not reshape [B,S,heads,head_dim] + transpose(0,2,1,3)"
        # present = concat(past, new)
        got = ev.run([pk, pvv], {**roles, v_t: vt})
        if got is None or got[0].shape != PK.shape or not np.array_equal(got[0], PK) or not np.array_equal(got[1], PV):
            return "present.key/value are not concat(past, new) along the sequence axis"
        roles2 = {**roles, pk: PK, pvv: PV}
        rep = N // kvh
        got = ev.run([B, Vop] + ([A] if A != q_rot else []), roles2)
        if got is None:
            return "Q/K/V operands depend on more than the attention block (or do not run alone)"
        s_q = 1.0 if A == q_rot else _scalar_fit(got[2], qr)
        s_k = _scalar_fit(got[0], np.repeat(PK, rep, axis=1).transpose(0, 1, 3, 2))
        if s_q is None or s_k is None:
            return "Q*K^T operands are not scaled q and repeat_kv(K)^T"
        if got[1].shape != (b, N, t, H) or not np.array_equal(got[1], np.repeat(PV, rep, axis=1)):
            return "V operand is not repeat_kv(present.value)"
        ctxv = r(b, N, s, H)
        scores = {x: r(b, N, s, t) for x in (probs, sm.output[0], mm.output[0]) + ((post.output[0],) if post else ())}
        got = ev.run([attn_out], {**roles2, ctx: ctxv, **scores})
        want = ctxv.transpose(0, 2, 1, 3).reshape(b, s, N * H)
        if got is None or got[0].shape != want.shape or not np.array_equal(got[0], want):
            return "attention output merge is not transpose(0,2,1,3) + reshape [B,S,N*H]"
        bad = self._check_mask(ev, bias, mask_cache)
        if bad:
            return bad
        removed = [attn_out, pk, pvv]
        seeds = {A, B, Vop, bias, ctx, q_t, k_t, v_t, q_rot, k_rot, mm.output[0]} | set(chain_out)
        return _Attn(softmax=sm, q_lin=q_lin, k_lin=k_lin, v_lin=v_lin, past_k=pkin, past_v=pvin, present_k=pk,
                     present_v=pvv, attn_out=attn_out, positions=positions, cos=cos, sin=sin, num_heads=N,
                     kv_heads=kvh, head_dim=H, scale=float(np.float32(s_q * s_k * s_post)), dtype=dtype,
                     removed_outputs=removed, seeds=seeds)

    @staticmethod
    def _find_present(gi: Graph, start: str) -> str | None:
        """The one graph output produced by a Concat that ``start`` is computed from (the walk does not go
        past such outputs, so earlier layers' presents are not seen)."""
        found: set[str] = set()
        seen: set[str] = set()
        stack = [start]
        while stack and len(seen) < 2 * _MAX_CONE_NODES:
            t = stack.pop()
            if not t or t in seen:
                continue
            seen.add(t)
            p = gi.producer(t)
            if p is None:
                continue
            if t in gi.graph_outputs and p.op_type == "Concat":
                found.add(t)
                continue
            stack.extend(p.input)
        return next(iter(found)) if len(found) == 1 else None

    @staticmethod
    def _past_input(gi: Graph, concat: onnx.NodeProto) -> str | None:
        """The graph input at the start of a present Concat: directly, or through a 1-input Concat / Identity."""
        if len(concat.input) != 2 or attr(concat, "axis") not in (-2, 2):
            return None
        name = concat.input[0]
        for _ in range(3):
            if name in gi.graph_inputs:
                return name
            p = gi.producer(name)
            if p is None or p.domain not in ONNX_DOMAINS or not (
                    p.op_type == "Identity" or (p.op_type == "Concat" and len(p.input) == 1)):
                return None
            name = p.input[0]
        return None

    def _check_mask(self, ev: _Evaluator, bias: str, cache: dict) -> str | None:
        if bias in cache:
            return cache[bias]
        res = None
        got = ev.run([bias], {})
        if got is None:
            res = "the mask added to the scores cannot be evaluated from the graph inputs"
        else:
            m = got[0]
            b, s, p = _WORLD["b"], _WORLD["s"], _WORLD["p"]
            t = p + s
            causal = np.arange(t)[None, :] <= (p + np.arange(s))[:, None]
            allowed = causal[None, None] & (ev.mask[:, None, None, :] > 0)
            try:
                m = np.broadcast_to(m, (b, m.shape[1] if m.ndim == 4 else 1, s, t))
            except ValueError:
                res = f"the mask has shape {list(got[0].shape)}, not [batch, 1|heads, seq, total]"
            if res is None:
                allowed = np.broadcast_to(allowed, m.shape)
                if not (np.all(np.abs(m[allowed]) < 1e-3) and np.all(m[~allowed] <= -1e4)):
                    res = "the mask is not causal + attention_mask padding (sliding window or bidirectional?)"
        cache[bias] = res
        return res

    def _plan(self, model: onnx.ModelProto):
        gi = Graph(model)
        ev = _Evaluator(gi)
        why: dict[str, str] = {}
        found: list[_Attn] = []
        mask_cache: dict = {}
        if ATTENTION_MASK not in gi.graph_inputs:
            return gi, found, {"graph": "no attention_mask graph input"}
        if ev.world is None:
            return gi, found, {"graph": "graph inputs have dims other than batch_size / sequence_length / "
                                        "past_sequence_length / total_sequence_length"}
        for n in model.graph.node:
            if n.op_type == "Softmax" and n.domain in ONNX_DOMAINS:
                res = self._match(gi, ev, n, mask_cache)
                if isinstance(res, str):
                    why[node_label(n)] = res
                else:
                    found.append(res)
        if found:
            outs = [x for a in found for x in (a.present_k, a.present_v, a.attn_out)]
            if len(set(outs)) != len(outs):
                return gi, [], {"graph": "two attention blocks share a present output"}
        return gi, found, why

    # ------------------------------------------------------------------ contract
    def match(self, model: onnx.ModelProto):
        plan = self._plan(model)
        _, found, why = plan
        if not found:
            detail = why_detail(why)
            raise PassNotApplicable("no KV-cache attention block to fuse into GroupQueryAttention" + detail)
        return plan

    def rewrite(self, model: onnx.ModelProto, plan) -> PassResult:
        gi, found, why = plan
        g = model.graph
        before = len(g.node)
        fresh = gi.fresh_name
        mask_nodes, mask_inits, seqlens, total, bias = self._mask_subgraph(found[0].dtype, fresh)
        new_by_out: dict[str, list[onnx.NodeProto]] = {}
        created = []
        for a in found:
            base = node_scope(a.softmax)
            qr, kr = fresh(f"{a.q_lin}_rotary"), fresh(f"{a.k_lin}_rotary")
            nodes = [
                helper.make_node("RotaryEmbedding", [a.q_lin, a.positions, a.cos, a.sin], [qr],
                                 name=fresh(f"{base}/q_rotary"), domain=MS_DOMAIN, interleaved=0,
                                 num_heads=a.num_heads),
                helper.make_node("RotaryEmbedding", [a.k_lin, a.positions, a.cos, a.sin], [kr],
                                 name=fresh(f"{base}/k_rotary"), domain=MS_DOMAIN, interleaved=0,
                                 num_heads=a.kv_heads),
            ]
            ins = [qr, kr, a.v_lin, a.past_k, a.past_v, seqlens, total]
            if bias:
                ins += ["", "", "", bias]
            gqa = helper.make_node("GroupQueryAttention", ins, [a.attn_out, a.present_k, a.present_v],
                                   name=fresh(f"{base}/GroupQueryAttention"), domain=MS_DOMAIN,
                                   num_heads=a.num_heads, kv_num_heads=a.kv_heads, scale=a.scale,
                                   local_window_size=-1, do_rotary=0)
            nodes.append(gqa)
            created.append(gqa.name)
            declare(model, qr, a.dtype, [None, None, a.num_heads * a.head_dim])
            declare(model, kr, a.dtype, [None, None, a.kv_heads * a.head_dim])
            declare(model, a.attn_out, a.dtype, [None, None, a.num_heads * a.head_dim])
            new_by_out[a.attn_out] = nodes
        replaced = {x for a in found for x in a.removed_outputs}
        old_inputs: set[str] = set()
        keep: list[onnx.NodeProto] = list(mask_nodes)
        for n in g.node:
            outs = [o for o in n.output if o]
            if any(o in replaced for o in outs):
                old_inputs.update(i for i in n.input if i)
                for o in outs:
                    keep.extend(new_by_out.get(o, []))
            else:
                keep.append(n)
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(mask_inits)
        seeds = old_inputs | {x for a in found for x in a.seeds}
        remove_unused(model, seeds)
        toposort(model)
        ensure_opset(model, MS_DOMAIN)
        a0 = found[0]
        details = {"fused": len(found), "num_heads": a0.num_heads, "kv_num_heads": a0.kv_heads,
                   "head_dim": a0.head_dim, "scale": a0.scale, "padding": self.options.padding,
                   "nodes_before": before, "nodes_after": len(g.node), "not_fused": why}
        summary = (f"{len(found)} attention blocks -> GroupQueryAttention (heads {a0.num_heads}/{a0.kv_heads}, "
                   f"head_dim {a0.head_dim}, padding={self.options.padding}); nodes {before} -> {len(g.node)}")
        return PassResult(model, True, summary, details, created=set(created))

    def _mask_subgraph(self, dtype: int, fresh):
        """seqlens_k [B] int32, total_sequence_length scalar int32 (and attention_bias) from attention_mask."""
        c = lambda v, base: numpy_helper.from_array(np.asarray(v), fresh(base))  # noqa: E731
        one = c(np.array(1, np.int64), "gqa/one")
        axis1 = c(np.array([1], np.int64), "gqa/axis1")
        inits = [one, axis1]
        shape = fresh("gqa/mask_shape")
        total64 = fresh("gqa/total_length_i64")
        total = fresh("gqa/total_sequence_length")
        seqlens = fresh("gqa/seqlens_k")
        nodes = [
            helper.make_node("Shape", [ATTENTION_MASK], [shape], name=fresh("gqa/Shape")),
            helper.make_node("Gather", [shape, one.name], [total64], name=fresh("gqa/Gather_total"), axis=0),
            helper.make_node("Cast", [total64], [total], name=fresh("gqa/Cast_total"), to=TensorProto.INT32),
        ]
        bias = ""
        if self.options.padding == "seqlens":
            msum, m1 = fresh("gqa/mask_sum"), fresh("gqa/mask_sum_minus_1")
            nodes += [
                helper.make_node("ReduceSum", [ATTENTION_MASK, axis1.name], [msum], name=fresh("gqa/ReduceSum"),
                                 keepdims=0),
                helper.make_node("Sub", [msum, one.name], [m1], name=fresh("gqa/Sub")),
                helper.make_node("Cast", [m1], [seqlens], name=fresh("gqa/Cast_seqlens"), to=TensorProto.INT32),
            ]
        else:
            npdt = helper.tensor_dtype_to_np_dtype(dtype)
            zero_i = c(np.array(0, np.int64), "gqa/zero")
            i0 = c(np.array([0], np.int64), "gqa/index0")
            ax12 = c(np.array([1, 2], np.int64), "gqa/axes12")
            neg = c(np.array(np.finfo(npdt).min, npdt), "gqa/mask_min")
            zf = c(np.array(0, npdt), "gqa/mask_zero")
            inits += [zero_i, i0, ax12, neg, zf]
            bsz, t1, t1b, pad, b2, b4, pshape, sq, tgt = (fresh(f"gqa/{k}") for k in (
                "batch", "total_minus_1", "total_minus_1_b", "is_pad", "bias_2d", "bias_4d", "pos_shape", "seq",
                "bias_shape"))
            nodes += [
                helper.make_node("Gather", [shape, i0.name], [bsz], name=fresh("gqa/Gather_batch"), axis=0),
                helper.make_node("Sub", [total64, one.name], [t1], name=fresh("gqa/Sub")),
                helper.make_node("Expand", [t1, bsz], [t1b], name=fresh("gqa/Expand_seqlens")),
                helper.make_node("Cast", [t1b], [seqlens], name=fresh("gqa/Cast_seqlens"), to=TensorProto.INT32),
                helper.make_node("Equal", [ATTENTION_MASK, zero_i.name], [pad], name=fresh("gqa/Equal")),
                helper.make_node("Where", [pad, neg.name, zf.name], [b2], name=fresh("gqa/Where")),
                helper.make_node("Unsqueeze", [b2, ax12.name], [b4], name=fresh("gqa/Unsqueeze")),
                helper.make_node("Shape", [POSITION_IDS], [pshape], name=fresh("gqa/Shape_pos")),
                helper.make_node("Gather", [pshape, axis1.name], [sq], name=fresh("gqa/Gather_seq"), axis=0),
            ]
            ones = c(np.array([1], np.int64), "gqa/one_1d")
            total1 = fresh("gqa/total_1d")
            inits.append(ones)
            bias = fresh("gqa/attention_bias")
            nodes += [
                helper.make_node("Gather", [shape, axis1.name], [total1], name=fresh("gqa/Gather_total_1d"), axis=0),
                helper.make_node("Concat", [bsz, ones.name, sq, total1], [tgt], name=fresh("gqa/Concat"), axis=0),
                helper.make_node("Expand", [b4, tgt], [bias], name=fresh("gqa/Expand_bias")),
            ]
        return nodes, inits, seqlens, total, bias

    def postconditions(self, result: PassResult) -> None:
        model = result.model
        check_rewrite(model, result.created, "fuse-gqa", "GroupQueryAttention node")
