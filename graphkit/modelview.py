"""Read-only views of a loaded ``ModelProto`` shared by `graphkit inspect`, its diagnoses and `graphkit diff`:
every node and initializer including those of subgraphs (``If``/``Loop`` bodies, ``Constant`` nodes), an
attribute's value, a tensor's values with external data memory-mapped rather than read. Never imports torch or
transformers, and knows nothing of inspect's reports (so both `inspect` and `diagnose` import it, not each other).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto


def tensor_array(t: TensorProto, base_dir: Path) -> np.ndarray:
    """The tensor's values; external data is memory-mapped, not read into memory."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        shape = tuple(t.dims)
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(base_dir / info["location"], dtype=dtype, mode="r",
                         offset=int(info.get("offset", 0) or 0), shape=shape)
    return onnx.numpy_helper.to_array(t)


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                out.extend(all_nodes(g))
    return out


def producers(nodes: list[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    """Each output name of ``nodes`` -> the node writing it (the read-only view inspect and diagnose share;
    passes edit through passes/_graph.Graph)."""
    return {o: n for n in nodes for o in n.output if o}


def all_initializers(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    inits[node.output[0]] = attr.t
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                inits.update(all_initializers(g))
    return inits


def attr_value(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
