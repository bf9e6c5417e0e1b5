"""pack-matmul: MatMuls that read the same input with constant weights -> one MatMul + ``Split``.

What is matched: two or more top-level ``MatMul`` nodes (default domain) whose A input is the same
tensor and whose B inputs are constant 2-D float weights ``[K, N_i]`` (initializers, not graph
inputs) of one dtype and one K. In a decoder these are the attention's q/k/v projections and the
MLP's gate/up projections; ``o_proj``, ``down_proj`` and the ``lm_head`` read their own inputs and
are never grouped. Per member, an ``Add`` of a constant 1-D bias ``[N_i]`` that is the MatMul's only
reader is taken along (members without a bias get zeros when another member has one).

Result per group::

    MatMul(A, concat(W_1..W_n, axis=1)) [-> Add(concat(b_1..b_n))] -> Split(axis=-1, split=[N_1..N_n])

whose outputs keep the names of the original outputs (the Add's where a bias was taken, else the
MatMul's), so every reader is untouched. ``Split`` and ``MatMul`` are standard ops: the packed graph
runs wherever the unpacked one does (onnxruntime-web included). The packed weight is written once;
the originals are removed when nothing else reads them.

Why: one kernel launch instead of two or three per group (on onnxruntime CPU a MatMulNBits call at
decode has a fixed cost of thread-pool dispatch and activation quantization), the shape the
onnxruntime-genai builder writes for q/k/v.

Guarantee and tolerance: each output column is the same dot product as before, so outputs equal the
unpacked graph up to float accumulation order (tests assert 1e-5 relative). ``matmul-nbits`` and
``matmul-int8`` quantize per output column (per block along K / per channel), so running them after
this pass gives **byte-identical** packed weights and scales to quantizing the members one by one and
concatenating: packing commutes with quantization. Run it before ``matmul-nbits`` / ``matmul-int8``
/ ``fp16``, after the ``fuse-*`` passes (they match the separate projections).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from passes._graph import ONNX_DOMAINS, Graph, subgraph_reads
_FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16}


@dataclass
class PackMatMulOptions:
    max_members: int = option(3, "largest group packed together (2: gate/up and pairs only; 3: q/k/v too)")
    min_k: int = option(0, "leave groups whose K (input features) is below this alone")


@dataclass
class _Member:
    index: int
    node: onnx.NodeProto
    weight: str
    n: int
    bias_add: onnx.NodeProto | None = None
    bias: str | None = None

    @property
    def out(self) -> str:
        return self.bias_add.output[0] if self.bias_add is not None else self.node.output[0]


class PackMatMulPass(GraphPass):
    """Pack MatMuls that share their input into one MatMul followed by a Split."""

    name = "pack-matmul"
    Options = PackMatMulOptions
    tolerance = Tolerance("relative", 1e-5, "the unpacked graph",
                          "float summation order only; quantizing afterwards gives byte-identical weights to "
                          "quantizing each member")
    mutates_input = True

    def validate_options(self) -> None:
        o = self.options
        if isinstance(o.max_members, bool) or not isinstance(o.max_members, int) or o.max_members < 2:
            raise GraphkitError(f"pack-matmul: max_members must be an integer >= 2, got {o.max_members!r}")
        if isinstance(o.min_k, bool) or not isinstance(o.min_k, int) or o.min_k < 0:
            raise GraphkitError(f"pack-matmul: min_k must be an integer >= 0, got {o.min_k!r}")

    # ------------------------------------------------------------------ analysis
    def _plan(self, model: onnx.ModelProto) -> list[list[_Member]]:
        g = model.graph
        G = Graph(model, with_info=False)
        inits = G.inits

        def weight(name: str) -> TensorProto | None:
            t = G.initializer(name)
            if t is None or len(t.dims) != 2 or t.data_type not in _FLOAT:
                return None
            return t

        by_input: dict[str, list[_Member]] = {}
        for i, n in enumerate(g.node):
            if n.op_type != "MatMul" or n.domain not in ONNX_DOMAINS or len(n.input) != 2:
                continue
            w = weight(n.input[1])
            if w is None or w.dims[0] < self.options.min_k or w.dims[0] == 0 or w.dims[1] == 0:
                continue
            m = _Member(i, n, n.input[1], int(w.dims[1]))
            out = n.output[0]
            rs = G.users(out)
            if len(rs) == 1 and out not in G.graph_outputs and out not in G.subgraph_reads:
                add = rs[0]
                if add.op_type == "Add" and add.domain in ONNX_DOMAINS and len(add.input) == 2 \
                        and list(add.input).count(out) == 1:
                    other = add.input[1] if add.input[0] == out else add.input[0]
                    b = G.initializer(other)
                    if b is not None and list(b.dims) == [m.n] \
                            and b.data_type == w.data_type:
                        m.bias_add, m.bias = add, other
            by_input.setdefault(n.input[0], []).append(m)

        groups = []
        for members in by_input.values():
            # one group per (K, dtype); members in graph order
            buckets: dict[tuple[int, int], list[_Member]] = {}
            for m in members:
                t = inits[m.weight]
                buckets.setdefault((int(t.dims[0]), t.data_type), []).append(m)
            for ms in buckets.values():
                if len({m.weight for m in ms}) != len(ms):
                    continue  # the same weight read twice: nothing to gain
                for k in range(0, len(ms) - 1, self.options.max_members):
                    chunk = ms[k:k + self.options.max_members]
                    if len(chunk) >= 2:
                        groups.append(chunk)
        return groups

    # ------------------------------------------------------------------ contract
    def match(self, model: onnx.ModelProto):
        groups = self._plan(model)
        if not groups:
            raise PassNotApplicable("no two MatMuls with constant 2-D weights read the same input")
        return groups

    def rewrite(self, model: onnx.ModelProto, plan) -> PassResult:
        groups = plan
        g = model.graph
        G = Graph(model, with_info=False)
        inits, fresh = G.inits, G.fresh_name

        at: dict[int, list[onnx.NodeProto]] = {}
        drop: set[int] = set()
        new_inits: list[TensorProto] = []
        old_weights: set[str] = set()
        created: list[str] = []
        index = {id(n): i for i, n in enumerate(g.node)}
        opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 13)
        report = []
        for ms in groups:
            first = ms[0].node
            base = (first.name or first.output[0]) + "_packed"
            ws = [tensors.array(inits[m.weight]) for m in ms]
            wname = fresh(f"{base}_weight")
            new_inits.append(tensors.new_tensor(np.ascontiguousarray(np.concatenate(ws, axis=1)), wname))
            dtype = ws[0].dtype
            del ws  # one group's weights in memory at a time (spilled to disk inside tensors.spill_to)
            old_weights.update(m.weight for m in ms)
            nodes = []
            mm_out = fresh(f"{base}_out")
            nodes.append(helper.make_node("MatMul", [first.input[0], wname], [mm_out], name=fresh(base)))
            split_in = mm_out
            if any(m.bias is not None for m in ms):
                bs = [tensors.array(inits[m.bias]).astype(dtype, copy=False) if m.bias is not None
                      else np.zeros(m.n, dtype) for m in ms]
                bname = fresh(f"{base}_bias")
                new_inits.append(numpy_helper.from_array(np.concatenate(bs), bname))
                old_weights.update(m.bias for m in ms if m.bias is not None)
                split_in = fresh(f"{base}_biased")
                nodes.append(helper.make_node("Add", [mm_out, bname], [split_in], name=fresh(f"{base}_add")))
            if opset >= 13:  # split sizes as an input from opset 13 on, an attribute before
                sizes = fresh(f"{base}_split_sizes")
                new_inits.append(numpy_helper.from_array(np.array([m.n for m in ms], np.int64), sizes))
                nodes.append(helper.make_node("Split", [split_in, sizes], [m.out for m in ms],
                                              name=fresh(f"{base}_split"), axis=-1))
            else:
                nodes.append(helper.make_node("Split", [split_in], [m.out for m in ms], name=fresh(f"{base}_split"),
                                              axis=-1, split=[m.n for m in ms]))
            created.extend(n.name for n in nodes)
            # the new nodes go where the group's first MatMul was: A exists there, readers come later
            # (every member's output, and the bias Adds' outputs, are read only after their producer)
            pos = min(m.index for m in ms)
            at[pos] = nodes
            for m in ms:
                drop.add(m.index)
                if m.bias_add is not None:
                    drop.add(index[id(m.bias_add)])
            report.append(f"{'+'.join(str(m.n) for m in ms)}")
        new_nodes = []
        for i, n in enumerate(g.node):
            if i in at:
                new_nodes.extend(at[i])
            if i not in drop:
                new_nodes.append(n)
        del g.node[:]
        g.node.extend(new_nodes)
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output} | subgraph_reads(g)
        kept = [t for t in g.initializer if t.name in used or t.name not in old_weights]
        removed = [t.name for t in g.initializer if t.name not in used and t.name in old_weights]
        del g.initializer[:]
        g.initializer.extend(kept + new_inits)
        produced = {x for n in g.node for x in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
        for i in reversed(range(len(g.value_info))):
            if g.value_info[i].name not in produced:
                del g.value_info[i]
        _toposort_check(g)
        shapes: dict[str, int] = {}
        for r in report:
            shapes[r] = shapes.get(r, 0) + 1
        return PassResult(model, True,
                          f"{len(groups)} groups packed ({', '.join(f'{c}x [{s}]' for s, c in shapes.items())}); "
                          f"MatMuls {sum(len(ms) for ms in groups)} -> {len(groups)}",
                          {"groups": len(groups), "shapes": shapes, "removed": removed}, created=set(created))

    def postconditions(self, result: PassResult) -> None:
        g = result.model.graph
        available = ({i.name for i in g.input} | {t.name for t in g.initializer}
                     | {o for n in g.node for o in n.output if o})
        missing = [x for n in g.node for x in n.input if x and x not in available and x not in subgraph_reads(g)]
        if missing:
            raise PostconditionError(f"pack-matmul: the rewrite left reads of removed tensors: {sorted(set(missing))[:5]}")
        names = {n.name for n in g.node}
        lost = [c for c in result.created if c not in names]
        if lost:
            raise PostconditionError(f"pack-matmul: {len(lost)} packed node(s) missing from the result")


def _toposort_check(g: onnx.GraphProto) -> None:
    """Every node reads only tensors produced before it (the splice keeps order; assert it)."""
    seen = {i.name for i in g.input} | {t.name for t in g.initializer} | subgraph_reads(g) | {""}
    for n in g.node:
        for x in n.input:
            if x not in seen:
                raise PostconditionError(f"pack-matmul: node '{n.name}' reads '{x}' before it is produced")
        seen.update(n.output)
