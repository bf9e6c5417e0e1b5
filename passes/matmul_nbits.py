"""matmul-nbits: replace MatMuls with constant weights by ``com.microsoft.MatMulNBits``.

What is rewritten: every top-level ``MatMul`` whose B input is a constant 2-D float32/float16
weight ``[K, N]``: an initializer, a ``Constant`` node output, or a ``Transpose`` (perm [1, 0]) of
either, also through ``Identity`` nodes (the torchscript exporter routes deduplicated initializers
through them). Subgraphs (If/Loop bodies) are left alone. The quantized weight follows the MatMulNBits
contract and onnxruntime's own rounding (see :mod:`passes._quant`), so with the defaults
(bits 4, block 32, symmetric) the packed B and scales are byte-identical to
``MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)``.

* Scales are stored ``[N, k_blocks]`` in the weight's dtype (what ORT 1.32's quantizer writes and
  the schema documents); symmetric mode writes no zero points (the op's default is 8 / 128).
* A weight read by several MatMuls is quantized once; the new nodes share the packed tensors.
* ``fold_bias``: ``Add(MatMul(x, W), b)`` with a constant 1-D ``b`` of length N, where the MatMul
  output feeds only that Add, becomes MatMulNBits with ``b`` as its optional input 5 (``bias``).
* Float weights, Constant nodes and Identity/Transpose nodes that nothing reads any more are removed.
* The model is modified in place and returned (tensors are not copied: models can be > 2 GB).

Tied lm_head (``tie_word_embeddings``): exporters write the head as ``MatMul(h, W)`` where W is
``Transpose(table)`` of the embedding Gather's own table (*shared*), or a separate initializer
equal to ``table.T`` (a *duplicate*, e.g. the legacy torch exporter's constant-folded copy). The
pass detects both (the duplicate by comparing values) and applies ``lm_head``:

* ``auto`` (default): a *shared* head stays float, because the Gather still needs the float table,
  so a quantized head would be an extra copy that only adds bytes (and int4 heads are known to hurt
  quality: ORT PR #24384, repetition on phi-4-mini); this also matches ORT's quantizer and the
  Transformers.js q4 files. A *duplicate* head is quantized to **8 bits**: the float copy is
  replaced by one about 3.6x smaller (fp32), so the model shrinks, decoding reads fewer bytes, and
  int8 per-block error is ~16x smaller than int4, which avoids the int4-head quality loss.
* ``keep``: leave any tied head float. ``4`` / ``8``: quantize a tied head with that many bits.

Heads that are not tied are ordinary MatMuls (quantized with ``bits``; exclude them by name if
needed). ``PassResult.details`` lists what was quantized and, for every MatMul left float, why.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from passes._graph import MS_DOMAIN, Graph, ensure_opset, subgraph_reads
from passes._quant import blob_size, check_blockwise_options, check_finite, k_blocks, quantize_blockwise

_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass
class MatMulNBitsOptions:
    bits: int = option(4, "weight bits: 4 or 8")
    block_size: int = option(32, "elements per quantization block along K: a power of two, 16..256")
    symmetric: bool = option(True, "true: signed scale, implicit zero point (8 / 128), no zero_points input "
                                   "(ORT's default quantizer); false: per-block min/max with uint8 zero points")
    # Optional[...] rather than `int | None`: graphkit.passbase's spec-text coercion recognises
    # typing.Union but not types.UnionType on Python 3.11.
    accuracy_level: Optional[int] = option(None, "MatMulNBits accuracy_level 0..4 (4 = int8 activations on CPU); "
                                              "None or 0 writes no attribute")
    method: str = option("rtn", "rtn: onnxruntime's round-to-nearest (byte-identical); search: per-block scale/zero-point "
                                "search minimising the weighted error, same stored form (passes/_quant.py); gptq: "
                                "error compensation along the calibration Hessian (needs calibration; passes/_gptq.py)")
    calibration: str = option("", "statistics file from graphkit convert --calibration (graphkit/calibration.py): "
                                  "search weighs each input channel by E[x^2], gptq uses E[x x^T]")
    include: list[str] = option([], "only MatMul nodes whose name matches one of these globs (empty: all)")
    exclude: list[str] = option([], "skip MatMul nodes whose name matches one of these globs")
    lm_head: Literal["auto", "keep", "4", "8"] = option(
        "auto", "tied lm_head (weight = embedding table transposed): auto = keep float when it reads the "
                "Gather's own table (quantizing adds bytes), 8-bit when it is a duplicate copy; "
                "keep = float; 4 / 8 = quantize with that many bits")
    fold_bias: bool = option(True, "fold a following Add of a constant [N] bias into MatMulNBits' bias input")
    min_elements: int = option(0, "leave weights with fewer than K*N elements float")


@dataclass
class _Const:
    """A constant tensor: an initializer or a Constant node's output, maybe seen through Identity
    nodes (exporters use them to deduplicate equal initializers) and at most one 2-D Transpose."""
    root: str                       # initializer name / Constant output name
    tensor: TensorProto
    const_node: onnx.NodeProto | None
    transpose: onnx.NodeProto | None = None  # the Transpose between the root and the consumer, if any
    via: tuple[str, ...] = ()       # outputs of the Identity/Transpose nodes between root and consumer

    @property
    def shape(self) -> tuple[int, ...]:
        dims = tuple(int(d) for d in self.tensor.dims)
        return dims[::-1] if self.transpose is not None else dims

    def array(self) -> np.ndarray:
        """The effective value (transposed if seen through the Transpose); a view where possible."""
        arr = _tensor_view(self.tensor, self.root)
        return arr.T if self.transpose is not None else arr


@dataclass
class _Job:
    index: int                      # position of the MatMul in graph.node
    node: onnx.NodeProto
    weight: _Const
    bits: int
    bias: tuple[int, str, str] | None = None  # (Add's index, bias tensor name, Add's output)
    tied: bool = False


def _tensor_view(t: TensorProto, name: str) -> np.ndarray:
    return tensors.array(t)


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else "<unnamed>")


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` or any subgraph, plus the graph outputs."""
    return ({o.name for o in graph.output} | {i for n in graph.node for i in n.input if i}
            | subgraph_reads(graph))


class MatMulNBitsPass(GraphPass):
    name = "matmul-nbits"
    Options = MatMulNBitsOptions
    tolerance = Tolerance("top1", 0.90, "the fp32 graph",
                          "weights: |dequant(W) - W| <= step/2 per element, step = |scale| of the block (symmetric: "
                          "max|W_block| / 2^(bits-1); asymmetric: range / (2^bits - 1)); the few symmetric-mode values "
                          "clipped on the block's short side are off by <= one step; outputs: equal to x @ dequant(W) "
                          "(+ bias) up to float accumulation error")
    mutates_input = True

    # ------------------------------------------------------------------ options
    def validate_options(self) -> None:
        o = self.options
        check_blockwise_options("matmul-nbits", o)
        if not isinstance(o.symmetric, bool):
            raise GraphkitError(f"matmul-nbits: symmetric must be true or false, got {o.symmetric!r}")
        al = o.accuracy_level
        if al is not None and (isinstance(al, bool) or not isinstance(al, int) or not 0 <= al <= 4):
            raise GraphkitError(f"matmul-nbits: accuracy_level must be None or 0..4 "
                                f"(0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), got {al!r}")
        for key in ("include", "exclude"):
            val = getattr(o, key)
            if isinstance(val, str):
                setattr(o, key, [val])
            elif not isinstance(val, (list, tuple)) or not all(isinstance(g, str) and g for g in val):
                raise GraphkitError(f"matmul-nbits: {key} must be a list of node-name globs, got {val!r}")
        head = str(o.lm_head).strip().lower() if not isinstance(o.lm_head, bool) else o.lm_head
        if head not in ("auto", "keep", "4", "8"):
            raise GraphkitError(f"matmul-nbits: lm_head must be auto, keep, 4 or 8, got {o.lm_head!r}")
        o.lm_head = head
        if not isinstance(o.fold_bias, bool):
            raise GraphkitError(f"matmul-nbits: fold_bias must be true or false, got {o.fold_bias!r}")
        if isinstance(o.min_elements, bool) or not isinstance(o.min_elements, int) or o.min_elements < 0:
            raise GraphkitError(f"matmul-nbits: min_elements must be an integer >= 0, got {o.min_elements!r}")

    # ------------------------------------------------------------------ analysis
    def _plan(self, model: onnx.ModelProto) -> tuple[list[_Job], dict[str, str], dict[str, str]]:
        """(jobs, skipped {node: reason}, lm_head decisions {node: text}); reads, never writes."""
        o = self.options
        g = model.graph
        G = Graph(model, with_info=False)
        inits = G.inits
        ranks = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)

        def const(name: str, through_transpose: bool = True, depth: int = 0) -> _Const | None:
            if name in inits:
                return None if G.is_overridable(name) else _Const(name, inits[name], None)
            p = G.producer(name)
            if p is None or p.domain not in ("", "ai.onnx") or depth > 8:
                return None
            if p.op_type == "Constant":
                attrs = {a.name: a for a in p.attribute}
                if "value" in attrs and attrs["value"].type == onnx.AttributeProto.TENSOR:
                    return _Const(name, attrs["value"].t, p)
                return None
            if p.op_type == "Identity" and p.input:
                inner = const(p.input[0], through_transpose, depth + 1)
                if inner is not None:
                    inner.via = inner.via + (name,)
                return inner
            if p.op_type == "Transpose" and through_transpose and p.input:
                perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
                inner = const(p.input[0], False, depth + 1)
                if inner is not None and len(inner.tensor.dims) == 2 and perm in (None, [1, 0]):
                    return _Const(inner.root, inner.tensor, inner.const_node, p, inner.via + (name,))
            return None

        # Embedding tables: Gather(axis 0) of a constant 2-D float table, effective shape [V, H].
        tables: list[tuple[onnx.NodeProto, _Const]] = []
        for n in g.node:
            if n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or not n.input:
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            c = const(n.input[0])
            if axis == 0 and c is not None and len(c.tensor.dims) == 2 and c.tensor.data_type in _FLOAT_TYPES:
                tables.append((n, c))

        def tied_with(w: _Const) -> tuple[str, onnx.NodeProto] | None:
            for gnode, t in tables:
                if t.root == w.root:
                    return "shared", gnode
            for gnode, t in tables:
                if t.shape[::-1] != w.shape or t.tensor.data_type != w.tensor.data_type:
                    continue
                a, b = w.array(), t.array().T
                if np.array_equal(a[:, :4], b[:, :4]) and np.array_equal(a, b):
                    return "duplicate", gnode
            return None

        jobs: list[_Job] = []
        skipped: dict[str, str] = {}
        heads: dict[str, str] = {}
        for idx, n in enumerate(g.node):
            if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
                continue
            label = _node_label(n)
            if o.include and not any(fnmatch.fnmatchcase(label, p) for p in o.include):
                skipped[label] = "not matched by include"
                continue
            if any(fnmatch.fnmatchcase(label, p) for p in o.exclude):
                skipped[label] = "matched by exclude"
                continue
            w = const(n.input[1])
            if w is None:
                skipped[label] = (f"weight '{n.input[1]}' is a graph input (overridable at run time)"
                                  if n.input[1] in G.graph_inputs else "B is not a constant weight")
                continue
            if len(w.shape) != 2:
                skipped[label] = f"weight '{w.root}' is {len(w.shape)}-D, not 2-D"
                continue
            if w.tensor.data_type not in _FLOAT_TYPES:
                skipped[label] = (f"weight '{w.root}' is "
                                  f"{TensorProto.DataType.Name(w.tensor.data_type).lower()}, not float32/float16")
                continue
            K, N = w.shape
            if K == 0 or N == 0:
                skipped[label] = f"weight '{w.root}' is empty"
                continue
            if ranks.get(n.input[0]) == 1:
                skipped[label] = "A is 1-D (MatMulNBits needs A of rank >= 2)"
                continue
            if K * N < o.min_elements:
                skipped[label] = f"weight has {K * N} elements < min_elements={o.min_elements}"
                continue
            bits = o.bits
            tie = tied_with(w) if tables else None
            if tie is not None:
                kind, gnode = tie
                what = (f"tied lm_head: weight is the table of Gather '{_node_label(gnode)}'" if kind == "shared"
                        else f"tied lm_head: weight duplicates the table of Gather '{_node_label(gnode)}' (transposed)")
                if o.lm_head == "keep" or (o.lm_head == "auto" and kind == "shared"):
                    why = ("kept float (lm_head=keep)" if o.lm_head == "keep" else
                           "kept float: the Gather keeps the float table, so a quantized copy would add bytes "
                           "(lm_head=auto; set lm_head=8 or 4 to quantize it anyway)")
                    skipped[label] = f"{what}; {why}"
                    heads[label] = skipped[label]
                    continue
                bits = 8 if o.lm_head in ("auto", "8") else 4
                heads[label] = f"{what}; quantized to {bits} bits (lm_head={o.lm_head})"
            bias = None
            if o.fold_bias and n.output[0] not in G.graph_outputs:
                users = G.users(n.output[0])
                add = users[0] if len(users) == 1 else None
                if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") \
                        and len(add.input) == 2 and list(add.input).count(n.output[0]) == 1:
                    other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
                    b = const(other, through_transpose=False)
                    if b is not None and list(b.tensor.dims) == [N] and b.tensor.data_type == w.tensor.data_type:
                        bias = (G.position(add), other, add.output[0])
            jobs.append(_Job(idx, n, w, bits, bias, tied=tie is not None))
        return jobs, skipped, heads

    # ------------------------------------------------------------------ contract
    def requires(self, model: onnx.ModelProto) -> None:
        jobs, skipped, _ = self._plan(model)
        if not jobs:
            already = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
            reasons = sorted(set(skipped.values()))
            detail = f"; MatMuls left: {len(skipped)} ({'; '.join(reasons[:3])})" if skipped else ""
            raise PassNotApplicable(
                f"no MatMul with a constant 2-D float weight to quantize ({already} MatMulNBits already present)"
                + detail)

    def call(self, model: onnx.ModelProto) -> PassResult:
        o = self.options
        jobs, skipped, heads = self._plan(model)
        if not jobs:
            return PassResult(model, False, "no eligible MatMul", {"quantized": 0, "skipped": skipped})
        g = model.graph

        # 1. Quantize every distinct weight first (this is what can fail); the graph is untouched so far.
        fresh = Graph(model, with_info=False).fresh_name

        packed: dict[tuple[str, bool, int], tuple[str, str, str | None]] = {}
        new_inits: list[TensorProto] = []
        stats = None
        if o.calibration:
            from passes._calib_stats import Stats
            stats = Stats(o.calibration)
        methods: dict[str, str] = {}
        factors: dict = {}  # activation -> passes._gptq.Factor
        for job in jobs:
            key = (job.weight.root, job.weight.transpose is not None, job.bits)
            if key in packed:
                continue
            w = job.weight
            arr = np.asarray(w.array())
            q = None
            if stats is not None and o.method == "gptq":
                H = stats.hessian(w.root, job.node.input[0])
                if H is not None and H.shape == (arr.shape[0],) * 2:
                    from passes._gptq import gptq_factor, gptq_quantize
                    check_finite(arr, w.root)
                    # q/k/v (gate/up) read one input: its factorisation is computed once, the last few kept
                    act = stats.activation(w.root, job.node.input[0])
                    if act not in factors:
                        if len(factors) >= 4:
                            del factors[next(iter(factors))]
                        factors[act] = gptq_factor(H)
                    q, scales, zp = gptq_quantize(arr, None, job.bits, o.block_size, o.symmetric, dtype=arr.dtype,
                                                  factor=factors[act])
                    methods[w.root] = "gptq"
            if q is None:
                imp = stats.importance(w.root, job.node.input[0]) if stats is not None else None
                if imp is not None and imp.shape != (arr.shape[0],):
                    imp = None
                method = "search" if o.method == "gptq" else o.method
                q, scales, zp = quantize_blockwise(arr, job.bits, o.block_size, o.symmetric, name=w.root,
                                                   method=method, importance=imp)
                methods[w.root] = method + (" (weighted by calibration)" if imp is not None else "")
            base = w.root + ("_T" if w.transpose is not None else "")
            names = (fresh(f"{base}_Q{job.bits}"), fresh(f"{base}_scales"),
                     fresh(f"{base}_zero_points") if zp is not None else None)
            new_inits.append(tensors.new_tensor(q, names[0]))
            new_inits.append(tensors.new_tensor(scales, names[1]))
            if zp is not None:
                new_inits.append(numpy_helper.from_array(zp, names[2]))
            packed[key] = names

        # 2. Rewrite: each MatMul (or its bias Add) is replaced in place by the new node.
        via_outs = {x for j in jobs for x in j.weight.via}
        roots = {j.weight.root for j in jobs}
        replace: dict[int, onnx.NodeProto] = {}
        created: list[str] = []
        drop: set[int] = set()
        folded = 0
        for job in jobs:
            n, w = job.node, job.weight
            K, N = w.shape
            qname, sname, zname = packed[(w.root, w.transpose is not None, job.bits)]
            inputs = [n.input[0], qname, sname] + ([zname] if zname else [])
            out = n.output[0]
            if job.bias is not None:
                _, bias_name, out = job.bias
                inputs = inputs + [""] * (5 - len(inputs)) + [bias_name]
            attrs = dict(K=K, N=N, bits=job.bits, block_size=o.block_size)
            if o.accuracy_level:
                attrs["accuracy_level"] = o.accuracy_level
            new = helper.make_node("MatMulNBits", inputs, [out], name=fresh(f"{_node_label(n)}_Q{job.bits}"),
                                   domain=MS_DOMAIN, **attrs)
            created.append(new.name)
            if job.bias is not None:
                replace[job.bias[0]] = new  # at the Add: after A, the bias and the MatMul
                drop.add(job.index)
                folded += 1
            else:
                replace[job.index] = new
        for i, new in replace.items():
            g.node[i].CopyFrom(new)
        for i in sorted(drop, reverse=True):
            del g.node[i]
        g.initializer.extend(new_inits)

        # 3. Remove what nothing reads any more: Identity/Transpose, then the float weights / Constants.
        removed = self._remove_dead(model, via_outs, roots)
        ensure_opset(model, MS_DOMAIN)

        details = {
            "quantized": len(jobs),
            "weights": len(packed),
            "bits": o.bits,
            "block_size": o.block_size,
            "symmetric": o.symmetric,
            "bias_folded": folded,
            "removed": removed,  # float weights, Constants, Identity/Transpose outputs
            "lm_head": heads,
            "skipped": skipped,
            "methods": methods,
        }
        summary = (f"{len(jobs)} MatMul -> MatMulNBits ({o.bits}-bit, block {o.block_size}, "
                   f"{'symmetric' if o.symmetric else 'asymmetric'}; {len(packed)} weights"
                   + (f", {folded} biases folded" if folded else "")
                   + f"); {len(skipped)} MatMul left float")
        head_bits = sorted({j.bits for j in jobs if j.tied})
        if head_bits:
            summary += "; tied lm_head " + "/".join(f"{b}-bit" for b in head_bits)
        self._created = created
        return PassResult(model, True, summary, details)

    @staticmethod
    def _remove_dead(model: onnx.ModelProto, via_outs: set[str], roots: set[str]) -> list[str]:
        """Delete the nodes producing ``via_outs`` (Identity/Transpose) and ``roots`` (Constant), and
        the ``roots`` initializers, each only once nothing reads it any more (subgraphs included)."""
        g = model.graph
        gone: list[str] = []
        names = via_outs | roots
        while True:  # outermost first: removing one node can free the one it reads
            used = _used_names(g)
            dead = [i for i, n in enumerate(g.node)
                    if len(n.output) == 1 and n.output[0] in names and n.output[0] not in used]
            if not dead:
                break
            for i in reversed(dead):
                gone.append(g.node[i].output[0])
                del g.node[i]
        used = _used_names(g)
        dead_inits = set()
        for i in reversed(range(len(g.initializer))):
            name = g.initializer[i].name
            if name in roots and name not in used:
                dead_inits.add(name)
                gone.append(name)
                del g.initializer[i]
        if dead_inits:  # IR < 4 lists initializers as graph inputs too
            for i in reversed(range(len(g.input))):
                if g.input[i].name in dead_inits:
                    del g.input[i]
        # value_info of tensors that no longer exist (removed Transposes/Constants, folded MatMul outputs)
        produced = {x for n in g.node for x in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
        for i in reversed(range(len(g.value_info))):
            if g.value_info[i].name not in produced:
                del g.value_info[i]
        return sorted(gone)

    def ensures(self, model: onnx.ModelProto) -> None:
        """The nodes written by the last ``call`` exist, read existing tensors, and have B / scales
        shaped as the contract says for their K, N, bits and block_size."""
        g = model.graph
        if not any(op.domain == MS_DOMAIN for op in model.opset_import):
            raise PostconditionError("matmul-nbits: com.microsoft opset import missing after rewrite")
        inits = {t.name: t for t in g.initializer}
        available = set(inits) | {i.name for i in g.input} | {x for n in g.node for x in n.output}
        created = set(getattr(self, "_created", []))
        found = 0
        for n in g.node:
            if n.op_type != "MatMulNBits" or n.domain != MS_DOMAIN or n.name not in created:
                continue
            found += 1
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            label = _node_label(n)
            missing = [x for x in n.input if x and x not in available]
            if missing:
                raise PostconditionError(f"matmul-nbits: node '{label}' reads missing tensor(s) {missing}")
            if n.input[1] in inits and n.input[2] in inits:
                kb = k_blocks(a["K"], a["block_size"])
                want_b = [a["N"], kb, blob_size(a["block_size"], a.get("bits", 4))]
                if list(inits[n.input[1]].dims) != want_b or list(inits[n.input[2]].dims) != [a["N"], kb]:
                    raise PostconditionError(
                        f"matmul-nbits: node '{label}' has B {list(inits[n.input[1]].dims)} / scales "
                        f"{list(inits[n.input[2]].dims)}, expected {want_b} / {[a['N'], kb]}")
        if found != len(created):
            raise PostconditionError(f"matmul-nbits: {len(created) - found} of the {len(created)} MatMulNBits "
                                     "nodes written are missing from the result")
