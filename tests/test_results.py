"""benchmarks/RESULTS.md is readable: one section per measurement, a rerun replaces its section (the old one moves
to benchmarks/history/), and the figures the READMEs quote are in it."""
from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from conftest import ROOT

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _common():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "_common.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_results_has_one_section_per_measurement():
    text = RESULTS.read_text(encoding="utf-8")
    keys = re.findall(r"<!-- BEGIN (\S+) -->", text)
    assert keys and len(keys) == len(set(keys)), keys
    assert sorted(keys) == sorted(re.findall(r"<!-- END (\S+) -->", text))
    headings = re.findall(r"^## .+$", text, re.M)
    assert len(headings) == len(set(headings)), [h for h in headings if headings.count(h) > 1]


def test_quoted_sections_exist():
    """Every `RESULTS.md `key`` the READMEs and docs cite names a section that is there."""
    text = RESULTS.read_text(encoding="utf-8")
    keys = set(re.findall(r"<!-- BEGIN (\S+) -->", text))
    cited = set()
    for doc in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        cited |= {(doc.name, k) for k in re.findall(r"RESULTS(?:\.md)?,? (?:section )?`([\w.+-]+)`", doc.read_text())}
    assert cited, "the pattern finds the README's citations"
    missing = sorted((d, k) for d, k in cited if k not in keys and not k.endswith("-*"))
    assert not missing, missing


def test_readme_conversion_headline_matches_results():
    """The README's conversion headline quotes wall seconds and peak RSS that are in the sections it cites."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bullet = next(p for p in readme.split("\n- ") if p.startswith("**conversion"))
    text = RESULTS.read_text(encoding="utf-8")
    for key in re.findall(r"`(conversion-[\w.+-]+)`", bullet):
        assert f"<!-- BEGIN {key} -->" in text, key
    cells = set(re.findall(r"\| (\d+(?:\.\d+)?)(?: GB)? \|", text))
    figures = re.findall(r"(\d+(?:\.\d+)?) (?:s|GB)\b", bullet)
    assert figures
    for f in figures:
        places = len(f.split(".")[1]) if "." in f else 0
        assert any(round(float(c), places) == float(f) for c in cells), f"README figure {f} is not in RESULTS.md"


def test_rerun_replaces_its_section_and_keeps_history(tmp_path, monkeypatch):
    C = _common()
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(C, "RESULTS", results)
    C.write_section("conversion-tiny", "## Conversion, tiny\n\nDate: 2026-11-25.\n\n| a | 1 |")
    C.write_section("runtime-tiny", "## Runtime, tiny\n\n| b | 2 |")
    C.write_section("conversion-tiny", "## Conversion, tiny\n\nDate: 2026-12-03.\n\n| a | 3 |")
    C.write_section("runtime-tiny-other", "## Runtime, tiny\n\n| c | 4 |")
    text = results.read_text()
    assert text.count("## Conversion, tiny") == 1 and "| a | 3 |" in text and "| a | 1 |" not in text
    assert text.index("conversion-tiny") < text.index("runtime-tiny")  # replaced in place, not moved to the end
    assert "## Runtime, tiny (runtime-tiny-other)" in text  # a second measurement never repeats a heading
    history = (tmp_path / "history" / "2026-11.md").read_text()
    assert "| a | 1 |" in history and "| a | 3 |" not in history


def test_sections_are_well_formed():
    """Each section is BEGIN key, its own `## ` heading, END key, never inside or across another: a git merge of two
    branches that add sections at the same place can interleave them without a conflict (it did once)."""
    lines = RESULTS.read_text(encoding="utf-8").splitlines()
    open_key = None
    for i, line in enumerate(lines):
        begin, end = re.match(r"<!-- BEGIN (\S+) -->$", line), re.match(r"<!-- END (\S+) -->$", line)
        if begin:
            assert open_key is None, f"RESULTS.md line {i + 1}: section {begin[1]} starts inside {open_key}"
            open_key = begin[1]
            assert lines[i + 1].startswith("## "), f"RESULTS.md line {i + 2}: section {open_key} has no heading"
        elif end:
            assert end[1] == open_key, f"RESULTS.md line {i + 1}: END {end[1]} closes {open_key}"
            open_key = None
        elif line.startswith("## "):
            assert open_key and lines[i - 1] == f"<!-- BEGIN {open_key} -->", \
                f"RESULTS.md line {i + 1}: heading {line!r} is not its section's first line"
    assert open_key is None


def _sources(text: str) -> tuple[list[str], str]:
    """The RESULTS sections (backticked keys, `-*` wildcards) and docs / history files a passage cites, as one text."""
    results = RESULTS.read_text(encoding="utf-8")
    keys = re.findall(r"<!-- BEGIN (\S+) -->", results)
    cited = []
    for tok in re.findall(r"`([\w.+*-]+)`", text):
        cited += [k for k in keys if k == tok or (tok.endswith("-*") and k.startswith(tok[:-1]))]
    parts = [results[results.index(f"<!-- BEGIN {k} -->"):results.index(f"<!-- END {k} -->")] for k in cited]
    for rel in re.findall(r"\]\(((?:\.\./)?docs/[\w.-]+\.md)\)", text):
        parts.append((ROOT / rel.removeprefix("../")).read_text(encoding="utf-8"))
    for rel in re.findall(r"`?(history/[\w.-]+\.md)`?", text):
        parts.append((ROOT / "benchmarks" / rel).read_text(encoding="utf-8"))
    return cited, "\n".join(parts)


def _found(fig: str, unit: str, source: str) -> bool:
    """``fig`` as printed (its decimals, or significant digits for 1.0e-2) equals a number of ``source``: sizes
    with the same unit, ratios (×) any number (RESULTS' ratio cells carry no unit), KL in e-notation."""
    if unit == "e":
        digits = len(fig.split("e")[0].replace(".", "")) - 1
        return any(float(f"{float(v):.{digits}e}") == float(fig) for v in re.findall(r"\d+(?:\.\d+)?e-\d+", source))
    values = re.findall(rf"(\d+(?:\.\d+)?) ?{unit}\b" if unit in ("MB", "GB") else r"\d+(?:\.\d+)?", source)
    places = len(fig.split(".")[1]) if "." in fig else 0
    return any(round(float(v), places) == float(fig) for v in values)


HEADLINES = [("README.md", "**sizes, 1.5B**"), ("README.md", "**CPU decode"),
             ("benchmarks/README.md", "Memory: the anchor")]


@pytest.mark.parametrize("doc, start", HEADLINES, ids=["readme-sizes", "readme-cpu-decode", "bench-readme-memory"])
def test_headline_figures_are_in_the_results_they_cite(doc, start):
    """Every size (MB/GB), ratio (×) and KL (e-notation) figure in the passage occurs, to the digits printed, in
    the RESULTS.md sections (or docs / history files) the passage names: a rerun that changes a figure fails here
    until the README quotes the new one."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    i = text.index(start)
    passage = text[i:text.find("\n- ", i) if doc == "README.md" else text.find("\n\n", i)]
    cited, source = _sources(passage)
    assert cited, f"{doc}: the passage '{start}' names no RESULTS.md section"
    figures = [(m[1], m[3]) for m in re.finditer(r"(\d+(?:\.\d+)?)(?:–(\d+(?:\.\d+)?))? ?(GB|MB|×)", passage)]
    figures += [(m[2], m[3]) for m in re.finditer(r"(\d+(?:\.\d+)?)(?:–(\d+(?:\.\d+)?)) ?(GB|MB|×)", passage)]
    figures += [(m, "e") for m in re.findall(r"\b\d(?:\.\d+)?e-\d+\b", passage)]
    assert len(figures) >= 3, figures
    missing = [f"{f}{'' if u == 'e' else ' ' + u}" for f, u in figures if not _found(f, u, source)]
    assert not missing, f"{doc} '{start}': {missing} not in {cited} (quote RESULTS.md, never a rounded memory)"
