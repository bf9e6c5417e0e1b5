"""Shared terminal output: rich on stderr for people, JSON on stdout for scripts."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console, Group
from rich.table import Table


def fit_table(table: Table, width: int, measure) -> Table | Group:
    """A table that fits ``width`` columns without cutting cells short ("dty…", "4.71 …").

    If its natural width fits, the table itself. Otherwise its columns are split into several tables that
    each repeat the first (key) column, packed greedily in order; a part that is still too wide (one very
    long cell) gets its columns folded (wrapped, never truncated with an ellipsis). ``measure``: the
    console's measure function (natural width = ``measure(t).maximum``)."""
    if measure(table).maximum <= width or len(table.columns) < 2:
        return _folded(table) if measure(table).maximum > width else table
    key, rest = table.columns[0], table.columns[1:]
    groups: list[list] = [[]]
    for col in rest:
        trial = _part(table, [key, *groups[-1], col], first=len(groups) == 1)
        if groups[-1] and measure(trial).maximum > width:
            groups.append([col])
        else:
            groups[-1].append(col)
    parts = []
    for i, cols in enumerate(groups):
        part = _part(table, [key, *cols], first=i == 0)
        parts.append(_folded(part) if measure(part).maximum > width else part)
    return Group(*parts)


def _part(table: Table, columns: list, first: bool) -> Table:
    """A shallow copy of ``table`` with only ``columns`` (cells shared); the title only on the first part."""
    import copy
    part = copy.copy(table)
    part.columns = [copy.copy(c) for c in columns]
    if not first:
        part.title = None
    return part


def _folded(table: Table) -> Table:
    part = _part(table, table.columns, first=True)
    for c in part.columns:
        c.no_wrap, c.overflow = False, "fold"
    return part


class FittingConsole(Console):
    """A rich Console whose tables always fit its width (80 columns when output is not a terminal, or
    $COLUMNS): too-wide tables are printed as several narrower ones instead of truncated cells."""

    def print(self, *objects, **kwargs) -> None:  # type: ignore[override]
        wide = self.options.update(width=100_000, max_width=100_000)  # a table's measure is capped at the width given

        def natural(t: Table):
            return self.measure(t, options=wide)
        objects = tuple(fit_table(o, self.width, natural) if isinstance(o, Table) else o for o in objects)
        super().print(*objects, **kwargs)


def _width(stream) -> int | None:
    """80 columns when the stream is not a terminal (CI logs, pipes, files) and $COLUMNS is unset; None lets
    rich ask the terminal (rich alone would take the size of a terminal on stdin even when stdout is piped)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return None
    try:
        return None if stream.isatty() else 80
    except (AttributeError, ValueError):
        return 80


err = FittingConsole(stderr=True, highlight=False, width=_width(sys.stderr))
out = FittingConsole(highlight=False, width=_width(sys.stdout))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"
