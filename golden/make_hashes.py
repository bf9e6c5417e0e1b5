#!/usr/bin/env python3
"""Record the sha256 of every file `graphkit convert` writes for the shipped example (the safety net).

Two conversions, each of the shipped base + adapter with the default dtypes: plain (`convert`) and
`--fuse --no-logits-to-keep` (every fusion alone, as tests/conftest.py's `fused` fixture).
The result, `golden/convert_sha256.json`, is what `tests/test_output_hashes.py` compares every conversion
against: a refactor must leave these files byte-identical. A change that is meant to change an output (a new
default quantizer, a new export input, ...) regenerates the file in its own commit and says why:

    PYTHONPATH=$PWD .venv/bin/python golden/make_hashes.py          # rewrite golden/convert_sha256.json
    PYTHONPATH=$PWD .venv/bin/python golden/make_hashes.py --check  # compare only (exit 1 on a difference)

Deterministic (seeded export, numpy quantizers); about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HASHES = ROOT / "golden" / "convert_sha256.json"
# variant name → the extra `graphkit convert` arguments that make it (the shipped example, default dtypes).
VARIANTS: dict[str, list[str]] = {"default": [], "fuse": ["--fuse", "--no-logits-to-keep"]}
# the output folder's name per variant, as the test fixtures name it (tests/conftest.py): USAGE.md names it
FOLDER_NAMES: dict[str, str] = {"default": "epicrisis-tiny", "fuse": "epicrisis-fused"}
REGENERATE = "PYTHONPATH=$PWD .venv/bin/python golden/make_hashes.py"


def folder_hashes(folder: Path) -> dict[str, str]:
    """{path relative to folder (posix): sha256 hex} for every file below ``folder``."""
    out = {}
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        out[f.relative_to(folder).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def compare(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """One line per file that is missing, new or different; empty when the folders are byte-identical."""
    lines = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            lines.append(f"{name}: missing (expected {expected[name][:12]})")
        elif name not in expected:
            lines.append(f"{name}: new file (sha256 {actual[name][:12]})")
        elif expected[name] != actual[name]:
            lines.append(f"{name}: sha256 {actual[name][:12]}, expected {expected[name][:12]}")
    return lines


def convert_variant(args: list[str], out: Path) -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", *args, "--output", str(out), "--json",
                          "--no-agreement"], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"graphkit convert {' '.join(args)} failed:\n{res.stderr}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with golden/convert_sha256.json, write nothing")
    args = ap.parse_args()
    actual = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            print(f"convert {' '.join(extra) or '(default)'} ...", flush=True)
            actual[name] = folder_hashes(convert_variant(extra, Path(tmp) / name / FOLDER_NAMES[name]))
    if args.check:
        expected = json.loads(HASHES.read_text(encoding="utf-8"))["variants"]
        bad = [f"{n}/{line}" for n in VARIANTS for line in compare(expected.get(n, {}), actual[n])]
        print("\n".join(bad) or "all files byte-identical")
        return 1 if bad else 0
    HASHES.write_text(json.dumps({"regenerate": REGENERATE, "variants": actual}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {HASHES.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
