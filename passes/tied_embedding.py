"""``tied-embedding``: store a tied embedding table once, block-quantized, for both of its uses.

When ``tie_word_embeddings`` is true the exporters leave the embedding table ``E [vocab, hidden]``
in float for the input ``Gather`` and read it again (shared through a Transpose, or as a duplicate
``E.T`` initializer) as the ``lm_head`` MatMul's weight. This pass quantizes ``E`` once with the
MatMulNBits block layout — ``packed [vocab, k_blocks, blob]`` and ``scales [vocab, k_blocks]`` are
already one row per token — and uses that single copy twice:

* ``lm_head`` becomes ``com.microsoft.MatMulNBits(x, packed, scales)`` (N = vocab, K = hidden);
* the lookup becomes standard ops only: ``Gather`` of the packed rows and of their scales, nibble
  unpacking in float arithmetic (``hi = Floor(b / 16)``, ``lo = b - 16 * hi``; exact for 0..255),
  minus the implicit zero point, times the scale, ``Reshape`` and (if K was padded) ``Slice``.
  No ``GatherBlockQuantized`` (onnxruntime-web's wasm build has no kernel for it) and no bitwise
  ops (absent before opset 18), so the graph runs wherever onnxruntime-web runs.

Guarantee and tolerance: both uses see exactly ``dequantize_blockwise(packed, scales)`` — the
embedding rows and the head's weight are the same dequantized matrix, within the quantization step
of ``E`` (``|scale| / 2`` per element, one step on the symmetric short side; see ``passes/_quant``).
Option ``symmetric=false`` stores per-block uint8 zero points (packed two per byte for 4 bits, as
MatMulNBits' input 3 expects); the lookup gathers and unpacks them the same way, so both uses still
see exactly ``dequantize_blockwise(packed, scales, zero_points)``. On the shipped example a 4-bit table
with ``block_size=16, symmetric=false`` holds KL 7.1e-3 vs PyTorch (symmetric block 32: 1.0e-2; the
anchor recipe's float table with a 4-bit head: 9.3e-3); see docs/accuracy-level.md.
Run it before ``matmul-nbits`` (which otherwise keeps a shared head in float) and before ``fp16``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from passes._graph import MS_DOMAIN, Graph, ensure_opset
from passes._quant import check_blockwise_options, k_blocks, quantize_blockwise


@dataclass
class TiedEmbeddingOptions:
    bits: int = option(4, "bits for the shared table: 4 (smallest) or 8 (int4 heads can cause repetition)")
    block_size: int = option(32, "elements per quantization block along hidden: a power of two, 16..256")
    accuracy_level: int | None = option(None, "MatMulNBits accuracy_level for the lm_head (None: attribute omitted)")
    symmetric: bool = option(True, "true: signed scale, implicit zero point (no zero_points tensor); false: per-block "
                                   "min/max with uint8 zero points (MatMulNBits input 3; the lookup reads them too)")
    method: str = option("rtn", "rtn: round-to-nearest; search: per-block scale/zero-point search minimising the "
                                "weighted error, same stored form (passes/_quant.py); gptq: error compensation along "
                                "the lm_head input's statistics (needs calibration; passes/_gptq.py)")
    calibration: str = option("", "statistics file from graphkit convert --calibration (graphkit/calibration.py)")


@dataclass
class _Tie:
    gather: onnx.NodeProto
    head: onnx.NodeProto
    table: str                   # initializer name of E [vocab, hidden]
    head_weight: str             # the name the head MatMul reads (Transpose output or duplicate initializer)
    transpose: onnx.NodeProto | None


def _find_ties(model: onnx.ModelProto) -> list[_Tie]:
    g = model.graph
    G = Graph(model, with_info=False)
    inits = {name: G.initializer(name) for name in G.inits if G.initializer(name) is not None}
    tables = {}
    for n in g.node:
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 \
                and inits[n.input[0]].data_type == TensorProto.FLOAT and n.input[1] not in inits:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if axis == 0:
                tables[n.input[0]] = n
    ties = []
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        w = n.input[1]
        for name, gather in tables.items():
            E = inits[name]
            prod = G.producer(w)
            if prod is not None and prod.op_type == "Transpose" and prod.input[0] == name:
                perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), [1, 0])
                if perm == [1, 0]:
                    ties.append(_Tie(gather, n, name, w, prod))
            elif w in inits and list(inits[w].dims) == list(E.dims)[::-1] and inits[w].data_type == E.data_type:
                if np.array_equal(tensors.array(inits[w]), tensors.array(E).T):
                    ties.append(_Tie(gather, n, name, w, None))
    return ties


class TiedEmbeddingPass(GraphPass):
    """Quantize a tied embedding table once and use it for the lookup and the lm_head."""

    name = "tied-embedding"
    Options = TiedEmbeddingOptions
    tolerance = Tolerance("top1", 0.90, "the fp32 graph",
                          "embedding rows and lm_head weight = dequantized E, |Δ| <= |scale|/2 per element (one step "
                          "on the symmetric short side); outputs equal x @ dequant(E).T and dequant(E)[ids]")
    mutates_input = True

    def validate_options(self) -> None:
        check_blockwise_options("tied-embedding", self.options)

    def requires(self, model: onnx.ModelProto) -> None:
        ties = _find_ties(model)
        if not ties:
            raise PassNotApplicable("no embedding Gather whose table the lm_head MatMul also reads (not tied, or already quantized)")
        if len({t.table for t in ties}) > 1 or len(ties) > 1:
            raise GraphkitError("tied-embedding: several tied tables/heads found ("
                                + ", ".join(f"{t.table}->{t.head.name}" for t in ties) + "); expected one")

    def call(self, model: onnx.ModelProto) -> PassResult:
        o = self.options
        tie = _find_ties(model)[0]
        g = model.graph
        G = Graph(model, with_info=False)
        fresh = G.fresh_name  # every new name checked against the graph's (they used to be taken as given)
        E = tensors.array(G.inits[tie.table])
        vocab, hidden = E.shape
        H = imp = None
        if o.calibration:
            from passes._calib_stats import Stats
            stats = Stats(o.calibration)
            H = stats.hessian(tie.table, tie.head.input[0])
            imp = stats.importance(tie.table, tie.head.input[0])
            H = H if H is not None and H.shape == (hidden, hidden) else None
            imp = imp if imp is not None and imp.shape == (hidden,) else None
        if o.method == "gptq" and H is not None:
            from passes._gptq import gptq_quantize
            from passes._quant import check_finite
            check_finite(E, tie.table, "tied-embedding")
            packed, scales, zps = gptq_quantize(np.ascontiguousarray(E.T), H, o.bits, o.block_size, o.symmetric)
        else:
            packed, scales, zps = quantize_blockwise(E.T, o.bits, o.block_size, symmetric=o.symmetric, name=tie.table,
                                                     method="search" if o.method == "gptq" else o.method,
                                                     importance=imp)
        kb = k_blocks(hidden, o.block_size)
        base = tie.table.replace("/", "_").strip("_") or "embed"
        names = {k: fresh(f"{base}_{k}") for k in ("q", "scales", "zero_points")}
        new_inits = [numpy_helper.from_array(packed, names["q"]), numpy_helper.from_array(scales, names["scales"])]
        if zps is not None:
            new_inits.append(numpy_helper.from_array(zps, names["zero_points"]))

        # lm_head → MatMulNBits reading the shared packed table
        head_attrs = dict(K=hidden, N=vocab, bits=o.bits, block_size=o.block_size)
        if o.accuracy_level:
            head_attrs["accuracy_level"] = o.accuracy_level
        head_inputs = [tie.head.input[0], names["q"], names["scales"]] + ([names["zero_points"]] if zps is not None else [])
        head = helper.make_node("MatMulNBits", head_inputs, list(tie.head.output),
                                name=fresh((tie.head.name or "lm_head") + "_tied_q"), domain=MS_DOMAIN, **head_attrs)

        # lookup → Gather packed rows + scales, unpack, dequantize
        ids, out = tie.gather.input[1], tie.gather.output[0]
        p = f"{base}_lookup"
        nodes, consts = [], []

        def const(name: str, value: np.ndarray) -> str:
            c_name = fresh(f"{p}_const_{name}")
            consts.append(numpy_helper.from_array(value, c_name))
            return c_name

        def node(op: str, inputs: list[str], suffix: str, **attrs) -> str:
            o_name = fresh(f"{p}_{suffix}")
            nodes.append(helper.make_node(op, inputs, [o_name], name=o_name, **attrs))
            return o_name

        rows = node("Gather", [names["q"], ids], "rows", axis=0)                   # [..., kb, blob] uint8
        row_scales = node("Gather", [names["scales"], ids], "row_scales", axis=0)  # [..., kb]
        as_float = node("Cast", [rows], "rows_f", to=TensorProto.FLOAT)
        if o.bits == 4:
            hi = node("Floor", [node("Div", [as_float, const("sixteen", np.array(16.0, np.float32))], "div16")], "hi")
            lo = node("Sub", [as_float, node("Mul", [hi, const("sixteen_b", np.array(16.0, np.float32))], "hi16")], "lo")
            # element 2i is the low nibble: interleave as [..., blob, 2] → [..., block_size]
            pair = node("Concat", [node("Unsqueeze", [lo, const("last", np.array([-1], np.int64))], "lo_u"),
                                   node("Unsqueeze", [hi, const("last_b", np.array([-1], np.int64))], "hi_u")], "pair", axis=-1)
            levels = pair
        else:
            levels = as_float
        # [..., kb, blob(,2)] → [..., kb, block_size] via a shape computed at run time from the ids
        ids_shape = node("Shape", [ids], "ids_shape")
        block_shape = node("Concat", [ids_shape, const("block_shape", np.array([kb, o.block_size], np.int64))], "block_shape", axis=0)
        blocks = node("Reshape", [levels, block_shape], "blocks")
        if zps is None:
            centered = node("Sub", [blocks, const("zero_point", np.array(float(1 << (o.bits - 1)), np.float32))], "centered")
        else:  # per-block zero points: [..., ceil(kb*bits/8)] packed like the weights, low nibble first
            zrow = node("Cast", [node("Gather", [names["zero_points"], ids], "row_zp", axis=0)], "row_zp_f", to=TensorProto.FLOAT)
            if o.bits == 4:
                zhi = node("Floor", [node("Div", [zrow, const("sixteen_z", np.array(16.0, np.float32))], "zdiv16")], "zhi")
                zlo = node("Sub", [zrow, node("Mul", [zhi, const("sixteen_zb", np.array(16.0, np.float32))], "zhi16")], "zlo")
                zpair = node("Concat", [node("Unsqueeze", [zlo, const("last_z", np.array([-1], np.int64))], "zlo_u"),
                                        node("Unsqueeze", [zhi, const("last_zb", np.array([-1], np.int64))], "zhi_u")], "zpair", axis=-1)
                zshape = node("Concat", [ids_shape, const("zp_shape", np.array([2 * zps.shape[1]], np.int64))], "zp_shape", axis=0)
                zrow = node("Reshape", [zpair, zshape], "zp_levels")
                if 2 * zps.shape[1] != kb:
                    zrow = node("Slice", [zrow, const("zstart", np.array([0], np.int64)), const("zend", np.array([kb], np.int64)),
                                          const("zaxis", np.array([-1], np.int64))], "zp_sliced")
            centered = node("Sub", [blocks, node("Unsqueeze", [zrow, const("last_zc", np.array([-1], np.int64))], "zp_u")], "centered")
        scaled = node("Mul", [centered, node("Unsqueeze", [row_scales, const("last_c", np.array([-1], np.int64))], "scale_u")], "scaled")
        flat_shape = node("Concat", [ids_shape, const("flat", np.array([kb * o.block_size], np.int64))], "flat_shape", axis=0)
        flat = node("Reshape", [scaled, flat_shape], "flat")
        if kb * o.block_size != hidden:
            flat = node("Slice", [flat, const("start", np.array([0], np.int64)), const("end", np.array([hidden], np.int64)),
                                  const("axis", np.array([-1], np.int64))], "sliced")
        nodes.append(helper.make_node("Identity", [flat], [out], name=fresh(f"{p}_out")))

        # splice: replace the Gather in place (keeps topological order), swap the head, drop dead weights
        new_nodes = []
        for n in g.node:
            if n is tie.gather:
                new_nodes.extend(nodes)
            elif n is tie.head:
                new_nodes.append(head)
            elif n is tie.transpose and sum(tie.head_weight in m.input for m in g.node) == 1:
                continue
            else:
                new_nodes.append(n)
        del g.node[:]
        g.node.extend(new_nodes)
        used = {i for n in g.node for i in n.input} | {x.name for x in g.output}
        kept = [t for t in g.initializer if t.name in used]
        removed = [t.name for t in g.initializer if t.name not in used]
        del g.initializer[:]
        g.initializer.extend(kept + new_inits + consts)
        ensure_opset(model, MS_DOMAIN)
        saved = E.nbytes * (2 if tie.transpose is None else 1) - packed.nbytes - scales.nbytes - (0 if zps is None else zps.nbytes)
        return PassResult(model, True,
                          f"table {tie.table} [{vocab}x{hidden}] stored once in {o.bits} bits (block {o.block_size}, "
                          f"{'symmetric' if o.symmetric else 'zero points'}); lm_head {tie.head.name} → MatMulNBits; "
                          f"{saved / 2**20:.1f} MB saved",
                          {"table": tie.table, "removed": removed, "bytes_saved": int(saved)})

    def ensures(self, model: onnx.ModelProto) -> None:
        if _find_ties(model):
            raise GraphkitError("tied-embedding: a float tied table is still read by the lm_head")
