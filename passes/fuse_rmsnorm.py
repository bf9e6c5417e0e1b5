"""fuse-rmsnorm: decomposed RMSNorm -> ``SimplifiedLayerNormalization``; with the residual ``Add``
in front of it -> ``com.microsoft.SkipSimplifiedLayerNormalization``.

What is matched (by structure, then checked; both torch exporters write this chain)::

    x --Pow(·, 2) | Mul(x, x)--> ReduceMean(axes=[last], keepdims=1) --Add(eps)--> Sqrt
      --Reciprocal | Div(1, ·)--> Mul(x, ·)            (or Div(x, Sqrt) directly)
      [--Cast(to=T)] --> Mul(weight, ·) | Mul(·, weight) --> y

* the exponent must be the constant 2, ``eps`` a constant scalar (``1 x 1`` shapes allowed),
  ``1`` in ``Div(1, ·)`` the constant 1, and ``ReduceMean`` must reduce exactly the last axis
  (``axes`` attribute before opset 18, constant ``axes`` input from 18 on; ``-1`` or ``rank-1``);
* ``weight`` is a constant 1-D tensor ``[H]`` (initializer, ``Constant``, also seen through
  ``Identity``) and, where the shape of ``x`` is known, ``H`` equals its last dimension;
* every intermediate tensor of the chain is read only by the next node of the chain and is not a
  graph output (otherwise it is still needed and the chain is left alone);
* the ``Cast`` before the weight multiply (HF casts the normalized value back to the input dtype) is
  allowed; its target type must be the weight's type, which is the fused node's output type.

Result: ``SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)`` in the
default domain (ONNX Runtime registers this contrib op in the ONNX domain, since version 1; its
``scale`` type may differ from ``X``'s and is the output type, so ``x`` float32 with an fp16 weight
is expressed exactly). ``y`` keeps its name.

``onnx.checker`` does not know ``SimplifiedLayerNormalization`` (it is not an ONNX op, only registered
by onnxruntime in that domain, as in the onnxruntime-genai builder's graphs) and reports "No Op
registered for SimplifiedLayerNormalization"; option ``plain=false`` leaves the norms that have no
residual Add (the first layer's input norm; Qwen3's q/k norms) decomposed for a checker-clean graph.

Skip variant (option ``skip``, default on): when ``x`` is ``Add(a, b)`` (seen through a ``Cast``
that casts to the type it already has: the TorchScript exporter writes ``Cast(to=FLOAT)`` on a float
residual), with ``a`` and ``b`` both non-constant and, where their shapes are known, rank 3 with
last dimension ``H`` and no broadcasting, the Add and the norm become one
``com.microsoft.SkipSimplifiedLayerNormalization(a, b, weight, epsilon=eps)`` whose fourth output
(``input_skip_bias_sum``) takes over the Add's output name, so the residual stream that reads the
sum is untouched. This is what the onnxruntime-genai builder emits: per decoder layer two Skip
norms, one plain norm for the first layer's input.

Tolerance: the fused kernels compute the mean of squares and ``1/sqrt`` in float32 (the same math
in a different summation order): outputs equal the decomposed graph within about 1e-6 relative
(tests assert 1e-5 relative to the output scale); the Skip variant's sum output is exact.
Nodes that become unused (the chain, the Add, the no-op Cast, eps/exponent constants) are removed.
The graph helpers it uses are shared with the other fusions (``passes/_graph.py``, the layer every pass shares).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper

from graphkit.errors import GraphkitError, PassNotApplicable
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from passes._graph import (MS_DOMAIN, ONNX_DOMAINS, Graph, attr, check_rewrite, declare, ensure_opset,
                            node_label, node_scope, other_input, remove_unused, toposort)


# ============================================================================ the pass
@dataclass
class FuseRmsNormOptions:
    skip: bool = option(True, "also fuse the residual Add in front of a norm into "
                              "com.microsoft.SkipSimplifiedLayerNormalization")
    plain: bool = option(True, "fuse norms without a residual Add into SimplifiedLayerNormalization (onnxruntime's "
                               "op in the ONNX domain: onnxruntime and onnxruntime-web run it, onnx.checker reports "
                               "'No Op registered'); false leaves them decomposed")


@dataclass
class _Norm:
    x: str                      # the tensor normalized (read by Pow and the Mul)
    weight: str                 # the constant weight [H]
    eps: float
    y: str                      # output (the weight Mul's output)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # chain nodes, all removed
    hidden: int = 0
    wtype: int = TensorProto.FLOAT
    # Skip variant
    add: onnx.NodeProto | None = None
    noop_cast: onnx.NodeProto | None = None


class FuseRmsNormPass(GraphPass):
    name = "fuse-rmsnorm"
    Options = FuseRmsNormOptions
    tolerance = Tolerance("max_abs", 1e-4, "the unfused graph",
                          "norm outputs within ~1e-6 relative of the decomposed graph (float32 accumulation in another "
                          "order; tests assert 1e-5 relative to the output scale); residual sums exact")
    mutates_input = True

    def validate_options(self) -> None:
        for key in ("skip", "plain"):
            if not isinstance(getattr(self.options, key), bool):
                raise GraphkitError(f"fuse-rmsnorm: {key} must be true or false, got {getattr(self.options, key)!r}")

    # ------------------------------------------------------------------ matching
    def _match_at(self, gi: Graph, rm: onnx.NodeProto, why: dict[str, str]) -> _Norm | None:
        label = node_label(rm)

        def no(reason: str) -> None:
            why[label] = reason
            return None

        keepdims = attr(rm, "keepdims", 1)
        if keepdims != 1:
            return no("ReduceMean keepdims=0")
        axes = attr(rm, "axes")
        if axes is None and len(rm.input) > 1 and rm.input[1]:
            a = gi.const(rm.input[1])
            if a is None:
                return no("ReduceMean axes are not constant")
            axes = [int(v) for v in a.reshape(-1)]
        if axes is None or len(axes) != 1:
            return no(f"ReduceMean axes {axes} are not one axis")
        # the squared tensor
        sq = gi.node_of(rm.input[0], ("Pow", "Mul"))
        if sq is None or not gi.only_user(rm.input[0], rm):
            return no("ReduceMean input is not Pow(x, 2) / Mul(x, x) used only here")
        if sq.op_type == "Pow":
            if gi.scalar(sq.input[1]) != 2.0:
                return no("Pow exponent is not the constant 2")
            x = sq.input[0]
        else:
            if sq.input[0] != sq.input[1]:
                return no("Mul is not x*x")
            x = sq.input[0]
        rank = gi.rank(x)
        if not (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)):
            return no(f"ReduceMean axis {axes[0]} is not the last axis (rank {rank})")
        # + eps
        add = self._single_user(gi, rm.output[0], "Add")
        if add is None:
            return no("ReduceMean is not followed by Add(eps)")
        eps_name = other_input(add, rm.output[0])
        eps = gi.scalar(eps_name) if eps_name else None
        if eps is None or not (0 <= eps < 1):
            return no("Add after ReduceMean is not a constant epsilon in [0, 1)")
        sqrt = self._single_user(gi, add.output[0], "Sqrt")
        if sqrt is None:
            return no("no Sqrt after the epsilon Add")
        chain = [sq, rm, add, sqrt]
        # 1/sqrt then * x, or x / sqrt
        users = gi.users(sqrt.output[0])
        if len(users) != 1 or sqrt.output[0] in gi.graph_outputs:
            return no("Sqrt output has several readers")
        u = users[0]
        if u.domain not in ONNX_DOMAINS:
            return no("Sqrt is read by a non-ONNX op")
        if u.op_type == "Div" and u.input[1] == sqrt.output[0] and u.input[0] == x:
            normed = u
            chain.append(u)
        else:
            if u.op_type == "Reciprocal":
                inv = u
            elif u.op_type == "Div" and u.input[1] == sqrt.output[0] and gi.scalar(u.input[0]) == 1.0:
                inv = u
            else:
                return no(f"Sqrt is followed by {u.op_type}, not Reciprocal / Div(1, .) / Div(x, .)")
            normed = self._single_user(gi, inv.output[0], "Mul")
            if normed is None or other_input(normed, inv.output[0]) != x:
                return no("1/sqrt is not multiplied by the normalized input x")
            chain += [inv, normed]
        # the pattern's x must be the same tensor read by the square and the scale
        cur = normed.output[0]
        users = gi.users(cur)
        if len(users) != 1 or cur in gi.graph_outputs or cur in gi.subgraph_reads:
            return no("normalized tensor has several readers (no weight multiply to fuse)")
        nxt = users[0]
        if nxt.op_type == "Cast" and nxt.domain in ONNX_DOMAINS:
            chain.append(nxt)
            cur = nxt.output[0]
            users = gi.users(cur)
            if len(users) != 1 or cur in gi.graph_outputs or cur in gi.subgraph_reads:
                return no("Cast after the norm has several readers")
            nxt = users[0]
        if nxt.op_type != "Mul" or nxt.domain not in ONNX_DOMAINS:
            return no("the normalized tensor is not multiplied by a weight")
        w = other_input(nxt, cur)
        wv = gi.const(w) if w else None
        if wv is None or wv.ndim != 1 or wv.dtype.kind != "f":
            return no("the weight is not a constant 1-D float tensor")
        H = int(wv.shape[0])
        xd = gi.last_dim(x)
        if xd is not None and xd != H:
            return no(f"weight has {H} elements but x's last dimension is {xd}")
        chain.append(nxt)
        if chain[-2].op_type == "Cast":
            to = attr(chain[-2], "to")
            if to != helper.np_dtype_to_tensor_dtype(wv.dtype):
                return no("the Cast before the weight multiply does not cast to the weight's type")
        return _Norm(x=x, weight=gi.const_root(w), eps=eps, y=nxt.output[0], nodes=chain, hidden=H,
                     wtype=helper.np_dtype_to_tensor_dtype(wv.dtype))

    @staticmethod
    def _single_user(gi: Graph, name: str, op: str) -> onnx.NodeProto | None:
        users = gi.users(name)
        if len(users) != 1 or name in gi.graph_outputs or name in gi.subgraph_reads:
            return None
        u = users[0]
        return u if u.op_type == op and u.domain in ONNX_DOMAINS else None

    def _match_skip(self, gi: Graph, m: _Norm, claimed: set[int]) -> str | None:
        """Attach the residual Add (and a no-op Cast) to ``m``; returns None or why not."""
        src, cast = m.x, None
        p = gi.node_of(src, "Cast")
        if p is not None:
            t_in, to = gi.elem_type(p.input[0]), attr(p, "to")
            if not t_in or t_in != to:
                return "x comes from a Cast that changes the type"
            cast, src = p, p.input[0]
        add = gi.node_of(src, "Add")
        if add is None or len(add.input) != 2:
            return "x is not produced by an Add"
        if id(add) in claimed:
            return "the Add already feeds another fused norm"
        a, b = add.input
        if gi.is_const(a) or gi.is_const(b):
            return "the Add has a constant operand (a bias, not a residual)"
        sa, sb, so = gi.shape(a), gi.shape(b), gi.shape(src)
        for s in (sa, sb, so):
            if s is not None and len(s) != 3:
                return f"the residual Add is rank {len(s)}, not 3 ([batch, seq, hidden])"
            if s is not None and isinstance(s[-1], int) and s[-1] > 0 and s[-1] != m.hidden:
                return f"the residual Add's last dimension {s[-1]} is not {m.hidden}"
        if sa is not None and sb is not None:
            for da, db in zip(sa, sb):
                if (isinstance(da, int) and isinstance(db, int) and da != db) or ((da == 1) != (db == 1)):
                    return f"the residual Add broadcasts ({sa} + {sb})"
        if cast is not None and (cast.output[0] in gi.graph_outputs or cast.output[0] in gi.subgraph_reads):
            return "the no-op Cast's output is a graph output"
        ta, tb, tw = gi.elem_type(a), gi.elem_type(b), gi.elem_type(m.weight)
        if (ta and tb and ta != tb) or (ta and tw and ta != tw):
            return "the residual Add's inputs and the weight have different types"
        m.add, m.noop_cast = add, cast
        claimed.add(id(add))
        return None

    def _plan(self, model: onnx.ModelProto) -> tuple[Graph, list[_Norm], dict[str, str]]:
        gi = Graph(model)
        why: dict[str, str] = {}
        norms: list[_Norm] = []
        used: set[int] = set()
        for n in model.graph.node:
            if n.op_type == "ReduceMean" and n.domain in ONNX_DOMAINS:
                m = self._match_at(gi, n, why)
                if m is None:
                    continue
                if any(id(c) in used for c in m.nodes):
                    why[node_label(n)] = "overlaps another matched norm"
                    continue
                used.update(id(c) for c in m.nodes)
                norms.append(m)
        if self.options.skip:
            claimed: set[int] = set()
            for m in norms:
                reason = self._match_skip(gi, m, claimed)
                if reason:
                    why[f"skip:{m.y}"] = reason
        if not self.options.plain:
            for m in norms:
                if m.add is None:
                    why[f"plain:{m.y}"] = "no residual Add and plain=false: left decomposed"
            norms = [m for m in norms if m.add is not None]
        for m in norms:  # a plain norm behind a Cast to the type x already has: drop the Cast too
            p = gi.node_of(m.x, "Cast") if m.add is None else None
            if p is not None and gi.elem_type(p.input[0]) and gi.elem_type(p.input[0]) == attr(p, "to") \
                    and m.x not in gi.graph_outputs and m.x not in gi.subgraph_reads:
                m.noop_cast = p
        return gi, norms, why

    # ------------------------------------------------------------------ contract
    def match(self, model: onnx.ModelProto):
        plan = self._plan(model)
        _, norms, why = plan
        if not norms:
            reasons = sorted(set(v for k, v in why.items() if not k.startswith("skip:")))
            detail = f" (ReduceMean nodes seen: {len(why)}; {'; '.join(reasons[:3])})" if why else ""
            raise PassNotApplicable("no decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul) found" + detail)
        return plan

    def rewrite(self, model: onnx.ModelProto, plan) -> PassResult:
        gi, norms, why = plan
        g = model.graph
        before = len(g.node)
        replace: dict[int, list[onnx.NodeProto]] = {}
        drop: set[int] = set()
        created: list[str] = []
        rename: dict[str, str] = {}
        n_skip = 0
        for m in norms:
            base = node_scope(m.nodes[1])
            if m.add is not None:
                sum_name = m.add.output[0]
                new = helper.make_node("SkipSimplifiedLayerNormalization",
                                       [m.add.input[0], m.add.input[1], m.weight],
                                       [m.y, "", "", sum_name],
                                       name=gi.fresh_name(f"{base}/SkipSimplifiedLayerNormalization"),
                                       domain=MS_DOMAIN, epsilon=float(m.eps))
                drop.add(gi.index[id(m.add)])
                if m.noop_cast is not None:
                    rename[m.noop_cast.output[0]] = sum_name
                    drop.add(gi.index[id(m.noop_cast)])
                n_skip += 1
            else:
                x = m.x
                if m.noop_cast is not None:
                    x = m.noop_cast.input[0]
                    rename[m.x] = x
                    drop.add(gi.index[id(m.noop_cast)])
                new = helper.make_node("SimplifiedLayerNormalization", [x, m.weight], [m.y],
                                       name=gi.fresh_name(f"{base}/SimplifiedLayerNormalization"),
                                       axis=-1, epsilon=float(m.eps), stash_type=1)
            created.append(new.name)
            last = gi.index[id(m.nodes[-1])]
            replace[last] = [new]
            drop.update(gi.index[id(c)] for c in m.nodes[:-1])
        new_nodes = []
        for i, n in enumerate(g.node):
            if i in replace:
                new_nodes.extend(replace[i])
            elif i not in drop:
                new_nodes.append(n)
        del g.node[:]
        g.node.extend(new_nodes)
        if rename:
            for n in g.node:
                for k, x in enumerate(n.input):
                    if x in rename:
                        n.input[k] = rename[x]
        for m in norms:  # fused outputs keep their names; make sure their type is declared
            declare(model, m.y, m.wtype, gi.shape(m.x))
            if m.add is not None:
                declare(model, m.add.output[0], m.wtype, gi.shape(m.add.output[0]) or gi.shape(m.x))
        toposort(model)  # the Skip node sits where the weight Mul was; the Add's readers may come earlier
        gone = {x for m in norms for c in m.nodes for x in c.input if x}
        gone |= {x for m in norms if m.add is not None for x in m.add.input if x}
        remove_unused(model, gone)
        if n_skip:
            ensure_opset(model, MS_DOMAIN)
        details = {"fused": len(norms), "skip": n_skip, "plain": len(norms) - n_skip,
                   "epsilons": sorted({m.eps for m in norms}), "nodes_before": before, "nodes_after": len(g.node),
                   "not_fused": why}
        summary = (f"{len(norms)} RMSNorm fused ({n_skip} SkipSimplifiedLayerNormalization, "
                   f"{len(norms) - n_skip} SimplifiedLayerNormalization); nodes {before} -> {len(g.node)}")
        return PassResult(model, True, summary, details, created=set(created))

    def postconditions(self, result: PassResult) -> None:
        model = result.model
        check_rewrite(model, result.created, "fuse-rmsnorm")
