"""Installable as a library: the package WITHOUT the [export] extra, in a fresh venv, runs the graph commands
(inspect, apply, diff, bench, passes) on an ONNX file, and names the extra when a command needs it.

The venv lives under tmp (never the shared .venv); pip takes the pinned versions from constraints.txt (its
wheel cache makes this ~30 s)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_inspect_diff_bench import save, toy_decoder

ROOT = Path(__file__).resolve().parents[1]
# the fresh venv must see only what was installed into it (not this checkout through PYTHONPATH)
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def test_pyproject_ranges_and_extra():
    """Ranges with the tested versions as lower bounds, no cap below what the deps support, the heavy
    packages only in [export], and every exact pin of constraints.txt inside its range."""
    import tomllib

    from packaging.requirements import Requirement
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] != "graphkit"  # taken on PyPI by an unrelated project
    assert meta["requires-python"] == ">=3.11"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[name.lower().replace("_", "-")] = ver
    core = [Requirement(r) for r in meta["dependencies"]]
    export = [Requirement(r) for r in meta["optional-dependencies"]["export"]]
    assert {r.name for r in core}.isdisjoint({"torch", "transformers", "peft", "onnxscript", "safetensors"})
    assert {"torch", "transformers", "peft"} <= {r.name for r in export}
    for r in core + export:
        assert any(s.operator == ">=" for s in r.specifier), f"{r}: needs a tested lower bound"
        assert not any(s.operator == "==" for s in r.specifier), f"{r}: exact pins belong in constraints.txt"
        lower = next(s.version for s in r.specifier if s.operator == ">=")
        assert pins[r.name] == lower, f"{r.name}: constraints.txt pins {pins[r.name]}, the range starts at {lower}"
        assert r.specifier.contains(pins[r.name], prereleases=True)


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    """A fresh venv with graphkit installed from a copy of this tree, no extras, versions from constraints.txt."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / f, src / f)
    for d in ("graphkit", "passes"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          "-c", str(src / "constraints.txt"), str(src)], capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return venv


def _gk(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "graphkit"), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=ENV)


@pytest.mark.slow
def test_graph_commands_without_torch(light_venv, tmp_path):
    py = str(light_venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None "
                            "for m in ('torch', 'transformers', 'peft', 'onnxscript', 'graphkit', 'onnxruntime')}))"],
                           capture_output=True, text=True, cwd=tmp_path, check=True, env=ENV)
    found = json.loads(probe.stdout)
    assert found == {"torch": False, "transformers": False, "peft": False, "onnxscript": False,
                     "graphkit": True, "onnxruntime": True}, found
    # the installed copy, not this checkout
    where = subprocess.run([py, "-c", "import graphkit; print(graphkit.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, check=True, env=ENV).stdout
    assert str(light_venv) in where

    model = save(toy_decoder(), tmp_path / "toy" / "model.onnx")
    res = _gk(light_venv, "inspect", str(model), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ops"]
    q4 = tmp_path / "q4" / "model.onnx"
    res = _gk(light_venv, "apply", str(model), "-o", str(q4), "--passes", "kv-rename,matmul-nbits(bits=4,block_size=16)", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [p["name"].split("(")[0] for p in json.loads(res.stdout)["passes"]] == ["kv-rename", "matmul-nbits"]
    res = _gk(light_venv, "diff", str(model), str(q4), "--run", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["ops"]["com.microsoft::MatMulNBits"]["b"] == 9
    assert d["run"]["top1_agreement"] > 0.5 and not d["run"].get("error")
    res = _gk(light_venv, "bench", str(q4), "--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["models"][0]["decode_ms_per_token"] > 0
    assert _gk(light_venv, "passes", cwd=tmp_path).returncode == 0

    # a command that needs the extra: one line naming it, exit 2, no traceback
    res = _gk(light_venv, "convert", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "graphkit convert" in lines[0] and "[export]" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
