"""benchmarks/RESULTS.md is readable: one section per measurement, a rerun replaces its section (the old one moves
to benchmarks/history/), and the figures the READMEs quote are in it."""
from __future__ import annotations

import importlib.util
import re
import sys

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
