"""Import structure: no cycle among graphkit/ and passes/ modules, and passes/ sits between graphkit's core and its
orchestration (pipeline, convert, cli), never importing the latter.

Every import statement counts, including those inside functions (a lazy import is still a dependency).
``from pkg import name`` depends on ``pkg.name`` when that is a module, else on ``pkg``.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("graphkit", "passes")
# What a pass may use of graphkit: the core that does not know passes exist.
PASS_MAY_IMPORT = {"graphkit", "graphkit.errors", "graphkit.passbase", "graphkit.tensors", "graphkit.tjs_contract",
                   "graphkit.modelio", "graphkit.ortrun"}


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_passes_use_only_graphkit_core():
    edges = import_graph(ROOT)
    bad = sorted((m, t) for m, ts in edges.items() if m.startswith("passes") for t in ts
                 if t.startswith("graphkit") and t not in PASS_MAY_IMPORT)
    assert not bad, bad


def test_the_checker_finds_a_cycle(tmp_path):
    """The check can fail: two modules importing each other (one lazily) are reported."""
    (tmp_path / "graphkit").mkdir()
    (tmp_path / "passes").mkdir()
    (tmp_path / "graphkit" / "a.py").write_text("from graphkit.b import x\n")
    (tmp_path / "graphkit" / "b.py").write_text("def f():\n    from graphkit import a\n")
    (tmp_path / "passes" / "__init__.py").write_text("from passes import c\n")
    (tmp_path / "passes" / "c.py").write_text("from passes import d\n")
    (tmp_path / "passes" / "d.py").write_text("")
    assert cycles(import_graph(tmp_path)) == [["graphkit.a", "graphkit.b"]]
