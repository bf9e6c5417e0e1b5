"""``decode-branch``: one file, two graphs: a decode-step graph for sequence length 1, the prefill graph otherwise.

Runs two sub-pipelines on the same input graph (``decode`` and ``prefill``, each a pass spec whose passes are
separated by ``+``, e.g. ``decode=fuse-gqa(padding=bias)+pack-gqa+matmul-int8(activations=per-tensor,lm_head=int8)``) and
merges the two results into one ``If``::

    is_decode = Equal(Shape(input_ids, start=1, end=2), [1])
    logits, present.* = If(is_decode, then_branch = the decode result, else_branch = the prefill result)

Why (issue 18, docs/q8.md): at decode (one token per sequence) a per-tensor activation scale *is* a per-token
scale, so the DynamicQuantizeLinear form that onnxruntime fuses into DynamicQuantizeMatMul loses nothing there,
while a prefill needs the per-token form (one massive-activation token would set a shared scale for the prompt).
The default options make exactly that pair from a float graph: ``matmul-int8(activations=per-tensor)`` for decode,
``matmul-int8`` (per-token) for prefill, both with ``quantize_embedding_gather=true``.

Guarantees:

* **Exact per branch.** For an ``input_ids`` of sequence length 1 every output equals, bit for bit, what the
  ``decode`` pipeline's own graph computes on the same inputs; for any other length, what the ``prefill``
  pipeline's graph computes (both branches are those graphs' nodes unchanged; onnxruntime fuses inside If
  bodies as at top level: DynamicQuantizeMatMul in the decode branch, in onnxruntime CPU and onnxruntime-web).
  So the file's tolerance against fp32 is the sub-pipelines': with the defaults, matmul-int8's (top-1 >= 0.95
  vs the fp32 graph, mean KL < 0.01 end to end; a prefill is teacher-forced through the per-token branch).
* **Same interface.** Graph inputs and outputs are the input graph's pipelines' (the two results must agree on
  them, else the pass refuses), so Transformers.js feeds the file as any decoder.
* **Weights stored once.** Both branches read the outer graph's initializers; a tensor both results hold under
  one name is stored once after its bytes are compared equal; a name whose contents differ is renamed in the
  decode branch and stored twice (reported in the summary). With the defaults every weight is shared: the file
  is the single-form file plus one copy of the graph's nodes (0.5B shape: 505.7 vs 505.4 MB).
* Every value a branch computes is prefixed (``decode/``, ``prefill/``), so no name shadows the outer scope.

Speed, measured (docs/q8.md, RESULTS.md ``browser-0.5b-decode-branch``): not faster in Transformers.js wasm at
the Qwen2.5-0.5B shape (0.88-0.94x the anchor's q8, within noise of today's q8, erratic session.run in Chromium);
in Node the GroupQueryAttention decode branch is the fastest q8 step measured, at +0.74 GB resident in onnxruntime.
Hence opt-in, not a convert default.

Not applicable when the input already has this pass's ``If`` (a second run) or when neither sub-pipeline
changes the graph. Batches mixing lengths do not exist (one ``input_ids`` tensor, one sequence length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import onnx
from onnx import TensorProto, helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError, PreconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance, option, split_top_level
from graphkit.tjs_contract import INPUT_IDS
from passes._graph import fresh_name, rename_in_nodes, taken_names

IF_NAME = "decode_branch/If"
DECODE_PREFIX, PREFILL_PREFIX = "decode/", "prefill/"


def _same_tensor(a: TensorProto, b: TensorProto) -> bool:
    return (a.data_type == b.data_type and list(a.dims) == list(b.dims)
            and tensors.read_bytes(a) == tensors.read_bytes(b))


def _branch(model: onnx.ModelProto, prefix: str, init_map: dict[str, str], name: str) -> onnx.GraphProto:
    """``model``'s nodes as an If body: computed values prefixed, initializers read from the outer scope
    (renamed per ``init_map``), outputs the renamed graph outputs."""
    g = model.graph
    outer = {i.name for i in g.input} | {t.name for t in g.initializer}
    m = {o: prefix + o for n in g.node for o in n.output if o and o not in outer}
    m.update(init_map)
    nodes = []
    for src in g.node:
        dst = onnx.NodeProto()
        dst.CopyFrom(src)
        if dst.name:
            dst.name = prefix + dst.name
        nodes.append(dst)
    rename_in_nodes(nodes, m)
    outs = []
    for o in g.output:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(o)
        vi.name = m.get(o.name, o.name)
        outs.append(vi)
    vis = []
    for v in g.value_info:
        if v.name in m:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(v)
            vi.name = m[v.name]
            vis.append(vi)
    return helper.make_graph(nodes, name, [], outs, value_info=vis)


def merge(decode: onnx.ModelProto, prefill: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """One model: ``If(sequence length == 1, decode graph, prefill graph)``, initializers shared where equal."""
    dg, pg = decode.graph, prefill.graph
    sig = lambda vs: [(v.name, v.type.SerializeToString()) for v in vs]  # noqa: E731
    if sig(dg.input) != sig(pg.input) or [o.name for o in dg.output] != [o.name for o in pg.output]:
        raise PreconditionError("decode-branch: the decode and prefill results differ in their graph inputs or "
                                "outputs; one file cannot serve both")
    if decode.functions or prefill.functions:
        raise PreconditionError("decode-branch: model-local functions are not supported")
    p_inits = {t.name: t for t in pg.initializer}
    taken = taken_names(pg) | taken_names(dg)
    init_map: dict[str, str] = {}
    shared = renamed = shared_bytes = extra_bytes = 0
    outer_inits = list(pg.initializer)
    for t in dg.initializer:
        p = p_inits.get(t.name)
        if p is not None and _same_tensor(t, p):
            shared += 1
            shared_bytes += tensors.nbytes(t)
            continue
        new = t
        if p is not None:  # same name, other contents: keep both
            new = TensorProto()
            new.CopyFrom(t)
            new.name = fresh_name(t.name + "_decode", taken)
            taken.add(new.name)
            init_map[t.name] = new.name
            renamed += 1
        extra_bytes += tensors.nbytes(t)
        outer_inits.append(new)
    then_g = _branch(decode, DECODE_PREFIX, init_map, "decode_step")
    else_g = _branch(prefill, PREFILL_PREFIX, {}, "prefill")
    one = fresh_name("decode_branch/one", taken)
    seq, cond = fresh_name("decode_branch/seq_len", taken), fresh_name("decode_branch/is_decode", taken)
    nodes = [
        helper.make_node("Shape", [INPUT_IDS], [seq], name="decode_branch/Shape", start=1, end=2),
        helper.make_node("Equal", [seq, one], [cond], name="decode_branch/Equal"),
        helper.make_node("If", [cond], [o.name for o in pg.output], name=IF_NAME, then_branch=then_g, else_branch=else_g),
    ]
    outer_inits.append(helper.make_tensor(one, TensorProto.INT64, [1], [1]))
    graph = helper.make_graph(nodes, pg.name or "main", list(pg.input), list(pg.output), outer_inits)
    opsets: dict[str, int] = {}
    for op in list(prefill.opset_import) + list(decode.opset_import):
        opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=max(prefill.ir_version, decode.ir_version))
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(prefill, field))
    for p in prefill.metadata_props:
        model.metadata_props.add().CopyFrom(p)
    return model, {"shared_initializers": shared, "shared_bytes": shared_bytes, "renamed_initializers": renamed,
                   "decode_only_bytes": extra_bytes}


class SubPipelines(Protocol):
    """What the pass needs of the orchestration layer: parse a spec into passes, run passes on a model it keeps."""

    def parse(self, spec: str) -> list[GraphPass]: ...

    def run(self, model: onnx.ModelProto, passes: list[GraphPass]) -> tuple[onnx.ModelProto, list]: ...


class DecodeBranchPass(GraphPass):
    name = "decode-branch"
    tolerance = Tolerance("top1", 0.95, "the fp32 graph",
                          "(the defaults: matmul-int8's, prefill through the per-token branch); exact per branch: at "
                          "sequence length 1 the outputs equal the `decode` pipeline's graph's bit for bit, otherwise "
                          "the `prefill` pipeline's (tests/test_decode_branch.py)")
    mutates_input = False
    # Set by graphkit.pipeline when it is imported: passes/ never imports the orchestration layer (tests/test_imports.py),
    # and this is the one pass that runs pipelines of its own.
    sub_pipelines: ClassVar[SubPipelines | None] = None

    @dataclass
    class Options:
        decode: str = option("matmul-int8(quantize_embedding_gather=true,activations=per-tensor)",
                             "the passes for sequence length 1, '+'-separated (a pass spec with '+' for ',')")
        prefill: str = option("matmul-int8(quantize_embedding_gather=true)",
                              "the passes for every other length, '+'-separated")

    @classmethod
    def _pipelines(cls) -> SubPipelines:
        if cls.sub_pipelines is None:
            raise GraphkitError("decode-branch runs sub-pipelines through graphkit.pipeline: import graphkit.pipeline "
                                "before using the pass (graphkit's CLI, convert and parse_spec do)")
        return cls.sub_pipelines

    def validate_options(self) -> None:
        for key in ("decode", "prefill"):
            try:
                self._pipelines().parse(self._spec(getattr(self.options, key)))
            except GraphkitError as exc:
                raise GraphkitError(f"decode-branch: option {key}: {exc}") from None

    @staticmethod
    def _spec(text: str) -> str:
        # a ',' between sub-passes would end the outer option, so sub-passes are separated by '+' (outside any
        # parentheses: a sub-pass's own options keep their ',')
        return ",".join(split_top_level(text, "+"))

    def match(self, model: onnx.ModelProto):
        if any(n.op_type == "If" and n.name == IF_NAME for n in model.graph.node):
            raise PassNotApplicable("the graph already branches on the sequence length (decode-branch ran)")
        ids = next((i for i in model.graph.input if i.name == INPUT_IDS), None)
        if ids is None or len(ids.type.tensor_type.shape.dim) != 2:
            raise PreconditionError(f"decode-branch: needs a decoder with a rank-2 '{INPUT_IDS}' input")
        return None

    def rewrite(self, model: onnx.ModelProto, plan) -> PassResult:
        pipelines = self._pipelines()
        decode, d_reports = pipelines.run(model, pipelines.parse(self._spec(self.options.decode)))
        prefill, p_reports = pipelines.run(model, pipelines.parse(self._spec(self.options.prefill)))
        if not any(r.modified for r in d_reports + p_reports):
            raise_na = "; ".join(f"{r.name.split('(')[0]}: {r.summary}" for r in d_reports + p_reports)
            return PassResult(model, False, f"not applicable: neither sub-pipeline changes the graph ({raise_na})")
        merged, info = merge(decode, prefill)
        mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
        summary = (f"If(seq_len == 1): decode branch {len(decode.graph.node)} nodes, prefill branch "
                   f"{len(prefill.graph.node)} nodes; {info['shared_initializers']} initializers shared "
                   f"({mb(info['shared_bytes'])}), {info['renamed_initializers']} renamed, decode-only "
                   f"{mb(info['decode_only_bytes'])}")
        return PassResult(merged, True, summary, info, created={IF_NAME})

    def postconditions(self, result: PassResult) -> None:
        g = result.model.graph
        ifs = [n for n in g.node if n.op_type == "If" and n.name == IF_NAME]
        if len(ifs) != 1 or [o.name for o in g.output] != list(ifs[0].output):
            raise PostconditionError("decode-branch: the graph outputs must be the one If's outputs")
        outer = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
        for body in (a.g for a in ifs[0].attribute):
            local = {o for n in body.node for o in n.output}
            if local & outer:
                raise PostconditionError(f"decode-branch: branch {body.name} shadows outer names {sorted(local & outer)[:3]}")
            missing = {i for n in body.node for i in n.input if i} - local - outer
            if missing:
                raise PostconditionError(f"decode-branch: branch {body.name} reads undefined {sorted(missing)[:3]}")
