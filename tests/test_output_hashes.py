"""The safety net: `graphkit convert` of the shipped example writes byte-identical files (sha256), plain and
with `--fuse`, to those recorded in golden/convert_sha256.json.

A refactor must keep them. A change meant to change an output regenerates the hashes in its own commit, with
the reason in the message: ``PYTHONPATH=$PWD .venv/bin/python golden/make_hashes.py``.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("make_hashes", ROOT / "golden" / "make_hashes.py")
make_hashes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_hashes)

EXPECTED = json.loads(make_hashes.HASHES.read_text(encoding="utf-8"))["variants"]


def _check(variant: str, folder) -> None:
    diff = make_hashes.compare(EXPECTED[variant], make_hashes.folder_hashes(folder))
    assert not diff, (f"`convert{' --' + variant if variant != 'default' else ''}` output differs from "
                      f"golden/convert_sha256.json:\n  " + "\n  ".join(diff) +
                      f"\nIf the change is intended, regenerate in its own commit: {make_hashes.REGENERATE}")


@pytest.mark.slow
def test_convert_outputs_byte_identical(converted):
    folder, _ = converted
    _check("default", folder)


@pytest.mark.slow
def test_convert_fuse_outputs_byte_identical(fused):
    _check("fuse", fused)


def test_compare_names_each_difference():
    """The comparison itself can fail: a changed, a missing and a new file are each reported."""
    lines = make_hashes.compare({"a": "0" * 64, "b": "1" * 64}, {"a": "2" * 64, "c": "3" * 64})
    assert [line.split(":")[0] for line in lines] == ["a", "b", "c"]
