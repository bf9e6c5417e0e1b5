"""The contract every graph pass follows.

A pass is a small object with a ``name``, typed ``Options`` (a dataclass whose defaults are the
documented defaults), a :class:`Tolerance` (data: metric, bound, reference) saying how far it may move
the model's outputs, and ``mutates_input`` saying whether it rewrites the model it is given in place
(True) or returns a new one and leaves its input untouched (False); the pipeline relies on it.

``__call__`` matches once and rewrites from that match:

1. ``match(model)`` finds what to rewrite and returns a plan, or raises :class:`PassNotApplicable`
   with the reasons (nothing to do) or :class:`PreconditionError` (refuses the graph);
2. ``rewrite(model, plan)`` applies the plan and returns a :class:`PassResult`;
3. ``postconditions(result)`` checks the result (raise :class:`PostconditionError`).

Older passes implement ``requires(model)`` / ``call(model)`` / ``ensures(model)`` instead; the default
``match`` / ``rewrite`` / ``postconditions`` call those. ``requires`` and ``call`` stay callable on
every pass (``call`` matches by itself).

Passes operate on ``onnx.ModelProto``; ``passes/_graph.py`` is the graph layer they share.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx

from graphkit.errors import GraphkitError, PassNotApplicable


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)  # names of the nodes the rewrite made, for postconditions


@dataclass(frozen=True)
class Tolerance:
    """How far a pass may move the model's outputs, as data that `graphkit passes`, the README's table and
    tests/test_pass_contract.py read.

    ``metric``: ``exact`` (outputs bit-identical), ``max_abs`` (logits within ``bound`` absolute),
    ``relative`` (outputs within ``bound`` of the reference's scale), ``top1`` (teacher-forced top-1
    agreement with the reference at least ``bound`` on the shipped example's golden continuations);
    ``reference``: what it is measured against; ``note``: the finer guarantee the pass's own tests hold."""

    metric: str
    bound: float
    reference: str
    note: str = ""

    METRICS: ClassVar[tuple[str, ...]] = ("exact", "max_abs", "relative", "top1")

    def __post_init__(self) -> None:
        if self.metric not in self.METRICS:
            raise ValueError(f"tolerance metric {self.metric!r} is not one of {', '.join(self.METRICS)}")

    def headline(self) -> str:
        """One line, e.g. ``logits within 1e-4 of the graph before the pass``."""
        if self.metric == "exact":
            return f"exact: outputs equal {self.reference}"
        if self.metric == "max_abs":
            return f"logits within {_num(self.bound)} of {self.reference}"
        if self.metric == "relative":
            return f"outputs within {_num(self.bound)} relative of {self.reference}"
        if self.bound >= 1:
            return f"top-1 = 1.0 vs {self.reference}"
        return f"top-1 ≥ {_num(self.bound)} vs {self.reference}"

    def __str__(self) -> str:
        return self.headline() + (f"; {self.note}" if self.note else "")

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "bound": self.bound, "reference": self.reference, "note": self.note}


@dataclass
class NoOptions:
    pass


class GraphPass(ABC):
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    tolerance: ClassVar[Tolerance] = Tolerance("exact", 0.0, "the graph before the pass")
    # True: rewrites the model it is given in place; False: returns a new model, its input untouched.
    mutates_input: ClassVar[bool] = True
    # Passes that must have run before this one (the pipeline order), as a spec; "" = none.
    after: ClassVar[str] = ""

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either an Options object or keyword options, not both")
        if options is None:
            known = {f.name for f in dataclasses.fields(self.Options)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise GraphkitError(
                    f"pass '{self.name}': unknown option(s) {', '.join(unknown)}; "
                    f"valid options: {', '.join(sorted(known)) or '(none)'}"
                )
            options = self.Options(**kwargs)
        self.options = options
        self.validate_options()

    def validate_options(self) -> None:
        """Raise GraphkitError for option values outside the supported range."""

    # -- the contract: match once, rewrite from the plan, check the result --------------------------
    def match(self, model: onnx.ModelProto) -> Any:
        """The plan for ``model``; raise PassNotApplicable (with the reasons) or PreconditionError."""
        self.requires(model)
        return None

    def rewrite(self, model: onnx.ModelProto, plan: Any) -> PassResult:
        """Apply ``plan`` (from ``match`` on this same model)."""
        return self.call(model)

    def postconditions(self, result: PassResult) -> None:
        """Check a modified result; raise PostconditionError."""
        self.ensures(result.model)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        try:
            plan = self.match(model)
        except PassNotApplicable as exc:
            return PassResult(model, False, f"not applicable: {exc}")
        result = self.rewrite(model, plan)
        if result.modified:
            self.postconditions(result)
        return result

    # -- the older form, kept callable on every pass -------------------------------------------------
    def requires(self, model: onnx.ModelProto) -> None:
        """Preconditions; raise PreconditionError or PassNotApplicable."""
        if type(self).match is not GraphPass.match:
            self.match(model)

    def call(self, model: onnx.ModelProto) -> PassResult:
        """Match and rewrite without the postconditions; not applicable = an unmodified result."""
        if type(self).rewrite is GraphPass.rewrite:
            raise NotImplementedError(f"{type(self).__name__} implements neither rewrite() nor call()")
        try:
            plan = self.match(model)
        except PassNotApplicable as exc:
            return PassResult(model, False, f"not applicable: {exc}")
        return self.rewrite(model, plan)

    def ensures(self, model: onnx.ModelProto) -> None:
        """Postconditions on the result; raise PostconditionError."""

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.name}({opts})" if opts else self.name

    def spec(self) -> str:
        """The pass as pipeline spec text that parses back to this pass (``graphkit.pipeline.parse_spec``)."""
        def text(v: Any) -> str:
            if isinstance(v, (list, tuple)):
                return "|".join(text(x) for x in v)
            return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        opts = ",".join(f"{k}={text(v)}" for k, v in dataclasses.asdict(self.options).items()
                        if not (isinstance(v, (list, tuple)) and not v))  # an empty list is the default "a|b" cannot say
        return f"{self.name}({opts})" if opts else self.name

    @classmethod
    def option_specs(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type name, default, help) for each option, for `graphkit passes`."""
        hints = typing.get_type_hints(cls.Options)
        out = []
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append((f.name, _type_name(hints.get(f.name, str)), default, f.metadata.get("help", "")))
        return out


def _num(x: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04; 0.95 as is."""
    if 0 < x < 1e-3:
        mantissa, exp = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{x:g}"


def option(default: Any, help: str) -> Any:
    """A dataclass field with a help text shown by `graphkit passes`."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | None"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def split_top_level(spec: str, sep: str = ",") -> list[str]:
    """``spec`` split at each ``sep`` outside parentheses, items stripped, empty ones dropped: the pass-spec
    grammar's one splitter (passes between ``,``; a pass's options inside its parentheses; decode-branch's
    sub-pipelines between ``+``)."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise GraphkitError(f"pass spec {spec!r}: unbalanced ')'")
        if ch == sep and depth == 0:
            parts.append("".join(cur)); cur = []
        else:
            cur.append(ch)
    if depth:
        raise GraphkitError(f"pass spec {spec!r}: missing ')'")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def coerce_option(pass_cls: type[GraphPass], key: str, raw: str) -> Any:
    """Turn the text of a pass spec option into the option's declared type."""
    hints = typing.get_type_hints(pass_cls.Options)
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(pass_cls.Options)) or "(none)"
        raise GraphkitError(f"pass '{pass_cls.name}': unknown option '{key}'; valid options: {known}")
    return _coerce(hints[key], raw, f"{pass_cls.name}.{key}")


def _coerce(tp: Any, raw: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, raw, where)
            except GraphkitError as exc:
                errors.append(str(exc))
        raise GraphkitError(errors[0] if errors else f"{where}: cannot parse {raw!r}")
    if origin is typing.Literal:
        for a in args:
            if str(a).lower() == raw.lower():
                return a
        raise GraphkitError(f"{where}: {raw!r} is not one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        return [_coerce(args[0], part.strip(), where) for part in raw.split("|") if part.strip()]
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise GraphkitError(f"{where}: expected true/false, got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise GraphkitError(f"{where}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise GraphkitError(f"{where}: expected a number, got {raw!r}") from None
    return raw.strip().strip("'\"")
