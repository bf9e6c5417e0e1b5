"""The contract every graph pass follows.

A pass is a small object with a ``name``, typed ``Options`` (a dataclass whose defaults are the
documented defaults), a ``tolerance`` string saying how far it may move the model's outputs, and one
``call(model)`` that returns a :class:`PassResult`. ``requires`` checks preconditions before the
pass runs (raise :class:`PreconditionError` to refuse, :class:`PassNotApplicable` when there is
nothing to do); ``ensures`` checks postconditions afterwards. ``__call__`` runs all three.

Passes operate on ``onnx.ModelProto`` and may use onnx-graphsurgeon internally.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
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


@dataclass
class NoOptions:
    pass


class GraphPass(ABC):
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    tolerance: ClassVar[str] = "exact: outputs unchanged"

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

    def requires(self, model: onnx.ModelProto) -> None:
        """Preconditions; raise PreconditionError or PassNotApplicable."""

    @abstractmethod
    def call(self, model: onnx.ModelProto) -> PassResult:
        ...

    def ensures(self, model: onnx.ModelProto) -> None:
        """Postconditions on the result; raise PostconditionError."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        try:
            self.requires(model)
        except PassNotApplicable as exc:
            return PassResult(model, False, f"not applicable: {exc}")
        result = self.call(model)
        if result.modified:
            self.ensures(result.model)
        return result

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
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
