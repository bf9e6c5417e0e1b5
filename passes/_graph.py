"""The graph layer every pass shares: one index over a ``ModelProto``'s top-level graph and the edit tools.

Measured against onnx-ir (``benchmarks/graph_layer.py``, RESULTS ``graph-layer-choice``, ``docs/graph-layer.md``):
passes keep editing ``onnx.ModelProto`` (protobuf messages, lazy external tensors of ``graphkit.modelio``) and
this module is the one place that knows how to read and edit it:

* :class:`Graph`: ``producer(name)``, ``uses(name)`` (reader nodes and input slots), ``node_of`` (typed
  producer), ``const``/``is_const``/``initializer`` (constants, through Identity), element types and shapes,
  ``replace_all_uses_with``, ``rename``, ``insert_after``, ``fresh_name`` (names are claimed against every
  tensor and node name of the graph);
* :func:`is_overridable` / :func:`overridable`: THE rule for an initializer that is also a graph input
  (IR >= 4: it can be fed at run time, so it is no constant);
* :func:`infer_shapes`: THE shape-inference setup (a copy without large weights, any model size);
* :func:`fresh_name` / :func:`taken_names`: THE name authority (``Graph.fresh_name`` uses them);
* :func:`remove_unused` (cleanup), :func:`toposort`, :func:`declare`, :func:`ensure_opset`,
  :func:`subgraph_reads`, :func:`check_rewrite` (the postconditions every rewrite shares).

The index is a view of the graph when it was built; the edit methods keep it current, other edits need a new
``Graph``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphkit import tensors
from graphkit.modelio import graph_skeleton

MS_DOMAIN = "com.microsoft"
ONNX_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


# ============================================================================ the rules
def overridable(model: onnx.ModelProto) -> set[str]:
    """Names of the initializers that are also graph inputs in a model of IR >= 4: a caller may feed them
    at run time, so their stored value is only a default and no pass may treat them as constants."""
    if model.ir_version < 4:
        return set()
    inputs = {i.name for i in model.graph.input}
    return {t.name for t in model.graph.initializer if t.name in inputs}


def is_overridable(model: onnx.ModelProto, name: str) -> bool:
    """``name`` is an initializer a caller can override (see :func:`overridable`)."""
    return name in overridable(model)


def weight_free_copy(model: onnx.ModelProto, small_numel: int = 4096, value_info: bool = True) -> onnx.ModelProto:
    """The model without its large weights (``graphkit.modelio.graph_skeleton``): initializers of more than
    ``small_numel`` elements or stored externally become typed graph inputs (a weight's values never decide a
    shape), so shape inference runs on any model size without reading weights. Small ones stay (Reshape
    targets, axes). ``value_info=False`` drops what the exporter declared (inference starts from nothing)."""
    sk = graph_skeleton(model, keep=lambda t: (int(np.prod(t.dims)) if len(t.dims) else 1) <= small_numel)
    if not value_info:
        del sk.graph.value_info[:]
    return sk


def infer_shapes(model: onnx.ModelProto, data_prop: bool = True, value_info: bool = True,
                 small_numel: int = 4096) -> onnx.ModelProto:
    """ONNX shape inference (lenient: no type check, not strict) on :func:`weight_free_copy` of ``model``;
    returns the inferred copy (its graph's input/output/value_info carry the result). Raises what onnx raises;
    callers decide whether inference is best effort. ``model`` may already be a weight-free copy."""
    sk = weight_free_copy(model, small_numel, value_info)
    return onnx.shape_inference.infer_shapes(sk, check_type=False, strict_mode=False, data_prop=data_prop)


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
    """Element type and shape of every tensor ONNX shape inference can tell (:func:`infer_shapes`; works
    for > 2 GB models and for models whose weights are external). Outputs of contrib ops get no entry
    unless the model carries value_info for them."""
    g = model.graph
    info: dict[str, ValueInfo] = {t.name: ValueInfo(t.data_type, [int(d) for d in t.dims]) for t in g.initializer}
    try:
        inf = infer_shapes(model, small_numel=small_numel)
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


class Graph:
    """Producers, readers, constants and value info of a model's top-level graph.

    A view of the graph when it was built, kept current by its own edit methods (``replace_all_uses_with``,
    ``rename``, ``insert_after``, ``fresh_name``); after other edits build a new one."""

    def __init__(self, model: onnx.ModelProto, with_info: bool = True,
                 nodes: list[onnx.NodeProto] | None = None) -> None:
        """``nodes``: index this node list (a pass's working copy of ``graph.node``) instead of the graph's."""
        self.model = model
        g = self.graph = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.overridable = overridable(model)
        self.graph_inputs = {i.name for i in g.input} - (set(self.inits) - self.overridable)
        self.graph_outputs = {o.name for o in g.output}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.index: dict[int, int] = {}
        self._uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for i, n in enumerate(g.node if nodes is None else nodes):
            self.index[id(n)] = i
            self._add(n)
        self.subgraph_reads = subgraph_reads(g)
        self.info = infer_value_info(model) if with_info else {}
        self._taken = taken_names(g)  # the graph's names now: a later edit cannot make a handed-out name clash

    def _add(self, n: onnx.NodeProto) -> None:
        for o in n.output:
            if o:
                self.producers[o] = n
        for s, x in enumerate(n.input):
            if x:
                self._uses.setdefault(x, []).append((n, s))

    # ------------------------------------------------------------------ structure
    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node that computes ``name`` (None for graph inputs, initializers and unknown names)."""
        return self.producers.get(name)

    def uses(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """Every (node, input slot) of the top level reading ``name``, in graph order."""
        return self._uses.get(name, [])

    def users(self, name: str) -> list[onnx.NodeProto]:
        """The nodes reading ``name`` (a node reading it twice appears twice)."""
        return [n for n, _ in self.uses(name)]

    def position(self, node: onnx.NodeProto) -> int:
        """The node's index in ``graph.node`` (or the ``nodes`` given) when the index was built."""
        return self.index[id(node)]

    def node_of(self, name: str, op_type: str | tuple[str, ...] | None = None,
                domain: tuple[str, ...] = ONNX_DOMAINS) -> onnx.NodeProto | None:
        n = self.producers.get(name)
        if n is None or n.domain not in domain:
            return None
        if op_type is not None and n.op_type not in ((op_type,) if isinstance(op_type, str) else op_type):
            return None
        return n

    def only_user(self, name: str, node: onnx.NodeProto) -> bool:
        """``name`` is read by ``node`` alone (any number of times), by no subgraph, and is no graph output."""
        return (name not in self.graph_outputs and name not in self.subgraph_reads
                and all(u is node for u in self.users(name)))

    def is_overridable(self, name: str) -> bool:
        """An initializer a caller can feed at run time (:func:`overridable`): no constant."""
        return name in self.overridable

    def initializer(self, name: str) -> TensorProto | None:
        """The initializer ``name`` when it is a constant (not overridable), else None."""
        t = self.inits.get(name)
        return None if t is None or name in self.overridable else t

    # ------------------------------------------------------------------ names and edits
    def fresh_name(self, base: str) -> str:
        """``base`` or ``base_1``, ``base_2`` …: free among every tensor and node name of the graph and every
        name this index handed out before (:func:`fresh_name`)."""
        return fresh_name(base, self._taken)

    def replace_all_uses_with(self, old: str, new: str, graph_outputs: bool = True) -> None:
        """Every top-level node reading ``old`` reads ``new`` instead; with ``graph_outputs`` a graph output
        named ``old`` is renamed ``new`` too (its producer must then write ``new``). Subgraph reads are not
        rewritten (an error if there are any: rename the producer instead)."""
        if old in self.subgraph_reads:
            raise ValueError(f"'{old}' is read inside a subgraph; replace_all_uses_with covers the top level only")
        moved = self._uses.pop(old, [])
        for n, s in moved:
            n.input[s] = new
        self._uses.setdefault(new, []).extend(moved)
        if graph_outputs and old in self.graph_outputs:
            for o in self.graph.output:
                if o.name == old:
                    o.name = new
            self.graph_outputs = (self.graph_outputs - {old}) | {new}

    def rename(self, old: str, new: str) -> None:
        """Rename a tensor everywhere at the top level: its producer's output (or the graph input /
        initializer), every reader, graph outputs and value_info."""
        n = self.producers.pop(old, None)
        if n is not None:
            n.output[list(n.output).index(old)] = new
            self.producers[new] = n
        for vi in list(self.graph.input) + list(self.graph.value_info):
            if vi.name == old:
                vi.name = new
        if old in self.inits:
            t = self.inits.pop(old)
            t.name = new
            self.inits[new] = t
            if old in self.overridable:
                self.overridable = (self.overridable - {old}) | {new}
        if old in self.graph_inputs:
            self.graph_inputs = (self.graph_inputs - {old}) | {new}
        self.replace_all_uses_with(old, new, graph_outputs=True)
        self._taken.add(new)

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> onnx.NodeProto:
        """Insert ``node`` right after ``anchor`` in ``graph.node``; returns the stored node (protobuf copies
        it). Positions of later nodes shift: ``position`` is refreshed lazily."""
        g = self.graph.node
        k = self._where(anchor) + 1
        g.insert(k, node)
        stored = g[k]
        self._add(stored)
        self.index = {id(m): i for i, m in enumerate(g)}
        return stored

    def _where(self, node: onnx.NodeProto) -> int:
        k = self.index.get(id(node))
        if k is None or self.graph.node[k] is not node:
            self.index = {id(m): i for i, m in enumerate(self.graph.node)}
            k = self.index[id(node)]
        return k

    # ------------------------------------------------------------------ constants
    def const(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, through Identity), else None."""
        if not name:
            return None
        if name in self.inits:
            return None if name in self.overridable else _to_array(self.inits[name])
        n = self.producers.get(name)
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
        n = self.producers.get(name)
        return n is not None and n.domain in ONNX_DOMAINS and (
            n.op_type == "Constant" or (n.op_type == "Identity" and self.is_const(n.input[0])))

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        if v is None or v.size != 1:
            return None
        return float(v.reshape(-1)[0])

    def const_root(self, name: str) -> str:
        """The initializer / Constant output behind Identity nodes (for reuse as a fused input)."""
        n = self.producers.get(name)
        while n is not None and n.op_type == "Identity" and n.domain in ONNX_DOMAINS:
            name = n.input[0]
            n = self.producers.get(name)
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


def tensor_names(g: onnx.GraphProto) -> set[str]:
    """Every tensor name of ``g``'s top level (initializers, inputs, outputs, node inputs and outputs)."""
    return ({t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
            | {x for n in g.node for x in list(n.input) + list(n.output) if x})


def node_names(g: onnx.GraphProto) -> set[str]:
    return {n.name for n in g.node if n.name}


def taken_names(g: onnx.GraphProto) -> set[str]:
    """Every tensor and node name of ``g`` (one namespace: a new name clashes with neither)."""
    return tensor_names(g) | node_names(g)


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2`` … whichever is free; the name is added to ``taken``."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _to_array(t: TensorProto) -> np.ndarray:
    return tensors.array(t)


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def subgraph_reads(g: onnx.GraphProto) -> set[str]:
    """Names read inside If/Loop/Scan bodies (they may refer to outer-scope tensors)."""
    reads: set[str] = set()

    def walk(sub: onnx.GraphProto) -> None:
        for n in sub.node:
            reads.update(i for i in n.input if i)
            for inner in _subgraphs(n):
                walk(inner)
    for n in g.node:
        for sub in _subgraphs(n):
            walk(sub)
    return reads


def rename_values(g: onnx.GraphProto, m: dict[str, str]) -> None:
    """Simultaneous rename (swaps are fine) of every reference to the tensors in ``m``: graph inputs, outputs,
    value_info, initializers, node inputs and outputs, and outer-scope reads inside subgraphs."""
    if not m:
        return
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name in m:
            vi.name = m[vi.name]
    for t in g.initializer:
        if t.name in m:
            t.name = m[t.name]
    rename_in_nodes(g.node, m)


def rename_in_nodes(nodes, m: dict[str, str], outputs: bool = True) -> None:
    """Simultaneous rename in the nodes' inputs (and outputs) and in their subgraphs' outer-scope reads."""
    if not m:
        return
    for n in nodes:
        for i, x in enumerate(n.input):
            if x in m:
                n.input[i] = m[x]
        if outputs:
            for i, x in enumerate(n.output):
                if x in m:
                    n.output[i] = m[x]
        for sub in _subgraphs(n):
            _rename_outer(sub, m)


def _rename_outer(g: onnx.GraphProto, m: dict[str, str]) -> None:
    """Rename outer-scope references inside a subgraph (names it defines itself are left alone)."""
    local = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    local.update(o for n in g.node for o in n.output if o)
    mm = {k: v for k, v in m.items() if k not in local}
    rename_in_nodes(g.node, mm, outputs=False)
    for vi in g.output:
        if vi.name in mm:
            vi.name = mm[vi.name]


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_label(n: onnx.NodeProto) -> str:
    return n.name or (n.output[0] if n.output else "<unnamed>")


def node_scope(n: onnx.NodeProto) -> str:
    """The exporter's module path of a node (``/model/layers.0/attn/Softmax`` → ``/model/layers.0/attn``):
    the base for the names of what replaces it."""
    label = node_label(n)
    return label.rsplit("/", 1)[0] if "/" in label else label


def why_detail(why: dict[str, str], n: int = 3) -> str:
    """`` (reason; reason; …)`` — the distinct reasons a pattern did not match, for PassNotApplicable."""
    return f" ({'; '.join(sorted(set(why.values()))[:n])})" if why else ""


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
        for sub in _subgraphs(n):  # a subgraph's reads of outer-scope names are dependencies of its node
            names |= _subgraph_reads_of(sub)
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
        for s in _subgraphs(n):
            reads |= _subgraph_reads_of(s) - inner
    return reads


def check_rewrite(model: onnx.ModelProto, created: set[str], pass_name: str, what: str = "fused node") -> dict:
    """Postconditions every fusion shares: each node it created (by name) is in the graph and reads only tensors
    that exist, no top-level node reads a removed tensor, each tensor has one
    producer and every graph output is still produced. Returns the initializers by name for further checks."""
    from graphkit.errors import PostconditionError
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    produced = [o for n in g.node for o in n.output if o]
    available = set(inits) | {i.name for i in g.input} | set(produced)
    found = 0
    for n in g.node:
        if n.name in created:
            found += 1
            missing = [x for x in n.input if x and x not in available]
            if missing:
                raise PostconditionError(f"{pass_name}: node '{n.name}' reads missing tensor(s) {missing}")
    if found != len(created):
        raise PostconditionError(f"{pass_name}: {len(created) - found} {what}(s) missing from the result")
    if len(produced) != len(set(produced)):
        raise PostconditionError(f"{pass_name}: a tensor has two producers after the rewrite")
    missing_out = [o.name for o in g.output if o.name not in available]
    if missing_out:
        raise PostconditionError(f"{pass_name}: graph outputs no longer produced: {missing_out}")
    dangling = sorted({x for n in g.node for x in n.input if x and x not in available})
    if dangling:
        raise PostconditionError(f"{pass_name}: the rewrite left reads of removed tensors: {dangling[:5]}")
    return inits
