"""Terminal output off a TTY fits 80 columns: no table line is wider, no cell is cut short with "…" (a table too
wide is split into narrower ones that repeat its key column), and `--json` is unaffected."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from graphkit import console as gk_console
from tests.test_inspect_diff_bench import save, toy_decoder

ROOT = Path(__file__).resolve().parents[1]
BOX = set("┃│┏┗┡└┌┐┘━─")
ENV = {k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT)}.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}

SUMMARY = {
    "output": "/home/someone/projects/clinic-notes/models/exported/epicrisis-tiny-lora-r8-2026-12-03", "total_s": 58.76,
    "ok": True, "fused": False,
    "dtypes": [dict(dtype=d, file=f"onnx/{f}", ok=True, bytes=b, seconds=s, peak_rss=r, top1_vs_fp32=t, kl_vs_fp32=k,
                    passes=["x"], error=None, agreement_note=None)
               for d, f, b, s, r, t, k in [
                   ("fp32", "model.onnx", 4_960_000, 53.49, 499_351_000, None, None),
                   ("fp16", "model_fp16.onnx", 2_830_000, 0.36, 509_366_000, 1.0, 0.00001),
                   ("q4", "model_q4.onnx", 1_363_000, 0.36, 504_270_000, 0.8125, 0.09123),
                   ("q4f16", "model_q4f16.onnx", 1_268_000, 0.59, 509_090_000, 0.84375, 0.08123),
                   ("q8", "model_quantized.onnx", 1_803_000, 0.29, 509_404_000, 0.96875, 0.00081)]],
}


def _check_fits(text: str, width: int = 80) -> None:
    for line in text.splitlines():
        if set(line) & BOX:
            assert len(line) <= width, f"{len(line)} columns: {line}"
        assert "…" not in line or "more op types" in line, f"a cell was cut short: {line}"


def _capture(monkeypatch, width: int = 80, cls=gk_console.FittingConsole) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(gk_console, "out", cls(file=buf, width=width, force_terminal=False, highlight=False))
    return buf


def test_convert_summary_fits_with_the_figures_in_full(monkeypatch):
    from graphkit.convert import render
    buf = _capture(monkeypatch, cls=Console)  # plain rich: this summary is too wide and gets cut (the bug)
    render(SUMMARY)
    assert "…" in buf.getvalue()
    buf = _capture(monkeypatch)
    render(SUMMARY)
    text = buf.getvalue()
    _check_fits(text)
    first = text[text.index("┏"):text.index("┘")]  # dtype, size, top-1, KL and status stay together in the first part
    for header in ("dtype", "size", "top-1", "KL", "status"):
        assert f" {header} " in first.splitlines()[1]
    rows = {line.split("│")[1].strip(): line for line in first.splitlines() if line.startswith("│")}
    for d, size, top1, kl in [("q4", "1.30 MB", "0.812", "0.09123"), ("q8", "1.72 MB", "0.969", "0.00081"),
                              ("q4f16", "1.21 MB", "0.844", "0.08123")]:
        cells = [c.strip() for c in rows[d].split("│")[1:-1]]
        assert cells[:5] == [d, size, top1, kl, "ok"], cells
    for rest in ("model_quantized.onnx", "53.49", "485.81 MB"):  # the other columns are in a second part, whole
        assert rest in text
    # a wide terminal keeps the single table
    buf = _capture(monkeypatch, width=200)
    render(SUMMARY)
    assert buf.getvalue().count("┏") == 1


def test_verify_tables_fit(monkeypatch):
    from graphkit.verify import render, render_browser
    buf = _capture(monkeypatch)
    variant = dict(dtype="q4f16", file="onnx/model_q4f16.onnx", error=None, threshold=0.85, top1_agreement=0.98125,
                   kl_mean=0.00101, kl_max=0.0123, greedy_equal=2, first_divergence=[None, 17], nonfinite=0, passed=True)
    render({"folder": SUMMARY["output"], "reference": "model.onnx", "prompts": 2, "new_tokens": 32,
            "variants": [variant, {**variant, "dtype": "q8", "file": "onnx/model_quantized.onnx"}]})
    render_browser([{"device": "webgpu", "dtype": "q4f16", "status": "skipped",
                     "detail": "adapter has no shader-f16: " + "Program Gather requires f16 but the device does not support it " * 2}])
    text = buf.getvalue()
    _check_fits(text)
    assert "0.981" in text and "model_quantized.onnx" in text and "shader-f16" in text


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("width")
    m = save(toy_decoder(), root / "a-long-folder-name-for-the-first-model" / "model.onnx")
    q = save(toy_decoder(quant=True), root / "and-another-long-folder-name" / "model_quantized.onnx")
    folder = root / "folder"
    save(toy_decoder(quant=True), folder / "onnx" / "model_q4.onnx")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (folder / f).write_text("{}")
    return {"m": m, "q": q, "folder": folder}


@pytest.mark.parametrize("args", [
    ["inspect", "{m}"], ["inspect", "{folder}"], ["diff", "{m}", "{q}", "--run"], ["passes"],
    ["bench", "{m}", "--vs", "{q}", "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1"],
])
def test_cli_output_off_a_tty_fits_80_columns(models, args):
    argv = [a.format(**models) for a in args]
    # stdout piped; stdin a terminal or not (rich alone would size tables to a terminal on stdin)
    res = subprocess.run([sys.executable, "-m", "graphkit", *argv], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode in (0, 1), res.stderr
    assert res.stdout.strip()
    _check_fits(res.stdout)
    if args[0] == "diff":  # --json is untouched by the console: one JSON object, no layout
        js = subprocess.run([sys.executable, "-m", "graphkit", *argv, "--json"], capture_output=True, text=True, env=ENV, timeout=300)
        assert js.returncode in (0, 1), js.stderr
        assert isinstance(json.loads(js.stdout), dict) and "┃" not in js.stdout


def test_piped_stdout_fits_80_even_with_a_wide_terminal_on_stdin(models):
    """`graphkit diff A B | less` typed in a 200-column terminal: stdout is a pipe, so 80 columns (rich alone
    would take the terminal's size from stdin)."""
    import fcntl
    import pty
    import termios
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        argv = ["diff", str(models["m"]), str(models["q"]), "--run"]
        res = subprocess.run([sys.executable, "-m", "graphkit", *argv], stdin=slave, capture_output=True, text=True,
                             env=ENV, timeout=300)
    finally:
        os.close(slave)
        os.close(master)
    assert res.returncode == 0, res.stderr
    assert max(len(line) for line in res.stdout.splitlines()) > 0
    _check_fits(res.stdout)
    wide = subprocess.run([sys.executable, "-m", "graphkit", *argv], capture_output=True, text=True,
                          env={**ENV, "COLUMNS": "200"}, timeout=300)  # an explicit $COLUMNS still wins
    assert any(len(line) > 80 for line in wide.stdout.splitlines()), "this diff is wider than 80 at 200 columns"
