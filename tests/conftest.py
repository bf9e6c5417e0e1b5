"""Shared fixtures. Expensive artifacts (exports, conversions) are built once per session."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_decoder import TinyDecoders, build_tiny_model  # noqa: F401  (build_tiny_model: `from conftest import`)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "graphkit" / "examples" / "epicrisis-tiny"
GOLDEN = ROOT / "golden"


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> TinyDecoders:
    """``tiny_decoder(arch="qwen2", exporter="torchscript", perturb=True, **config)``: the tiny decoder exported
    once per session per arguments and shared by every test file (tests/tiny_decoder.py)."""
    return TinyDecoders(tmp_path_factory.mktemp("tiny-decoder"))


@pytest.fixture(scope="session")
def example_dir() -> Path:
    return EXAMPLE


@pytest.fixture(scope="session")
def golden() -> dict:
    """golden/prompts.json (prompts, ids, texts) and golden/reference.npz (logits), see golden/README.md."""
    meta = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))
    arrays = dict(np.load(GOLDEN / "reference.npz"))
    return {"meta": meta, "prompts": meta["prompts"], "arrays": arrays}


@pytest.fixture(scope="session")
def exported_example(tmp_path_factory) -> Path:
    """The shipped base+adapter exported once (fp32, dynamo)."""
    from graphkit.export import export_model
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    export_model(EXAMPLE / "base", out, EXAMPLE / "adapter")
    return out


@pytest.fixture(scope="session")
def exported_base(tmp_path_factory) -> Path:
    """The shipped base alone, exported once (fp32, dynamo)."""
    from graphkit.export import export_model
    out = tmp_path_factory.mktemp("export_base") / "model.onnx"
    export_model(EXAMPLE / "base", out)
    return out


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The README's main job: convert the shipped example (no MODEL_DIR = the example + adapter)."""
    out = tmp_path_factory.mktemp("conv") / "epicrisis-tiny"
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", "--output", str(out), "--json"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout)


@pytest.fixture(scope="session")
def fused(tmp_path_factory) -> Path:
    """`graphkit convert --fuse --no-logits-to-keep`: every contrib-op fusion (SimplifiedLayerNorm, GroupQueryAttention
    on packed q/k/v with its own rotary) and nothing else, so each runtime fact of GroupQueryAttention is seen alone
    (the default folder carries num_logits_to_keep; tests/test_runtimes.py probes each form in isolation)."""
    out = tmp_path_factory.mktemp("fused") / "epicrisis-fused"
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", "--fuse", "--no-logits-to-keep", "--dtypes",
                          "fp32,fp16,q4,q4f16,q8",
                          "--output", str(out), "--json", "--no-agreement"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def converted_tjs3(tmp_path_factory) -> Path:
    """`graphkit convert --target transformers.js@3`: every file also for Transformers.js 3.x (graphkit/runtimes.py)."""
    out = tmp_path_factory.mktemp("conv3") / "epicrisis-tjs3"
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", "--target", "transformers.js@3", "--output",
                          str(out), "--json", "--no-agreement"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return out


_CLIENT_MATRIX: list[tuple[str, str, str]] = []


def pytest_runtest_logreport(report):
    """Collect the Transformers.js real-client results for the summary table below."""
    if "test_tjs.py::" not in report.nodeid or "[" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if report.skipped and isinstance(report.longrepr, tuple):
            outcome = "skipped: " + report.longrepr[2].replace("Skipped: ", "")[:140]
        _CLIENT_MATRIX.append((report.nodeid.split("::")[1].split("[")[0], report.nodeid.split("[")[1].rstrip("]"), outcome))


def pytest_terminal_summary(terminalreporter):
    if not _CLIENT_MATRIX:
        return
    tr = terminalreporter
    tr.section("Transformers.js real client: tokens vs Python onnxruntime, per device and dtype")
    for test, params, outcome in _CLIENT_MATRIX:
        tr.write_line(f"{test:<40} {params:<22} {outcome}")
