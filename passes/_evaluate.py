"""Subgraph evaluation in onnxruntime: what the graph index lacks to match subgraphs *numerically*.

Fusions decide whether a pattern computes what they think (a rotary table, a causal mask) by running the
pattern's cone of nodes on probe inputs: :func:`cone_walk` collects the nodes that compute some tensors from
given ones and constants, :func:`run_nodes` runs such a node list in a throwaway onnxruntime session.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes._graph import ONNX_DOMAINS, Graph


def tensor_nbytes(t: TensorProto) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * (helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 4)


def cone_walk(gi: Graph, targets: list[str], stop: set[str], through_shape: bool = True,
              max_nodes: int | None = None):
    """The nodes computing ``targets`` from ``stop`` tensors and constants (overridable initializers count as
    inputs). Returns ``(nodes by id, leaves, shape_refs, seen)``: ``leaves`` are graph inputs reached outside
    ``stop``; with ``through_shape=False`` the input of a ``Shape`` node is not followed but listed in
    ``shape_refs``. None when the cone holds a node with a subgraph or more than ``max_nodes`` nodes."""
    seen: set[str] = set()
    nodes: dict[int, onnx.NodeProto] = {}
    leaves: set[str] = set()
    shape_refs: set[str] = set()
    stack = list(targets)
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in stop or gi.initializer(t) is not None:
            continue
        p = gi.producer(t)
        if p is None:
            leaves.add(t)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in p.attribute):
            return None
        if id(p) in nodes:
            continue
        nodes[id(p)] = p
        if max_nodes is not None and len(nodes) > max_nodes:
            return None
        if not through_shape and p.op_type == "Shape" and p.domain in ONNX_DOMAINS:
            shape_refs.add(p.input[0])
        else:
            stack.extend(p.input)
    return nodes, leaves, shape_refs, seen


def cone(gi: Graph, targets: list[str], stop: set[str]) -> tuple[list[onnx.NodeProto], set[str]] | None:
    """Nodes computing ``targets`` from ``stop`` tensors and constants, in graph order; also returns the graph
    inputs reached (outside ``stop``). None if the cone holds a node with a subgraph."""
    w = cone_walk(gi, targets, stop)
    if w is None:
        return None
    nodes, leaves, _, _ = w
    return sorted(nodes.values(), key=lambda n: gi.index[id(n)]), leaves


def run_nodes(gi: Graph, nodes: list[onnx.NodeProto], targets: list[str], feeds: dict[str, np.ndarray],
              used: set[str], inits: list[TensorProto]) -> list[np.ndarray] | None:
    """Run ``nodes`` (graph order) in onnxruntime with ``feeds`` (those in ``used``) and ``inits``; the values of
    ``targets``, or None when onnxruntime refuses or fails."""
    import onnxruntime as ort
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None)
              for k, v in feeds.items() if k in used]
    g = helper.make_graph(nodes, "cone", inputs, [onnx.ValueInfoProto(name=t) for t in targets], inits)
    m = helper.make_model(g, opset_imports=list(gi.model.opset_import))
    m.ir_version = gi.model.ir_version
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(targets, {k: v for k, v in feeds.items() if k in used})
    except Exception:
        return None


def evaluate(gi: Graph, targets: list[str], feeds: dict[str, np.ndarray], max_nodes: int = 400,
             max_init_bytes: int = 1 << 20) -> list[np.ndarray] | None:
    """Run the cone of ``targets`` over ``feeds`` (which must be all it depends on besides constants)
    with onnxruntime; None when the cone reads anything else, is larger than ``max_nodes`` or reads
    more than ``max_init_bytes`` of initializers (model weights: not a small helper computation),
    or does not run."""
    c = cone(gi, targets, set(feeds))
    if c is None:
        return None
    nodes, leaves = c
    if leaves or len(nodes) > max_nodes:
        return None
    used = {i for n in nodes for i in n.input if i} | set(targets)
    inits = [gi.inits[k] for k in used if k in gi.inits]
    if sum(tensor_nbytes(t) for t in inits) > max_init_bytes:
        return None
    return run_nodes(gi, nodes, targets, feeds, used, inits)
