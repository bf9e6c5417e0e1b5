"""logits-to-keep: a ``num_logits_to_keep`` input so a prefill computes lm_head only for the last positions.

Transformers.js 4.x (``setNumLogitsToKeep`` in ``models/modeling_utils.js``, 4.3.1) feeds an int64 scalar
``num_logits_to_keep`` when the decoder session lists that input: **1** in ``generate`` (sampling reads only
the last position) and **0** in a plain forward (every position). Without it a 128-token prefill of the
Qwen2.5-0.5B shape spends ~17 GMACs (about a quarter of the prefill) and a 78 MB tensor on logits nobody
reads.

What the pass does: the lm_head is the ``MatMul`` / ``com.microsoft.MatMulNBits`` / ``FusedMatMul`` that
produces the ``logits`` output (possibly through ``Cast`` / ``Identity``). Its activation input ``h``
``[batch, seq, H]`` becomes::

    k     = Max(Reshape(num_logits_to_keep, [1]), 0)             int64 [1]
    h_k   = Slice(h, starts=Neg(k), ends=[INT64_MAX], axes=[1])   [batch, min(k, seq) or seq, H]

``-0 == 0``, so k = 0 keeps every position; k larger than the sequence keeps every position (Slice
clamps); a negative k is taken as 0. Run it on the float export before quantization passes (``convert``
puts it first in every pipeline); it refuses an lm_head it does not recognise rather than guess.

Which runtimes: Transformers.js 3.x never feeds the input and refuses a session with an input it did not
feed ("Missing the following inputs"), so the input is for Transformers.js 4.x folders only. An *optional*
input (a graph input with an initializer default) would keep 3.x working but is invisible to 4.x:
onnxruntime lists only required inputs in ``session.inputNames`` (measured, onnxruntime-node 1.30 and
onnxruntime 1.32: a graph with inputs ``x`` and ``k`` = initializer reports ``['x']``), so 4.x would never
feed it and nothing would be saved. ``convert --logits-to-keep`` adds it.

Tolerance: exact. With k >= 1 the logits equal the original graph's ``logits[:, -k:]`` up to the float
accumulation order of a GEMM with fewer rows (bit-equal in the tests on onnxruntime CPU); with k = 0 they
equal the original logits.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import PassNotApplicable, PostconditionError, PreconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance
from graphkit.tjs_contract import NUM_LOGITS_TO_KEEP as INPUT
from passes._graph import MS_DOMAIN, Graph

_HEADS = {("", "MatMul"), ("ai.onnx", "MatMul"), (MS_DOMAIN, "MatMulNBits"), (MS_DOMAIN, "FusedMatMul")}
_PASS_THROUGH = {"Cast", "Identity"}


def _find_head(G: Graph, output: str) -> onnx.NodeProto:
    name, seen = output, []
    for _ in range(8):
        node = G.producer(name)
        if node is None:
            break
        if (node.domain, node.op_type) in _HEADS:
            return node
        if node.op_type not in _PASS_THROUGH or node.domain not in ("", "ai.onnx"):
            seen.append(node.op_type)
            break
        seen.append(node.op_type)
        name = node.input[0]
    raise PreconditionError(
        f"logits-to-keep: '{output}' is not produced by a MatMul / MatMulNBits lm_head (found "
        f"{' <- '.join(seen) or 'no producer'}); run logits-to-keep before passes that rewrite the lm_head "
        "(matmul-int8), e.g. logits-to-keep,matmul-int8")


class LogitsToKeepPass(GraphPass):
    name = "logits-to-keep"
    tolerance = Tolerance("exact", 0.0, "the graph before the pass",
                          "logits are the original graph's logits[:, -k:] for num_logits_to_keep = k >= 1, every "
                          "position for k = 0; the KV cache is unchanged")
    mutates_input = True  # edits the graph it is given (the pipeline copies when it must keep the input)

    def requires(self, model: onnx.ModelProto) -> None:
        g = model.graph
        if any(i.name == INPUT for i in g.input):
            raise PassNotApplicable(f"the graph already has a '{INPUT}' input")
        if "logits" not in {o.name for o in g.output}:
            raise PreconditionError("logits-to-keep: the graph has no 'logits' output (not a Transformers.js decoder)")
        head = _find_head(Graph(model, with_info=False), "logits")
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(g.input) + list(g.value_info)
                 if vi.type.tensor_type.HasField("shape")}
        if ranks.get(head.input[0], 3) != 3:
            raise PreconditionError(f"logits-to-keep: the lm_head input '{head.input[0]}' has rank "
                                    f"{ranks[head.input[0]]}, expected [batch, sequence, hidden]")

    def call(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        G = Graph(model, with_info=False)
        head = _find_head(G, "logits")
        fresh = G.fresh_name
        h = head.input[0]
        c_shape, c_zero, c_end, c_axis = (fresh("logits_to_keep_shape"), fresh("logits_to_keep_zero"),
                                          fresh("logits_to_keep_end"), fresh("logits_to_keep_axis"))
        k1, k, start, kept = (fresh("logits_to_keep_1d"), fresh("logits_to_keep_clamped"),
                              fresh("logits_to_keep_start"), fresh(f"{h}_kept"))
        g.initializer.extend([
            numpy_helper.from_array(np.array([1], np.int64), c_shape),
            numpy_helper.from_array(np.array([0], np.int64), c_zero),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), c_end),
            numpy_helper.from_array(np.array([1], np.int64), c_axis),
        ])
        nodes = [
            helper.make_node("Reshape", [INPUT, c_shape], [k1], name=fresh("logits_to_keep_Reshape")),
            helper.make_node("Max", [k1, c_zero], [k], name=fresh("logits_to_keep_Max")),
            helper.make_node("Neg", [k], [start], name=fresh("logits_to_keep_Neg")),
            helper.make_node("Slice", [h, start, c_end, c_axis], [kept], name=fresh("logits_to_keep_Slice")),
        ]
        at = list(g.node).index(head)
        head.input[0] = kept
        for i, n in enumerate(nodes):
            g.node.insert(at + i, n)
        g.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, []))
        # logits' sequence axis is no longer the input's: give it its own symbol
        for o in g.output:
            if o.name == "logits" and len(o.type.tensor_type.shape.dim) == 3:
                d = o.type.tensor_type.shape.dim[1]
                d.Clear()
                d.dim_param = "num_logits"
        return PassResult(model, True, f"lm_head '{head.name or head.output[0]}' reads the last "
                                       f"{INPUT} positions (0 = all)", {"lm_head": head.name, "input": INPUT})

    def ensures(self, model: onnx.ModelProto) -> None:
        g = model.graph
        if not any(i.name == INPUT and i.type.tensor_type.elem_type == TensorProto.INT64 for i in g.input):
            raise PostconditionError(f"logits-to-keep: no int64 '{INPUT}' input after the rewrite")
        G = Graph(model, with_info=False)
        head = _find_head(G, "logits")
        src = G.producer(head.input[0])
        if src is None or src.op_type != "Slice":
            raise PostconditionError("logits-to-keep: the lm_head does not read the sliced hidden states")
