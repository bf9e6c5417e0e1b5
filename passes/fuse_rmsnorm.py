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
The shared helpers below (:class:`GraphIndex`, :func:`infer_value_info`, :func:`remove_unused`) are
also used by ``fuse-rotary`` and ``fuse-gqa``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError
from graphkit.passbase import GraphPass, PassResult, option

MS_DOMAIN = "com.microsoft"
ONNX_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


# ============================================================================ shared helpers
@dataclass
class ValueInfo:
    elem_type: int = 0                     # 0: unknown
    shape: list | None = None              # None: unknown rank; entries int, str (symbol) or None


def _vi_info(vi: onnx.ValueInfoProto) -> ValueInfo:
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return ValueInfo(tt.elem_type, shape)


def infer_value_info(model: onnx.ModelProto, small_numel: int = 4096) -> dict[str, ValueInfo]:
    """Element type and shape of every tensor ONNX shape inference can tell, on a copy of the graph
    whose large initializers are replaced by typed graph inputs (works for > 2 GB models and for
    models whose weights are external). Outputs of contrib ops get no entry unless the model
    carries value_info for them."""
    g = model.graph
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sg = sk.graph
    sg.name = g.name or "g"
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.node.extend(g.node)
    sg.value_info.extend(g.value_info)
    info: dict[str, ValueInfo] = {}
    names = {i.name for i in g.input}
    for t in g.initializer:
        info[t.name] = ValueInfo(t.data_type, [int(d) for d in t.dims])
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        if numel <= small_numel and t.data_location != TensorProto.EXTERNAL:
            sg.initializer.append(t)
        elif t.name not in names:
            sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inf = onnx.shape_inference.infer_shapes(sk, check_type=False, strict_mode=False, data_prop=True)
        vis = list(inf.graph.input) + list(inf.graph.output) + list(inf.graph.value_info)
    except Exception:  # inference is best effort: fall back to what the model declares
        vis = list(g.input) + list(g.output) + list(g.value_info)
    for vi in vis:
        v = _vi_info(vi)
        if vi.name not in info or info[vi.name].elem_type == 0:
            info[vi.name] = v
    for n in g.node:  # Constant nodes and Casts: the type is certain even where inference stopped
        if n.op_type == "Constant" and n.domain in ONNX_DOMAINS:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    info.setdefault(n.output[0], ValueInfo(a.t.data_type, [int(d) for d in a.t.dims]))
        elif n.op_type == "Cast" and n.domain in ONNX_DOMAINS:
            to = next((a.i for a in n.attribute if a.name == "to"), 0)
            cur = info.setdefault(n.output[0], ValueInfo())
            if not cur.elem_type:
                cur.elem_type = to
    return info


class GraphIndex:
    """Producers, consumers, constants and value info of a graph's top level (read-only view; build a
    new one after editing)."""

    def __init__(self, model: onnx.ModelProto, with_info: bool = True) -> None:
        self.model = model
        g = self.graph = model.graph
        self.inits = {t.name: t for t in g.initializer}
        # IR >= 4: an initializer that is also a graph input can be overridden at run time.
        self.overridable = {i.name for i in g.input} if model.ir_version >= 4 else set()
        self.graph_inputs = {i.name for i in g.input} - (set(self.inits) - self.overridable)
        self.graph_outputs = {o.name for o in g.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.index: dict[int, int] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for i, n in enumerate(g.node):
            self.index[id(n)] = i
            for o in n.output:
                if o:
                    self.producer[o] = n
            for x in n.input:
                if x:
                    self.consumers.setdefault(x, []).append(n)
        self.subgraph_reads = subgraph_reads(g)
        self.info = infer_value_info(model) if with_info else {}

    # ------------------------------------------------------------------ structure
    def node_of(self, name: str, op_type: str | tuple[str, ...] | None = None,
                domain: tuple[str, ...] = ONNX_DOMAINS) -> onnx.NodeProto | None:
        n = self.producer.get(name)
        if n is None or n.domain not in domain:
            return None
        if op_type is not None and n.op_type not in ((op_type,) if isinstance(op_type, str) else op_type):
            return None
        return n

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def only_user(self, name: str, node: onnx.NodeProto) -> bool:
        """``name`` is read by ``node`` alone (any number of times), by no subgraph, and is no graph output."""
        return (name not in self.graph_outputs and name not in self.subgraph_reads
                and all(u is node for u in self.users(name)))

    # ------------------------------------------------------------------ constants
    def const(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, through Identity), else None."""
        if not name:
            return None
        if name in self.inits:
            return None if name in self.overridable else _to_array(self.inits[name])
        n = self.producer.get(name)
        if n is None or n.domain not in ONNX_DOMAINS or depth > 8:
            return None
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    return _to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(a.f if a.name == "value_float" else a.i)
                if a.name in ("value_floats", "value_ints"):
                    return np.array(list(a.floats) if a.name == "value_floats" else list(a.ints))
            return None
        if n.op_type == "Identity":
            return self.const(n.input[0], depth + 1)
        return None

    def is_const(self, name: str) -> bool:
        if name in self.inits:
            return name not in self.overridable
        n = self.producer.get(name)
        return n is not None and n.domain in ONNX_DOMAINS and (
            n.op_type == "Constant" or (n.op_type == "Identity" and self.is_const(n.input[0])))

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        if v is None or v.size != 1:
            return None
        return float(v.reshape(-1)[0])

    def const_root(self, name: str) -> str:
        """The initializer / Constant output behind Identity nodes (for reuse as a fused input)."""
        n = self.producer.get(name)
        while n is not None and n.op_type == "Identity" and n.domain in ONNX_DOMAINS:
            name = n.input[0]
            n = self.producer.get(name)
        return name

    # ------------------------------------------------------------------ types and shapes
    def elem_type(self, name: str) -> int:
        v = self.info.get(name)
        return v.elem_type if v else 0

    def shape(self, name: str) -> list | None:
        v = self.info.get(name)
        return v.shape if v else None

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return len(s) if s is not None else None

    def last_dim(self, name: str) -> int | None:
        s = self.shape(name)
        if s and isinstance(s[-1], int) and s[-1] > 0:
            return s[-1]
        return None

    def fresh(self, base: str, taken: set[str]) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def taken_names(self) -> set[str]:
        g = self.graph
        return (set(self.inits) | {i.name for i in g.input} | {o.name for o in g.output}
                | {o for n in g.node for o in n.output} | {n.name for n in g.node if n.name})


def _to_array(t: TensorProto) -> np.ndarray:
    return tensors.array(t)


def subgraph_reads(g: onnx.GraphProto) -> set[str]:
    """Names read inside If/Loop/Scan bodies (they may refer to outer-scope tensors)."""
    reads: set[str] = set()

    def walk(sub: onnx.GraphProto) -> None:
        for n in sub.node:
            reads.update(i for i in n.input if i)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for s in a.graphs:
                        walk(s)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                walk(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for s in a.graphs:
                    walk(s)
    return reads


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_label(n: onnx.NodeProto) -> str:
    return n.name or (n.output[0] if n.output else "<unnamed>")


def other_input(node: onnx.NodeProto, name: str) -> str | None:
    """For a binary node reading ``name`` once: its other input."""
    if len(node.input) != 2 or list(node.input).count(name) != 1:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def remove_unused(model: onnx.ModelProto, candidates: set[str] | None = None) -> int:
    """Delete nodes whose outputs nobody reads (not graph outputs, not read by any node or subgraph),
    then initializers nobody reads. ``candidates`` (tensor names) limits node removal to the producers
    of those tensors and, transitively, the nodes feeding a removed node; None removes any dead node.
    (Names, not NodeProto objects: protobuf copies messages when a node list is rebuilt.)
    Returns the number of nodes removed."""
    g = model.graph
    outputs = {o.name for o in g.output}
    removed = 0
    allowed = None if candidates is None else set(candidates)
    while True:
        used = outputs | subgraph_reads(g) | {i for n in g.node for i in n.input if i}
        dead = [i for i, n in enumerate(g.node)
                if n.output and (allowed is None or any(o in allowed for o in n.output))
                and not any(o and o in used for o in n.output)
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]
        if not dead:
            break
        for i in reversed(dead):
            n = g.node[i]
            if allowed is not None:
                allowed.update(x for x in n.input if x)  # what fed a removed node may now be dead too
            del g.node[i]
            removed += 1
    used = outputs | subgraph_reads(g) | {i for n in g.node for i in n.input if i}
    graph_inputs = {i.name for i in g.input}
    dead_inits = [k for k, t in enumerate(g.initializer) if t.name not in used and t.name not in graph_inputs]
    for k in reversed(dead_inits):
        del g.initializer[k]
    produced = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | graph_inputs
    for k in reversed(range(len(g.value_info))):
        if g.value_info[k].name not in produced:
            del g.value_info[k]
    return removed


def declare(model: onnx.ModelProto, name: str, elem_type: int, shape: list | None = None) -> None:
    """Add value_info (type, and shape when known) for a tensor a fused node produces, so later passes
    that rely on ONNX inference (which knows no contrib op) still see its type."""
    g = model.graph
    if not name or not elem_type or name in {o.name for o in g.output} or name in {i.name for i in g.input}:
        return
    for k in reversed(range(len(g.value_info))):
        if g.value_info[k].name == name:
            del g.value_info[k]
    dims = None if shape is None else [d if isinstance(d, (int, str)) and d != 0 else None for d in shape]
    g.value_info.append(helper.make_tensor_value_info(name, elem_type, dims))


def ensure_opset(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    if not any(op.domain == domain for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def toposort(model: onnx.ModelProto) -> None:
    """Stable topological order of the top-level nodes: among the nodes that are ready, the one that
    came first keeps coming first (fused nodes sit where their matched pattern ended; this repairs any
    order the rewrite disturbed)."""
    import heapq
    g = model.graph
    nodes = list(g.node)
    produced_by = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    deps: list[set[int]] = []
    for k, n in enumerate(nodes):
        names = {i for i in n.input if i}
        for a in n.attribute:  # a subgraph's reads of outer-scope names are dependencies of its node
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _subgraph_reads_of(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for s in a.graphs:
                    names |= _subgraph_reads_of(s)
        deps.append({produced_by[x] for x in names if x in produced_by and produced_by[x] != k})
    waiting = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in nodes]
    for k, d in enumerate(deps):
        for p in d:
            users[p].append(k)
    heap = [k for k in range(len(nodes)) if waiting[k] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        k = heapq.heappop(heap)
        order.append(k)
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(heap, u)
    if len(order) != len(nodes):  # a cycle would be a bug upstream: keep the rest in place
        seen = set(order)
        order += [k for k in range(len(nodes)) if k not in seen]
    if order != list(range(len(nodes))):
        del g.node[:]
        g.node.extend(nodes[k] for k in order)


def _subgraph_reads_of(sub: onnx.GraphProto) -> set[str]:
    inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {t.name for t in sub.initializer}
    reads: set[str] = set()
    for n in sub.node:
        reads.update(i for i in n.input if i and i not in inner)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                reads |= _subgraph_reads_of(a.g) - inner
            elif a.type == onnx.AttributeProto.GRAPHS:
                for s in a.graphs:
                    reads |= _subgraph_reads_of(s) - inner
    return reads


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
    tolerance = ("norm outputs within ~1e-6 relative of the decomposed graph (float32 accumulation in "
                 "another order; tests assert 1e-5 relative to the output scale); residual sums exact")

    def validate_options(self) -> None:
        for key in ("skip", "plain"):
            if not isinstance(getattr(self.options, key), bool):
                raise GraphkitError(f"fuse-rmsnorm: {key} must be true or false, got {getattr(self.options, key)!r}")

    # ------------------------------------------------------------------ matching
    def _match_at(self, gi: GraphIndex, rm: onnx.NodeProto, why: dict[str, str]) -> _Norm | None:
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
    def _single_user(gi: GraphIndex, name: str, op: str) -> onnx.NodeProto | None:
        users = gi.users(name)
        if len(users) != 1 or name in gi.graph_outputs or name in gi.subgraph_reads:
            return None
        u = users[0]
        return u if u.op_type == op and u.domain in ONNX_DOMAINS else None

    def _match_skip(self, gi: GraphIndex, m: _Norm, claimed: set[int]) -> str | None:
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

    def _plan(self, model: onnx.ModelProto) -> tuple[GraphIndex, list[_Norm], dict[str, str]]:
        gi = GraphIndex(model)
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
    def requires(self, model: onnx.ModelProto) -> None:
        _, norms, why = self._plan(model)
        if not norms:
            reasons = sorted(set(v for k, v in why.items() if not k.startswith("skip:")))
            detail = f" (ReduceMean nodes seen: {len(why)}; {'; '.join(reasons[:3])})" if why else ""
            raise PassNotApplicable("no decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul) found" + detail)

    def call(self, model: onnx.ModelProto) -> PassResult:
        gi, norms, why = self._plan(model)
        if not norms:
            return PassResult(model, False, "no RMSNorm pattern", {"fused": 0})
        g = model.graph
        before = len(g.node)
        taken = gi.taken_names()
        replace: dict[int, list[onnx.NodeProto]] = {}
        drop: set[int] = set()
        created: list[str] = []
        rename: dict[str, str] = {}
        n_skip = 0
        for m in norms:
            base = node_label(m.nodes[1]).rsplit("/", 1)[0] if "/" in node_label(m.nodes[1]) else node_label(m.nodes[1])
            if m.add is not None:
                sum_name = m.add.output[0]
                new = helper.make_node("SkipSimplifiedLayerNormalization",
                                       [m.add.input[0], m.add.input[1], m.weight],
                                       [m.y, "", "", sum_name],
                                       name=gi.fresh(f"{base}/SkipSimplifiedLayerNormalization", taken),
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
                                       name=gi.fresh(f"{base}/SimplifiedLayerNormalization", taken),
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
        self._created = created
        details = {"fused": len(norms), "skip": n_skip, "plain": len(norms) - n_skip,
                   "epsilons": sorted({m.eps for m in norms}), "nodes_before": before, "nodes_after": len(g.node),
                   "not_fused": why}
        summary = (f"{len(norms)} RMSNorm fused ({n_skip} SkipSimplifiedLayerNormalization, "
                   f"{len(norms) - n_skip} SimplifiedLayerNormalization); nodes {before} -> {len(g.node)}")
        return PassResult(model, True, summary, details)

    def ensures(self, model: onnx.ModelProto) -> None:
        g = model.graph
        available = ({i.name for i in g.input} | {t.name for t in g.initializer}
                     | {o for n in g.node for o in n.output if o})
        created = set(getattr(self, "_created", []))
        found = 0
        for n in g.node:
            if n.name in created:
                found += 1
                missing = [x for x in n.input if x and x not in available]
                if missing:
                    raise PostconditionError(f"fuse-rmsnorm: node '{n.name}' reads missing tensor(s) {missing}")
        if found != len(created):
            raise PostconditionError(f"fuse-rmsnorm: {len(created) - found} fused node(s) missing from the result")
        dangling = [x for n in g.node for x in n.input if x and x not in available and x not in subgraph_reads(g)]
        if dangling:
            raise PostconditionError("fuse-rmsnorm: the rewrite left reads of removed tensors: "
                                     f"{sorted(set(dangling))[:5]}")
