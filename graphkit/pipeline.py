"""Parse a pass spec and run passes in order, checking the graph after each one.

Spec grammar: ``name[(key=value, ...)]`` separated by commas, e.g.
``"kv-rename,matmul-nbits(bits=4,block_size=32),fp16"``. List options take ``a|b|c``.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from graphkit.errors import GraphkitError
from graphkit.modelio import check_model, graph_skeleton
from graphkit.passbase import GraphPass, PassResult, coerce_option, split_top_level


def registry() -> dict[str, type[GraphPass]]:
    from passes import PASSES
    return PASSES


_ITEM = re.compile(r"^([A-Za-z0-9_\-]+)\s*(?:\((.*)\))?$", re.S)


def parse_spec(spec: str) -> list[GraphPass]:
    """Build pass objects from a spec string; unknown passes/options raise GraphkitError."""
    passes = registry()
    out: list[GraphPass] = []
    for item in split_top_level(spec):
        m = _ITEM.match(item)
        if not m:
            raise GraphkitError(f"cannot parse pass {item!r}; expected name or name(key=value,...)")
        name, args = m.group(1), m.group(2)
        if name not in passes:
            raise GraphkitError(f"unknown pass '{name}'; available: {', '.join(sorted(passes))} (see `graphkit passes`)")
        cls = passes[name]
        kwargs = {}
        for kv in split_top_level(args or ""):
            if "=" not in kv:
                raise GraphkitError(f"pass '{name}': option {kv!r} must be key=value")
            key, raw = (s.strip() for s in kv.split("=", 1))
            kwargs[key] = coerce_option(cls, key, raw)
        out.append(cls(**kwargs))
    if not out:
        raise GraphkitError("empty pass spec; name at least one pass (see `graphkit passes`)")
    return out


@dataclass
class PassReport:
    name: str
    modified: bool
    summary: str
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    checked: str

    def line(self) -> str:
        mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
        state = "changed" if self.modified else "unchanged"
        return (f"{self.name:<14} {state:<9} nodes {self.nodes_before}->{self.nodes_after}  "
                f"weights {mb(self.bytes_before)}->{mb(self.bytes_after)}  {self.seconds:.2f}s  "
                f"[{self.checked}]  {self.summary}")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def initializer_bytes(model: onnx.ModelProto) -> int:
    from graphkit.tensors import nbytes
    return sum(nbytes(t) for t in model.graph.initializer)


def verify_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """onnx.checker + strict shape inference on the graph without its large weights (any size)."""
    check_model(model)
    try:
        onnx.shape_inference.infer_shapes(graph_skeleton(model), check_type=True, strict_mode=False, data_prop=False)
    except Exception as exc:
        raise GraphkitError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
    return model, "checker ok, shapes ok"


def run_passes(model: onnx.ModelProto, passes: list[GraphPass], check: bool = True,
               on_report: Callable[[PassReport], None] | None = None,
               keep_input: bool = False) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run ``passes`` in order. ``keep_input``: the caller's ``model`` must come back unchanged, so it is copied
    (once, lazily: weights on disk are not read) before the first pass that declares ``mutates_input``; passes
    that return a new model need no copy."""
    reports = []
    owned = not keep_input
    for p in passes:
        if not owned and p.mutates_input:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model, owned = copy, True
        nb, bb = len(model.graph.node), initializer_bytes(model)
        t0 = time.perf_counter()
        result: PassResult = p(model)
        owned = owned or result.model is not model
        model = result.model
        checked = "not checked"
        if check and result.modified:
            model, checked = verify_graph(model)
        elif not result.modified:
            checked = "unchanged"
        rep = PassReport(p.describe(), result.modified, result.summary, nb, len(model.graph.node), bb,
                         initializer_bytes(model), time.perf_counter() - t0, checked)
        reports.append(rep)
        if on_report:
            on_report(rep)
    return model, reports


class _SubPipelines:
    """What a pass that runs pipelines of its own (passes/decode_branch.py) is handed: this module's parse and run.
    Handed over rather than imported, since passes/ sits below the orchestration layer (tests/test_imports.py)."""

    @staticmethod
    def parse(spec: str) -> list[GraphPass]:
        return parse_spec(spec)

    @staticmethod
    def run(model: onnx.ModelProto, passes: list[GraphPass]) -> tuple[onnx.ModelProto, list[PassReport]]:
        return run_passes(model, passes, keep_input=True)


def _hand_over_sub_pipelines() -> None:
    from passes.decode_branch import DecodeBranchPass
    DecodeBranchPass.sub_pipelines = _SubPipelines()


_hand_over_sub_pipelines()
