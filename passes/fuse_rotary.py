"""fuse-rotary: decomposed rotary position embedding -> ``com.microsoft.RotaryEmbedding``.

What is matched (HF ``apply_rotary_pos_emb`` with ``rotate_half``, as both torch exporters write it)::

    out = Add( Mul(x, C), Mul(Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2), axis=-1), S) )

(operands of Add/Mul in either order), where ``x`` is q or k in ``[batch, heads, seq, head_dim]``
layout and ``C`` / ``S`` are the cos / sin tensors built from ``position_ids`` (``Unsqueeze(cos, 1)``).
The structure is matched by op type; the parts whose form differs between exporters are then checked
by **running them** with onnxruntime on a copy of just those nodes:

* ``rotate_half``: the Neg/Slice/Concat cone of ``x`` must give exactly ``cat(-x[..., D/2:], x[..., :D/2])``
  for random ``x`` (dynamo writes constant Slice bounds, TorchScript computes them from ``Shape(x)``);
* ``C`` / ``S`` must depend on nothing but one int64 graph input (``position_ids``) and constants;
  evaluated for ``position_ids = [0 .. max_positions)`` they must have shape ``[1, 1, L, D]``, both
  halves of the last axis equal (``cat(freqs, freqs)``), and for random positions they must equal the
  table rows (a per-position lookup). The table's first half becomes ``cos_cache`` / ``sin_cache``
  ``[max_positions, D/2]`` (an initializer, in the type of ``C``), so the cache holds exactly the
  values the unfused graph computes (inv_freq, scaling such as ``attention_scaling``, dtype casts
  included, whatever the exporter wrote).

Result: ``RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0)`` (4-D input: no
``num_heads`` needed) named after the Add's output; the cos/sin subgraph and the rotate_half nodes are
removed once unused. ``position_ids`` stays a graph input (Transformers.js feeds it).

Not fused (reported in ``details["not_fused"]``): interleaved (GPT-J style) rotary, partial rotary
(``rotary_dim < head_dim``), cos/sin computed from anything other than one int64 graph input.
Position ids >= ``max_positions`` make onnxruntime fail with "position_ids value ... is out of range"
(Qwen2.5's ``max_position_embeddings`` is 32768, the default).

Checked in Python onnxruntime 1.32 and the builds Transformers.js 4.3.1 uses (onnxruntime-node 1.30,
onnxruntime-web 1.31-dev wasm). Run it before ``fp16``'s conversion or after it (an fp16 graph keeps
cos/sin in fp32 and casts them: the tables are evaluated in the cast type).

Tolerance: the fused op computes ``x*cos - x2*sin`` / ``x2*cos + x*sin`` with the same cos/sin
values; outputs equal the decomposed graph within a few float32 ulps (tests: 1e-6 absolute on
unit-scale q/k).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from passes._evaluate import cone, evaluate
from passes._graph import (MS_DOMAIN, ONNX_DOMAINS, Graph, attr, check_rewrite, declare, ensure_opset,
                            node_label, other_input, remove_unused, toposort, why_detail)


# ============================================================================ the pass
@dataclass
class FuseRotaryOptions:
    max_positions: int = option(32768, "rows of the cos/sin caches: position ids must stay below this "
                                       "(Qwen2.5: max_position_embeddings = 32768)")


@dataclass
class _Rotary:
    add: onnx.NodeProto
    x: str
    cos: str                    # the C tensor (broadcast cos)
    sin: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)   # Add, 2 Mul, Concat, Neg (removed)
    positions: str = ""
    cache: tuple[str, str] = ("", "")


class FuseRotaryPass(GraphPass):
    name = "fuse-rotary"
    Options = FuseRotaryOptions
    tolerance = Tolerance("max_abs", 1e-4, "the unfused graph",
                          "q/k after rotary equal the decomposed graph within a few float32 ulps (same cos/sin values, "
                          "evaluated from the graph's own subgraph)")
    mutates_input = True

    def validate_options(self) -> None:
        mp = self.options.max_positions
        if isinstance(mp, bool) or not isinstance(mp, int) or not 1 <= mp <= 1 << 22:
            raise GraphkitError(f"fuse-rotary: max_positions must be an integer from 1 to {1 << 22}, got {mp!r}")

    # ------------------------------------------------------------------ matching
    def _match_at(self, gi: Graph, add: onnx.NodeProto) -> tuple[_Rotary | None, str]:
        if len(add.input) != 2:
            return None, ""
        muls = [gi.node_of(i, "Mul") for i in add.input]
        if any(m is None for m in muls):
            return None, ""
        for m_a, m_b in (muls, muls[::-1]):
            for r_name in m_b.input:
                cat = gi.node_of(r_name, "Concat")
                if cat is None or len(cat.input) != 2 or attr(cat, "axis") not in (-1, 3):
                    continue
                neg = gi.node_of(cat.input[0], "Neg")
                sl2 = gi.node_of(cat.input[1], "Slice")
                if neg is None or sl2 is None:
                    continue
                sl1 = gi.node_of(neg.input[0], "Slice")
                if sl1 is None or sl1.input[0] != sl2.input[0]:
                    continue
                x = sl1.input[0]
                if x not in m_a.input:
                    continue
                c = other_input(m_a, x)
                s = other_input(m_b, r_name)
                if c is None or s is None:
                    continue
                singles = [(m_a.output[0], add), (m_b.output[0], add), (r_name, m_b), (neg.output[0], cat)]
                if not all(gi.only_user(t, n) for t, n in singles):
                    return None, "an intermediate of the rotary pattern has other readers"
                return _Rotary(add=add, x=x, cos=c, sin=s, nodes=[add, m_a, m_b, cat, neg]), ""
        return None, ""

    def _check_rotate_half(self, gi: Graph, r: _Rotary, dim: int) -> str | None:
        cat = r.nodes[3]
        rng = np.random.default_rng(0)
        for shape in ((1, 1, 1, dim), (2, 3, 5, dim)):
            xv = rng.standard_normal(shape).astype(np.float32)
            if gi.elem_type(r.x) == TensorProto.FLOAT16:
                xv = xv.astype(np.float16)
            out = evaluate(gi, [cat.output[0]], {r.x: xv})
            if out is None:
                return "the rotate_half part depends on more than x (or does not run alone)"
            want = np.concatenate([-xv[..., dim // 2:], xv[..., :dim // 2]], axis=-1)
            if out[0].shape != want.shape or not np.array_equal(out[0], want):
                return ("the Slice/Neg/Concat part is not rotate_half over the whole head "
                        "(interleaved or partial rotary)")
        return None

    def _tables(self, gi: Graph, r: _Rotary, cache: dict) -> tuple[str, np.ndarray, np.ndarray] | str:
        """(position input, cos table [L, D/2], sin table [L, D/2]) or why not."""
        key = (r.cos, r.sin)
        if key in cache:
            return cache[key]
        cs = cone(gi, [r.cos, r.sin], set())
        if cs is None:
            res = "cos/sin are computed with a subgraph-holding node"
        elif len(cs[0]) > 400:
            res = "cos/sin come from a large subgraph, not a position table"
        else:
            _, leaves = cs
            if len(leaves) != 1:
                res = f"cos/sin depend on {sorted(leaves) or 'no graph input'}, not on one position input"
            else:
                pos = next(iter(leaves))
                res = self._tables_from(gi, r, pos)
        cache[key] = res
        return res

    def _tables_from(self, gi: Graph, r: _Rotary, pos: str):
        if gi.elem_type(pos) != TensorProto.INT64:
            return f"position input '{pos}' is not int64"
        L = self.options.max_positions
        out = evaluate(gi, [r.cos, r.sin], {pos: np.arange(L, dtype=np.int64)[None, :]})
        if out is None:
            return "cos/sin cannot be evaluated from the position input alone"
        cos, sin = out
        if cos.ndim != 4 or cos.shape[:3] != (1, 1, L) or sin.shape != cos.shape or cos.shape[3] % 2:
            return f"cos/sin evaluate to shape {list(cos.shape)}, not [1, 1, positions, head_dim]"
        D = cos.shape[3]
        h = D // 2
        cos, sin = cos[0, 0], sin[0, 0]
        if not (np.array_equal(cos[:, :h], cos[:, h:]) and np.array_equal(sin[:, :h], sin[:, h:])):
            return "cos/sin halves differ (not cat(freqs, freqs))"
        rng = np.random.default_rng(1)
        probe = rng.integers(0, L, size=(2, 3)).astype(np.int64)
        out = evaluate(gi, [r.cos, r.sin], {pos: probe})
        if out is None or out[0].shape != (2, 1, 3, D):
            return "cos/sin are not a per-position lookup of [batch, seq] position ids"
        tol = 1e-6 if cos.dtype == np.float32 else 1e-3
        if (np.abs(out[0][:, 0] - cos[probe]).max() > tol or np.abs(out[1][:, 0] - sin[probe]).max() > tol):
            return "cos/sin at given positions differ from the table (not a per-position function)"
        return pos, np.ascontiguousarray(cos[:, :h]), np.ascontiguousarray(sin[:, :h])

    def _plan(self, model: onnx.ModelProto):
        gi = Graph(model)
        why: dict[str, str] = {}
        found: list[_Rotary] = []
        used: set[int] = set()
        tables: dict = {}
        for n in model.graph.node:
            if n.op_type != "Add" or n.domain not in ONNX_DOMAINS:
                continue
            r, reason = self._match_at(gi, n)
            if r is None:
                if reason:
                    why[node_label(n)] = reason
                continue
            if any(id(k) in used for k in r.nodes):
                continue
            t = self._tables(gi, r, tables)
            if isinstance(t, str):
                why[node_label(n)] = t
                continue
            pos, cos, sin = t
            D = 2 * cos.shape[1]
            xd = gi.last_dim(r.x)
            if xd is not None and xd != D:
                why[node_label(n)] = f"x's last dim {xd} is not the rotary dim {D} (partial rotary)"
                continue
            xr = gi.rank(r.x)
            if xr is not None and xr != 4:
                why[node_label(n)] = f"x has rank {xr}, not 4 ([batch, heads, seq, head_dim])"
                continue
            bad = self._check_rotate_half(gi, r, D)
            if bad:
                why[node_label(n)] = bad
                continue
            r.positions = pos
            used.update(id(k) for k in r.nodes)
            found.append(r)
        return gi, found, why, tables

    # ------------------------------------------------------------------ contract
    def match(self, model: onnx.ModelProto):
        plan = self._plan(model)
        _, found, why, _ = plan
        if not found:
            detail = why_detail(why)
            raise PassNotApplicable("no decomposed rotary embedding (x*cos + rotate_half(x)*sin) found" + detail)
        return plan

    def rewrite(self, model: onnx.ModelProto, plan) -> PassResult:
        gi, found, why, tables = plan
        g = model.graph
        before = len(g.node)
        # one cache pair per distinct table content
        caches: list[tuple[np.ndarray, np.ndarray, str, str]] = []
        new_inits = []
        for r in found:
            _, cos, sin = tables[(r.cos, r.sin)]
            hit = next((c for c in caches if c[0].shape == cos.shape and c[0].dtype == cos.dtype
                        and np.array_equal(c[0], cos) and np.array_equal(c[1], sin)), None)
            if hit is None:
                cn, sn = gi.fresh_name("rotary_cos_cache"), gi.fresh_name("rotary_sin_cache")
                new_inits += [tensors.new_tensor(cos, cn), tensors.new_tensor(sin, sn)]
                hit = (cos, sin, cn, sn)
                caches.append(hit)
            r.cache = (hit[2], hit[3])
        replace: dict[int, onnx.NodeProto] = {}
        removed_ids: set[int] = set()
        created = []
        for r in found:
            base = node_label(r.add)
            new = helper.make_node("RotaryEmbedding", [r.x, r.positions, r.cache[0], r.cache[1]], [r.add.output[0]],
                                   name=gi.fresh_name(f"{base}/RotaryEmbedding"), domain=MS_DOMAIN, interleaved=0)
            created.append(new.name)
            replace[gi.index[id(r.add)]] = new
            declare(model, r.add.output[0], helper.np_dtype_to_tensor_dtype(tables[(r.cos, r.sin)][1].dtype),
                    gi.shape(r.x))
            removed_ids.update(id(k) for k in r.nodes[1:])
        keep = []
        dropped = []
        for i, n in enumerate(g.node):
            if i in replace:
                keep.append(replace[i])
            elif id(n) in removed_ids:
                dropped.append(n)
            else:
                keep.append(n)
        # what the removed nodes read (Slices, the cos/sin subgraph) may now be unused
        cand = {i for n in dropped for i in n.input if i}
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(new_inits)
        remove_unused(model, cand)
        toposort(model)
        ensure_opset(model, MS_DOMAIN)
        details = {"fused": len(found), "caches": len(caches), "max_positions": self.options.max_positions,
                   "head_dim": int(2 * caches[0][0].shape[1]), "position_input": found[0].positions,
                   "nodes_before": before, "nodes_after": len(g.node), "not_fused": why}
        summary = (f"{len(found)} rotary embeddings -> RotaryEmbedding (cache {self.options.max_positions} x "
                   f"{caches[0][0].shape[1]}, {len(caches)} table pair(s)); nodes {before} -> {len(g.node)}")
        return PassResult(model, True, summary, details, created=set(created))

    def postconditions(self, result: PassResult) -> None:
        model = result.model
        created = result.created
        inits = check_rewrite(model, created, "fuse-rotary", "RotaryEmbedding node")
        for n in model.graph.node:
            if n.name in created:
                c, s = inits.get(n.input[2]), inits.get(n.input[3])
                if c is None or s is None or list(c.dims) != list(s.dims) or len(c.dims) != 2:
                    raise PostconditionError(f"fuse-rotary: node '{n.name}' has no [positions, head_dim/2] cos/sin caches")
