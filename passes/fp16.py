"""fp16: convert a float32 graph to float16, keeping precision-critical islands in float32.

Used for the ``fp16`` and ``q4f16`` variants (run it after ``matmul-nbits`` for q4f16: the
``com.microsoft.MatMulNBits`` ``scales`` become float16 with the activations; packed weights stay uint8).

How it works (graph-type propagation)
-------------------------------------
Element types of every tensor come from ONNX shape inference (contrib ops such as MatMulNBits, whose
schemas ONNX does not know, get the type of their first float input). Every float32 tensor is then
classified:

* **activation** ("A"): depends on a float graph input (e.g. the past KV cache) or on an embedding
  lookup (``Gather``/``GatherND``/``GatherElements``/``GatherBlockQuantized`` of a constant table by
  runtime indices). Nodes that read an activation compute in **float16**, unless they belong to an
  fp32 island (below).
* **auxiliary** ("X"): computed only from integer tensors and constants — position ids cast to float,
  ``inv_freq * positions``, attention-mask fill values, shape arithmetic. These are tiny, so they are
  computed in **float32** and cast to float16 only where they meet fp16 activations. Where an
  auxiliary tensor only moves data (Reshape/Unsqueeze/Expand/Concat/Slice/Gather/Where/... of
  constants, ``ConstantOfShape``, ``Cast`` from an integer) and every consumer wants float16, it is
  produced directly in float16 (constants converted at build time) instead of casting afterwards.

A tensor's new type is decided by its producer; a ``Cast`` is inserted (once per tensor and target
type) only where a consumer needs the other type, so there are no fp32->fp16->fp32 round trips.
Constants (initializers, ``Constant`` nodes) are converted to whatever type their consumers need
(duplicated if both types are needed). ``Identity`` nodes that only alias an initializer are
bypassed. Existing ``Cast(to=FLOAT)`` nodes (the float32 up-casts that exporters write, e.g. in
RMSNorm) are retargeted to FLOAT16 when they sit in fp16 code, kept as FLOAT when they are the entry
of an fp32 island, and removed once they cast a tensor to its own type. fp16->fp32->fp16 Cast pairs
(lossless) are collapsed.

fp32 policy (what stays float32)
--------------------------------
1. **Normalization variance** (RMSNorm and decomposed LayerNorm): the whole chain
   ``Pow(x, 2)`` (or ``Mul(x, x)``) -> ``ReduceMean`` -> ``Add(eps)`` -> ``Sqrt`` ->
   ``Reciprocal``/``Div(1, .)`` -> ``Mul(x, rstd)`` (or ``Div(x, sqrt)``), plus an exporter's
   ``Cast(x, to=FLOAT)`` feeding it. ``x`` is cast up to float32 before the square and the normalized
   result is cast back to float16 before the ``Mul`` by the norm weight (as HF's Qwen2RMSNorm does
   in half precision). Guarantee: the squares and their mean never overflow; the residual stream
   itself is float16, so it must stay within +-65504 (a residual above that overflows no matter
   what the norm does; use ``fp32_ops`` or keep the model fp32 for such models). Fused norm ops
   (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``, ``LayerNormalization``)
   stay float16: their kernels accumulate in float32 (their mean/inv-std outputs stay float32).
2. **Softmax** (and LogSoftmax) computes in float32, together with the node that adds the attention
   mask to the scores (the ``Add``/``Sub``/``Where`` producing the softmax input when it has a
   non-activation float input), so large negative mask values never meet fp16 arithmetic.
3. **Attention-mask constants** (e.g. ``-3.4028e38`` = finfo(float32).min): see clamping. Mask
   subgraphs are auxiliary, i.e. float32.
4. **Rotary embedding**: ``Cos``/``Sin`` always compute in float32 and their inputs (position ids
   cast to float, ``inv_freq * positions``) are auxiliary float32; the cos/sin results are cast to
   float16 where they multiply q/k.
5. Ops without float16 support in the ONNX schema or numerically unsafe in float16 run in float32
   with casts in/out: ``Range``, ``CumSum``, ``DynamicQuantizeLinear``, any ``ai.onnx.ml`` op, and
   the op types named in option ``fp32_ops``. Fixed-float32 slots are respected
   (``Resize`` roi/scales, ``Upsample`` scales).

Clamping: every float constant (initializer, ``Constant``, ``ConstantOfShape`` value) with finite
values outside +-65504 is clamped to +-65504 (reported in ``details["clamped"]``), whether it ends up
float16 or float32, so a mask fill of finfo.min becomes -65504, never -inf by overflow. Explicit
+-inf/NaN constants are kept. An auxiliary float32 tensor derived from such a constant gets a
``Clip(-65504, 65504)`` before any cast to float16. Tiny constants are rounded by IEEE float16
(subnormals kept; values below 2**-25 become 0, counted in ``details["underflow_to_zero"]``).

I/O: float graph inputs/outputs become float16 — including the KV cache ``past_key_values.*`` /
``present.*`` (Transformers.js 4.x reads the cache dtype from the graph; 3.x needs
``transformers.js_config.kv_cache_dtype``) — except ``logits``, which stays float32 via a final Cast
(``keep_logits_fp32=True``) so Transformers.js 3.x, which does not convert float16 logits, works.
``keep_io_types=True`` keeps every float input/output float32 (casts at the boundary).

Refused: graphs that already contain float16 (initializers, I/O, value_info or ``Cast`` to
float16) so the pass never runs twice, and graphs with control-flow subgraphs (If/Loop/Scan).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError, PreconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from graphkit.tjs_contract import KV_PREFIXES, LOGITS
from passes._graph import (Graph, fresh_name, infer_shapes, node_names, rename_in_nodes, tensor_names,
                           weight_free_copy)

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0

#: op types that always compute in float32 (float inputs cast up, float outputs cast down)
FP32_OPS = frozenset({"Cos", "Sin", "Softmax", "LogSoftmax", "Range", "CumSum", "DynamicQuantizeLinear"})
#: inputs that are float32 by schema whatever the data type
FIXED_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
#: outputs that are float32 by schema (stash type) whatever the data type
FIXED_FP32_OUTPUTS = {"LayerNormalization": {1, 2}, "SimplifiedLayerNormalization": {1},
                      "SkipLayerNormalization": {1, 2}, "SkipSimplifiedLayerNormalization": {1, 2}}
#: ops whose (float) inputs may have any type
ANY_TYPE_INPUTS = {"Cast": None, "Shape": None, "Size": None, "CastLike": {0}}
#: exact data-movement ops: computing them in fp16 equals computing in fp32 and casting after
VALUE_PRESERVING = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Expand",
                              "Concat", "Slice", "Gather", "GatherElements", "GatherND", "Split", "Tile", "Where",
                              "Cast", "ConstantOfShape"})
GATHER_OPS = frozenset({"Gather", "GatherElements", "GatherND", "GatherBlockQuantized"})
NORM_CHAIN_OPS = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Pow", "Mul"})
MASK_OPS = frozenset({"Add", "Sub", "Where"})


# ---------------------------------------------------------------------------------------------
# type inference
# ---------------------------------------------------------------------------------------------
def _vi_type(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return tensors.array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _constant_node_type(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "value":
            return a.t.data_type
        if a.name in ("value_float", "value_floats"):
            return FLOAT
        if a.name in ("value_int", "value_ints"):
            return TensorProto.INT64
        if a.name in ("value_string", "value_strings"):
            return TensorProto.STRING
    return 0


def infer_elem_types(model: onnx.ModelProto, small_init_numel: int = 4096) -> dict[str, int]:
    """Element type of every tensor name, from ONNX shape inference on a weight-free copy.

    Large initializers are turned into typed graph inputs so that the copy stays small (works for
    models above 2 GB). Outputs of ops unknown to ONNX (com.microsoft contrib ops) get the type of
    their first float input, and inference is re-run so that the types flow on.
    """
    g = model.graph
    sk = weight_free_copy(model, small_init_numel)
    sg = sk.graph
    types: dict[str, int] = {t.name: t.data_type for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            ct = _constant_node_type(n)
            if ct:
                types[n.output[0]] = ct
    extra: dict[str, int] = {}
    for _ in range(8):
        try:
            inf = infer_shapes(sk, data_prop=False, small_numel=small_init_numel)
        except Exception as exc:  # pragma: no cover - onnx raises only in strict mode
            raise GraphkitError(f"fp16: shape inference failed: {str(exc).splitlines()[0]}") from None
        ig = inf.graph
        for vi in list(ig.input) + list(ig.output) + list(ig.value_info):
            et = _vi_type(vi)
            if et:
                types[vi.name] = et
        types.update(extra)
        new = {}
        for n in g.node:
            missing = [o for o in n.output if o and not types.get(o)]
            if not missing:
                continue
            if n.domain in ("", "ai.onnx"):
                continue
            fin = next((types[i] for i in n.input if i and types.get(i) in (FLOAT, FLOAT16, TensorProto.DOUBLE,
                                                                           TensorProto.BFLOAT16)), 0)
            if fin:
                for o in missing:
                    new[o] = fin
        if not new:
            break
        extra.update(new)
        for o, et in new.items():
            sg.value_info.append(helper.make_tensor_value_info(o, et, None))
    return types


def _has_subgraphs(g: onnx.GraphProto) -> list[str]:
    out = []
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            out.append(f"{n.op_type} '{n.name}'")
    return out


def fp16_markers(model: onnx.ModelProto) -> list[str]:
    """Where the graph already holds float16 (empty list for a pure fp32 graph)."""
    g = model.graph
    found = []
    for t in g.initializer:
        if t.data_type == FLOAT16:
            found.append(f"initializer '{t.name}'")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if _vi_type(vi) == FLOAT16:
            found.append(f"tensor '{vi.name}'")
    for n in g.node:
        if n.op_type == "Constant" and _constant_node_type(n) == FLOAT16:
            found.append(f"Constant '{n.output[0]}'")
        if n.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16 for a in n.attribute):
            found.append(f"Cast '{n.name or n.output[0]}' to float16")
    return found


# Values at least this large are sentinels (mask fills such as finfo(float32).min), not data.
_SENTINEL = 1e30


def _refuse_out_of_range_weight(name: str, v: np.ndarray) -> None:
    """Clamping is only safe for scalar fills and sentinel values; a weight with real values beyond
    the float16 range would silently change the model's outputs, so it is refused."""
    finite = v[np.isfinite(v)]
    data = finite[(np.abs(finite) > 65504) & (np.abs(finite) < _SENTINEL)]
    if v.size > 1 and data.size:
        raise GraphkitError(f"fp16: tensor '{name}' has {data.size} value(s) beyond the float16 range "
                            f"(e.g. {float(data[0]):.4g}); clamping would change the model's outputs. "
                            "Keep this model in fp32 or use an 8-bit dtype (q8) instead")


def _clamp(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Clamp finite values outside the float16 range; returns (array, how many were clamped)."""
    if arr.size == 0:
        return arr, 0
    big = np.isfinite(arr) & (np.abs(arr) > FP16_MAX)
    n = int(big.sum())
    if n:
        arr = arr.copy()
        arr[big] = np.sign(arr[big]) * FP16_MAX
    return arr, n


def _at_limit(arr: np.ndarray) -> bool:
    return bool(arr.size) and bool((np.isfinite(arr) & (np.abs(arr) >= FP16_MAX)).any())


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
@dataclass
class Fp16Options:
    keep_logits_fp32: bool = option(True, "keep the 'logits' output float32 (final Cast), for Transformers.js 3.x")
    keep_io_types: bool = option(False, "keep every float graph input/output float32 (KV cache included)")
    fp32_ops: list[str] = option([], "extra op types to compute in float32 (a|b|c), e.g. Add to keep the residual "
                                     "stream fp32")


class Fp16Pass(GraphPass):
    """Convert float32 to float16; norm variance, softmax, rotary and masks stay float32 (see module doc)."""

    name = "fp16"
    tolerance = Tolerance("top1", 1.0, "the fp32 graph",
                          "greedy tokens equal fp32 on the shipped model; float16 rounding: each fp16 op adds relative "
                          "error up to 2^-11 (~4.9e-4), compounding over layers (tiny random-weight Qwen2, init 0.2: "
                          "logits max |diff| ~0.4% of their range; tests allow 1%); islands (norm variance, softmax, "
                          "rotary, masks) stay float32")
    mutates_input = False

    Options = Fp16Options

    def requires(self, model: onnx.ModelProto) -> None:
        sub = _has_subgraphs(model.graph)
        if sub:
            raise PreconditionError(
                f"fp16: the graph has control-flow subgraphs ({', '.join(sub[:3])}); this pass converts only flat "
                "graphs. Export without If/Loop/Scan or skip fp16")
        marks = fp16_markers(model)
        if marks:
            more = f" and {len(marks) - 3} more" if len(marks) > 3 else ""
            raise PreconditionError(
                f"fp16: the graph already contains float16 ({', '.join(marks[:3])}{more}); the fp16 pass runs once, "
                "on a float32 graph (convert the fp32 model instead)")
        has_float = any(t.data_type == FLOAT for t in model.graph.initializer) or any(
            _vi_type(vi) == FLOAT for vi in list(model.graph.input) + list(model.graph.output)
            + list(model.graph.value_info))
        if not has_float and not any(n.op_type == "Constant" and _constant_node_type(n) == FLOAT
                                     for n in model.graph.node):
            raise PassNotApplicable("no float32 tensors in the graph")

    def call(self, model: onnx.ModelProto) -> PassResult:
        conv = _Converter(model, self.options)
        out = conv.run()
        return PassResult(out, True, conv.summary(), conv.details)

    def ensures(self, model: onnx.ModelProto) -> None:
        g = model.graph
        opts = self.options
        for vi in list(g.input) + list(g.output):
            if vi.name.startswith(KV_PREFIXES) and _vi_type(vi) in (FLOAT, FLOAT16):
                want = FLOAT if opts.keep_io_types else FLOAT16
                if _vi_type(vi) != want:
                    raise PostconditionError(f"fp16: KV tensor '{vi.name}' is {_tname(_vi_type(vi))}, expected "
                                             f"{_tname(want)}")
        for vi in g.output:
            if vi.name == LOGITS and _vi_type(vi) in (FLOAT, FLOAT16):
                want = FLOAT if (opts.keep_logits_fp32 or opts.keep_io_types) else FLOAT16
                if _vi_type(vi) != want:
                    raise PostconditionError(f"fp16: 'logits' is {_tname(_vi_type(vi))}, expected {_tname(want)}")
        pairs = cast_round_trips(model)
        if pairs:
            raise PostconditionError(f"fp16: redundant Cast pairs left: {pairs[:3]}")


def _tname(t: int) -> str:
    return TensorProto.DataType.Name(t).lower() if t else "unknown"


def _cast_to(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return 0


def cast_round_trips(model: onnx.ModelProto, types: dict[str, int] | None = None) -> list[str]:
    """Cast pairs that convert a tensor to float32 and back to float16 (or vice versa)."""
    graph = Graph(model, with_info=False)
    types = types if types is not None else infer_elem_types(model)
    out = []
    for n in model.graph.node:
        if n.op_type != "Cast" or not n.input:
            continue
        p = graph.producer(n.input[0])
        if p is None or p.op_type != "Cast" or not p.input:
            continue
        t0, t1, t2 = types.get(p.input[0]), _cast_to(p), _cast_to(n)
        if {t1, t2} == {FLOAT, FLOAT16} and t0 == t2:
            out.append(f"{p.name or p.output[0]} -> {n.name or n.output[0]}")
    return out


class _Converter:
    def __init__(self, model: onnx.ModelProto, opts) -> None:
        self.src = model
        self.opts = opts
        self.fp32_ops = FP32_OPS | set(opts.fp32_ops)
        self.details: dict = {"clamped": [], "underflow_to_zero": 0, "casts_inserted": 0, "clips_inserted": 0,
                              "norm_islands": 0, "softmax_islands": 0, "fp32_op_nodes": 0, "aux_fp32_nodes": 0,
                              "initializers_fp16": 0, "initializers_fp32_kept": 0, "casts_removed": 0,
                              "identity_bypassed": 0}
        g = model.graph
        # the shared name authority, tensors and nodes each in their own namespace (a Cast node may be named
        # like the tensor it writes)
        self.names: set[str] = tensor_names(g)
        self.node_names = node_names(g)
        self._const_nodes_out: dict[str, onnx.NodeProto] = {}
        self._extra_const_nodes: dict[str, onnx.NodeProto] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        return fresh_name(base, self.names)

    def fresh_node(self, base: str) -> str:
        return fresh_name(base, self.node_names)

    def summary(self) -> str:
        d = self.details
        s = (f"{d['initializers_fp16']} initializers -> fp16, {d['casts_inserted']} casts inserted, "
             f"{d['casts_removed']} removed; fp32 islands: {d['norm_islands']} norm, {d['softmax_islands']} softmax, "
             f"{d['fp32_op_nodes']} fp32-op nodes, {d['aux_fp32_nodes']} aux nodes")
        if d["clamped"]:
            s += f"; clamped {len(d['clamped'])} constants to +-65504"
        return s

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        src = self.src
        g = src.graph
        opts = self.opts
        self.types = types = infer_elem_types(src)
        graph_inputs = {i.name for i in g.input}
        graph_outputs = [o.name for o in g.output]
        gout_set = set(graph_outputs)
        for o in graph_outputs:
            if o in graph_inputs:
                raise PreconditionError(f"fp16: graph output '{o}' is also a graph input; cannot retype it")

        # constants ----------------------------------------------------------------------------
        self.init_by_name = {t.name: t for t in g.initializer if t.name not in graph_inputs}
        const_node_by_out: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
                const_node_by_out[n.output[0]] = n
        consts = set(self.init_by_name) | set(const_node_by_out)

        # bypass Identity(constant)
        alias: dict[str, str] = {}
        nodes: list[onnx.NodeProto] = []
        for n in g.node:
            if (n.op_type == "Identity" and n.input and n.input[0] in consts and n.output[0] not in gout_set):
                alias[n.output[0]] = n.input[0]
                self.details["identity_bypassed"] += 1
                continue
            c = onnx.NodeProto()
            c.CopyFrom(n)
            for i, x in enumerate(c.input):
                if x in alias:
                    c.input[i] = alias[x]
            nodes.append(c)
        self.nodes = nodes
        is_float = lambda x: bool(x) and types.get(x) == FLOAT  # noqa: E731

        G = Graph(src, with_info=False, nodes=nodes)

        const_arrays: dict[str, np.ndarray] = {}

        def const_value(name: str) -> np.ndarray | None:
            if name in const_arrays:
                return const_arrays[name]
            if name in self.init_by_name:
                t = self.init_by_name[name]
                if t.data_type != FLOAT:
                    return None
                v = tensors.array(t)
            elif name in const_node_by_out:
                v = _constant_node_value(const_node_by_out[name])
                if v is None or v.dtype != np.float32:
                    return None
            else:
                return None
            if v.size <= 65536:  # keep big weights out of the cache: models can be several GB
                const_arrays[name] = v
            return v

        # activation classification ------------------------------------------------------------------
        A: set[str] = {i.name for i in g.input if is_float(i.name)}
        a_nodes: set[int] = set()
        for idx, n in enumerate(nodes):
            fins = [x for x in n.input if is_float(x)]
            seed = (n.op_type in GATHER_OPS and len(n.input) > 1 and n.input[0] in consts
                    and n.input[1] not in consts and any(is_float(o) for o in n.output))
            if seed or any(x in A for x in fins):
                a_nodes.add(idx)
                A.update(o for o in n.output if is_float(o))
        self.A = A

        # islands --------------------------------------------------------------------------------
        island: set[int] = set()
        for members in self._norm_islands(nodes, G, consts, const_value):
            island.update(members)
            self.details["norm_islands"] += 1
        for idx, n in enumerate(nodes):
            if n.op_type in ("Softmax", "LogSoftmax"):
                self.details["softmax_islands"] += 1
                island.add(idx)
                pn = G.producer(n.input[0])
                if pn is not None and pn.op_type in MASK_OPS:
                    pf = [x for x in pn.input if is_float(x)]
                    if any(x not in A for x in pf):
                        island.add(G.position(pn))
            elif n.op_type in self.fp32_ops or n.domain == "ai.onnx.ml":
                if any(is_float(x) for x in list(n.input) + list(n.output)):
                    island.add(idx)
                    self.details["fp32_op_nodes"] += 1

        # node modes: 16 = computes in fp16, 32 = computes in fp32 ----------------------------------
        mode = [32] * len(nodes)
        for idx, n in enumerate(nodes):
            if idx not in island and idx in a_nodes:
                mode[idx] = 16
        self.mode = mode

        keep_io = opts.keep_io_types

        def out_desired(name: str) -> int:
            if keep_io or (name == LOGITS and opts.keep_logits_fp32):
                return FLOAT
            return FLOAT16

        def req(ci: int, slot: int) -> int | None:
            n = nodes[ci]
            if n.op_type in ANY_TYPE_INPUTS:
                slots = ANY_TYPE_INPUTS[n.op_type]
                if slots is None or slot in slots:
                    return None
            if slot in FIXED_FP32_INPUTS.get(n.op_type, ()):
                return FLOAT
            return FLOAT16 if mode[ci] == 16 else FLOAT

        # taint: auxiliary tensors derived from constants at the fp16 limit
        tainted: set[str] = set()
        for name in consts:
            v = const_value(name)
            if v is not None and _at_limit(_clamp(v)[0]):
                tainted.add(name)
        for idx, n in enumerate(nodes):
            if n.op_type == "ConstantOfShape" and is_float(n.output[0]):
                val = next((tensors.array(a.t) for a in n.attribute if a.name == "value"), None)
                if val is not None and _at_limit(_clamp(val.astype(np.float32))[0]):
                    tainted.add(n.output[0])
            if mode[idx] == 32 and n.op_type not in ("Softmax", "LogSoftmax") and any(x in tainted for x in n.input):
                tainted.update(o for o in n.output if is_float(o))

        # reverse pass: Cast nodes follow their consumers; exact aux data movement sinks to fp16
        def consumers_want(o: str) -> set:
            wants = {req(G.position(c), s) for c, s in G.uses(o)}
            if o in gout_set:
                wants.add(out_desired(o))
            return wants

        for idx in reversed(range(len(nodes))):
            n = nodes[idx]
            if idx in island:
                continue
            fouts = [o for o in n.output if is_float(o)]
            if not fouts:
                continue
            wants = set().union(*(consumers_want(o) for o in fouts))
            wants.discard(None)
            if n.op_type == "Cast":
                fin = n.input[0] if is_float(n.input[0]) else None
                if wants == {FLOAT}:
                    mode[idx] = 32
                elif wants == {FLOAT16} and not (fin and fin in tainted):
                    mode[idx] = 16
                continue
            if mode[idx] == 32 and n.op_type in VALUE_PRESERVING and wants == {FLOAT16} \
                    and n.domain in ("", "ai.onnx"):
                mode[idx] = 16
        # everything that is neither activation-fp16 nor island is auxiliary fp32
        self.details["aux_fp32_nodes"] = sum(
            1 for idx, n in enumerate(nodes)
            if mode[idx] == 32 and idx not in island and any(is_float(o) for o in n.output))

        # new types of non-constant float tensors ---------------------------------------------------
        ntype: dict[str, int] = {}
        for i in g.input:
            if is_float(i.name):
                ntype[i.name] = FLOAT if keep_io else FLOAT16
        for idx, n in enumerate(nodes):
            fixed = FIXED_FP32_OUTPUTS.get(n.op_type, ())
            for s, o in enumerate(n.output):
                if not is_float(o) or o in consts:
                    continue
                if n.op_type == "Cast":
                    ntype[o] = FLOAT16 if mode[idx] == 16 else FLOAT
                else:
                    ntype[o] = FLOAT if (mode[idx] == 32 or s in fixed) else FLOAT16
        for name, t in types.items():
            if t != FLOAT:
                ntype.setdefault(name, t)
        self.ntype = ntype

        # constants: which types are needed --------------------------------------------------------
        const_req: dict[str, set[int]] = defaultdict(set)
        for idx, n in enumerate(nodes):
            for s, x in enumerate(n.input):
                if x in consts and is_float(x):
                    r = req(idx, s)
                    const_req[x].add(FLOAT if r is None else r)
        for o in graph_outputs:
            if o in consts:
                const_req[o].add(FLOAT)
        self.const_variant: dict[tuple[str, int], str] = {}
        new_inits: list[TensorProto] = []
        dropped_inits: set[str] = set()
        for name in sorted(const_req):
            v = const_value(name)
            if v is None:
                continue
            reqs = const_req[name]
            clamped, nclamp = _clamp(v)
            if nclamp:
                _refuse_out_of_range_weight(name, v)
                self.details["clamped"].append(f"{name} ({nclamp} value(s), range [{v.min():.4g}, {v.max():.4g}])")
            v16 = None
            if FLOAT16 in reqs:
                v16 = clamped.astype(np.float16)
                self.details["underflow_to_zero"] += int(((v16 == 0) & (clamped != 0)).sum())
            if reqs == {FLOAT16}:
                self.const_variant[(name, FLOAT16)] = name
                self._replace_const(name, v16, const_node_by_out, new_inits, dropped_inits)
                if name in self.init_by_name:
                    self.details["initializers_fp16"] += 1
                continue
            self.const_variant[(name, FLOAT)] = name
            if nclamp:
                self._replace_const(name, clamped, const_node_by_out, new_inits, dropped_inits)
            if name in self.init_by_name:
                self.details["initializers_fp32_kept"] += 1
            if v16 is not None:
                n16 = self.fresh(name + "_fp16")
                self.const_variant[(name, FLOAT16)] = n16
                if name in self.init_by_name:
                    new_inits.append(tensors.new_tensor(v16, n16))
                    self.details["initializers_fp16"] += 1
                else:
                    self._extra_const_nodes[name] = helper.make_node(
                        "Constant", [], [n16], name=self.fresh_node(name + "_fp16"),
                        value=numpy_helper.from_array(v16, n16))

        # rewrite nodes -----------------------------------------------------------------------------
        self.cast_cache: dict[tuple[str, int], str] = {}
        out_nodes: list[onnx.NodeProto] = []
        self.retargeted_identity: set[str] = set()  # outputs of Casts that were fp32->fp32 in the source
        for idx, n in enumerate(nodes):
            if n.op_type == "Constant" and n.output and n.output[0] in const_node_by_out:
                out_nodes.append(self._const_nodes_out.get(n.output[0], n))
                extra = self._extra_const_nodes.get(n.output[0])
                if extra is not None:
                    out_nodes.append(extra)
                continue
            for s, x in enumerate(n.input):
                if not is_float(x):
                    continue
                r = req(idx, s)
                if x in consts:
                    n.input[s] = self.const_variant.get((x, FLOAT if r is None else r), x)
                    continue
                if r is None:
                    continue
                n.input[s] = self._as_type(x, r, tainted, out_nodes)
            if n.op_type == "Cast" and _cast_to(n) == FLOAT and mode[idx] == 16:
                if is_float(n.input[0]):
                    self.retargeted_identity.add(n.output[0])
                for a in n.attribute:
                    if a.name == "to":
                        a.i = FLOAT16
            if n.op_type == "ConstantOfShape" and is_float(n.output[0]):
                self._constantofshape_value(n, mode[idx] == 16)
            out_nodes.append(n)

        # graph outputs ---------------------------------------------------------------------------------
        out_casts = []
        renames: dict[str, str] = {}
        for o in g.output:
            if not is_float(o.name):
                continue
            want = out_desired(o.name)
            have = ntype.get(o.name, FLOAT)
            if o.name in consts or have == want:
                continue  # a constant graph output keeps its float32 value
            internal = self.fresh(o.name + ("_fp16" if have == FLOAT16 else "_fp32"))
            renames[o.name] = internal
            ntype[internal] = have
            ntype[o.name] = want
            out_casts.append(helper.make_node("Cast", [internal], [o.name], to=want,
                                              name=self.fresh_node(o.name + "_cast")))
            self.details["casts_inserted"] += 1
        rename_in_nodes(out_nodes, renames)
        out_nodes.extend(out_casts)

        out_nodes = self._cleanup(out_nodes, gout_set)

        # assemble ------------------------------------------------------------------------------------
        used = {x for n in out_nodes for x in n.input if x} | gout_set
        model = onnx.ModelProto()
        for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
            if src.HasField(fld):
                setattr(model, fld, getattr(src, fld))
        model.opset_import.extend(src.opset_import)
        model.metadata_props.extend(src.metadata_props)
        model.functions.extend(src.functions)
        ng = model.graph
        ng.name = g.name
        ng.doc_string = g.doc_string
        replaced = {t.name: t for t in new_inits}
        for t in g.initializer:
            if t.name in dropped_inits and t.name not in replaced:
                continue
            if t.name in replaced:
                ng.initializer.append(replaced.pop(t.name))
            elif t.name in used or t.name in graph_inputs:
                ng.initializer.append(t)
        ng.initializer.extend(replaced.values())
        ng.sparse_initializer.extend(g.sparse_initializer)
        ng.node.extend(out_nodes)
        for i in g.input:
            vi = ng.input.add()
            vi.CopyFrom(i)
            if i.name in ntype and _vi_type(vi) == FLOAT:
                vi.type.tensor_type.elem_type = ntype[i.name]
        for o in g.output:
            vi = ng.output.add()
            vi.CopyFrom(o)
            if is_float(o.name) and o.name in ntype:
                vi.type.tensor_type.elem_type = ntype[o.name]
        alive = {x for n in out_nodes for x in n.output if x}
        for vi in g.value_info:
            if vi.name not in alive or vi.name in gout_set:
                continue
            c = ng.value_info.add()
            c.CopyFrom(vi)
            if _vi_type(c) == FLOAT and vi.name in ntype:
                c.type.tensor_type.elem_type = ntype[vi.name]
        return model

    def _replace_const(self, name, arr, const_node_by_out, new_inits, dropped_inits) -> None:
        if name in self.init_by_name:
            new_inits.append(tensors.new_tensor(arr, name))
            dropped_inits.add(name)
        else:
            old = const_node_by_out[name]
            self._const_nodes_out[name] = helper.make_node(
                "Constant", [], [name], name=old.name or self.fresh_node(name + "_const"),
                value=numpy_helper.from_array(arr, name))

    def _as_type(self, name: str, to: int, tainted: set[str], out_nodes: list) -> str:
        have = self.ntype.get(name, FLOAT)
        if have == to:
            return name
        key = (name, to)
        if key in self.cast_cache:
            return self.cast_cache[key]
        src = name
        if to == FLOAT16 and name in tainted:
            lo = self.fresh(name + "_clip_min")
            hi = self.fresh(name + "_clip_max")
            out_nodes.append(helper.make_node("Constant", [], [lo], name=self.fresh_node(lo),
                                              value=numpy_helper.from_array(np.array(-FP16_MAX, np.float32), lo)))
            out_nodes.append(helper.make_node("Constant", [], [hi], name=self.fresh_node(hi),
                                              value=numpy_helper.from_array(np.array(FP16_MAX, np.float32), hi)))
            clipped = self.fresh(name + "_clipped")
            out_nodes.append(helper.make_node("Clip", [name, lo, hi], [clipped], name=self.fresh_node(clipped)))
            self.ntype[clipped] = FLOAT
            self.details["clips_inserted"] += 1
            src = clipped
        out = self.fresh(name + ("_fp16" if to == FLOAT16 else "_fp32"))
        out_nodes.append(helper.make_node("Cast", [src], [out], to=to, name=self.fresh_node(out + "_cast")))
        self.ntype[out] = to
        self.cast_cache[key] = out
        self.details["casts_inserted"] += 1
        return out

    def _constantofshape_value(self, n: onnx.NodeProto, to_fp16: bool) -> None:
        """Clamp a float fill value to the float16 range; store it as float16 when the node is fp16."""
        for a in n.attribute:
            if a.name == "value":
                v, nclamp = _clamp(tensors.array(a.t).astype(np.float32))
                if nclamp:
                    self.details["clamped"].append(f"ConstantOfShape '{n.name or n.output[0]}' value")
                if nclamp or to_fp16:
                    a.t.CopyFrom(numpy_helper.from_array(v.astype(np.float16) if to_fp16 else v, a.t.name))
                return
        if to_fp16:
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))

    def _norm_islands(self, nodes, G: Graph, consts, const_value):
        """Normalization variance chains: [Cast->] Pow/Mul(x,x) -> ReduceMean -> ... -> Mul(x, .) | Div(x, .)."""
        def scalar(name):
            v = const_value(name)
            if v is None or v.size != 1:
                return None
            return float(v.reshape(-1)[0])

        for idx, n in enumerate(nodes):
            if n.op_type != "ReduceMean" or not n.input:
                continue
            pn = G.producer(n.input[0])
            if pn is None:
                continue
            p = G.position(pn)
            if pn.op_type == "Pow" and len(pn.input) > 1 and scalar(pn.input[1]) == 2.0:
                x = pn.input[0]
            elif pn.op_type == "Mul" and len(pn.input) == 2 and pn.input[0] == pn.input[1]:
                x = pn.input[0]
            else:
                continue
            if len(G.uses(pn.output[0])) != 1:
                continue
            members = [p, idx]
            cur = n.output[0]
            end = None
            for _ in range(6):
                cons = G.uses(cur)
                if len(cons) != 1:
                    break
                c = cons[0][0]
                ci = G.position(c)
                if c.op_type == "Mul" and x in c.input and cur in c.input:
                    end = ci
                    break
                if c.op_type == "Div" and len(c.input) == 2 and c.input[0] == x and c.input[1] == cur:
                    end = ci
                    break
                if c.op_type in NORM_CHAIN_OPS and all(i == cur or i in consts for i in c.input if i):
                    members.append(ci)
                    cur = c.output[0]
                    continue
                break
            if end is None:
                continue
            members.append(end)
            xn = G.producer(x)
            if xn is not None and xn.op_type == "Cast" and _cast_to(xn) == FLOAT:
                members.append(G.position(xn))
            yield members

    def _cleanup(self, nodes: list[onnx.NodeProto], gouts: set[str]) -> list[onnx.NodeProto]:
        """Drop Casts to a tensor's own type and collapse Cast round trips; drop dead Casts."""
        ntype = self.ntype
        prod: dict[str, onnx.NodeProto] = {}
        alias: dict[str, str] = {}

        def res(x: str) -> str:
            while x in alias:
                x = alias[x]
            return x

        kept = []
        for n in nodes:
            for i, x in enumerate(n.input):
                if x in alias:
                    n.input[i] = res(x)
            if n.op_type == "Cast" and n.input and n.output[0] not in gouts:
                to = _cast_to(n)
                src = n.input[0]
                st = ntype.get(src)
                if st in (FLOAT, FLOAT16) and st == to:
                    alias[n.output[0]] = src
                    self.details["casts_removed"] += 1
                    continue
                p = prod.get(src)
                if p is not None and p.op_type == "Cast" and p.input and to in (FLOAT, FLOAT16):
                    t0 = ntype.get(p.input[0])
                    lossless = t0 == FLOAT16 and _cast_to(p) == FLOAT and to == FLOAT16
                    identity_pair = (t0 == FLOAT and _cast_to(p) == FLOAT16 and to == FLOAT
                                     and p.output[0] in self.retargeted_identity)
                    if lossless or identity_pair:
                        alias[n.output[0]] = p.input[0]
                        self.details["casts_removed"] += 1
                        continue
            for o in n.output:
                if o:
                    prod[o] = n
            kept.append(n)
        # dead Casts/Constants/Clips we created or orphaned
        while True:
            used = {x for n in kept for x in n.input if x} | gouts
            dead = [n for n in kept if n.op_type in ("Cast", "Constant", "Clip")
                    and not any(o in used for o in n.output)]
            if not dead:
                break
            dead_ids = {id(n) for n in dead}
            self.details["casts_removed"] += sum(1 for n in dead if n.op_type == "Cast")
            kept = [n for n in kept if id(n) not in dead_ids]
        return kept
