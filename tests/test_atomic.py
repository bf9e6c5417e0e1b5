"""Atomic output: a failure, a full disk or Ctrl-C leaves the previous output or nothing, never a part.

(a) a pass that fails mid-pipeline (GraphkitError or a plain bug) and a write that fails half-way;
(b) a full disk: a 256 KB tmpfs (we run as root in CI; skipped where mounting is not permitted) and,
    everywhere, RLIMIT_FSIZE (writes past the limit fail with EFBIG);
(c) Ctrl-C (SIGINT) while `apply` / `convert` are writing: exit status 130 and no partial output;
(d) `convert` into a non-empty folder without --overwrite: exit 2 and the folder untouched.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graphkit.cli import app
from graphkit.errors import GraphkitError
from graphkit.modelio import load_model, save_model
from tiny_decoder import build_tiny_model, matmul_model

ENV = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb", PYTHONDONTWRITEBYTECODE="1",
           HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "graphkit-tmp" in p.name)


def _cli(args: list, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, stdin=subprocess.DEVNULL, **kw)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1, lines[-5:]
    return lines[-1]


@pytest.fixture()
def previous_output(tmp_path) -> Path:
    """An input model and a previous complete output pair (o.onnx + o.onnx_data) from an earlier run."""
    save_model(matmul_model(seed=1), tmp_path / "in" / "m.onnx")
    save_model(matmul_model(seed=2), tmp_path / "out" / "o.onnx", external_data=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["o.onnx", "o.onnx_data"]
    return tmp_path


# ------------------------------------------------------------------------------------------ (a) failures


def test_failing_pass_mid_pipeline_leaves_previous_output(previous_output, monkeypatch):
    from passes.fp16 import Fp16Pass

    def broken(self, model):
        raise GraphkitError("fp16: simulated failure in the second pass")
    monkeypatch.setattr(Fp16Pass, "call", broken)
    out = previous_output / "out"
    before = snapshot(out)
    res = CliRunner().invoke(app, ["apply", str(previous_output / "in" / "m.onnx"), "-o", str(out / "o.onnx"),
                                   "-p", "matmul-nbits(bits=4,block_size=16),fp16"])
    assert res.exit_code == 2, res.output
    assert "simulated failure" in res.output
    assert snapshot(out) == before and not leftovers(out)


def test_crashing_pass_leaves_previous_output(previous_output, monkeypatch):
    """A bug (not a GraphkitError) in a pass: the output is still untouched and no temp file remains."""
    from passes.fp16 import Fp16Pass

    def crash(self, model):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(Fp16Pass, "call", crash)
    out = previous_output / "out"
    before = snapshot(out)
    res = CliRunner().invoke(app, ["apply", str(previous_output / "in" / "m.onnx"), "-o", str(out / "o.onnx"),
                                   "-p", "matmul-int8,fp16"])
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert snapshot(out) == before and not leftovers(out)


@pytest.mark.parametrize("external", [False, True])
def test_write_failing_half_way_leaves_previous_output(previous_output, monkeypatch, external):
    """The data file is half written when the disk fails: the temp folder goes, the old pair stays."""
    import graphkit.modelio as mio
    real_open = open

    class HalfFile:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return HalfFile(fh) if "w" in mode and ".graphkit-tmp-" in str(path) else fh
    monkeypatch.setattr(mio, "open", fake_open, raising=False)
    out = previous_output / "out"
    before = snapshot(out)
    with pytest.raises(GraphkitError, match="No space left on device; nothing was left at the output path"):
        save_model(load_model(previous_output / "in" / "m.onnx"), out / "o.onnx", external_data=external)
    assert snapshot(out) == before and not leftovers(out)


def test_failing_move_leaves_nothing(previous_output, monkeypatch):
    """The final rename of o.onnx fails after the data file was moved: the moved data goes too (it used
    to stay behind although the error says 'nothing was left at the output path')."""
    import graphkit.modelio as mio
    real_replace = os.replace

    def flaky_replace(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)
    monkeypatch.setattr(mio.os, "replace", flaky_replace)
    out = previous_output / "out"
    with pytest.raises(GraphkitError, match="nothing was left at the output path"):
        save_model(load_model(previous_output / "in" / "m.onnx"), out / "o.onnx", external_data=True)
    assert sorted(p.name for p in out.iterdir()) == []


# ------------------------------------------------------------------------------------------ (b) full disk


@pytest.fixture()
def tiny_fs(tmp_path):
    """A 256 KB tmpfs, unmounted afterwards; skipped where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"mount not permitted here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _big_input(tmp_path: Path) -> Path:
    # 1024 x 512 float32 = 2 MB; as fp16 1 MB: far beyond 256 KB
    return save_model(matmul_model(1024, 512, seed=3), tmp_path / "in" / "big.onnx")[0]


def _check_disk_full(res, out: Path, before: dict, reason: str) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    line = _one_error_line(res.stderr)
    assert "o.onnx" in line and reason in line and "nothing was left" in line, line
    after = snapshot(out)
    # the previous output is intact or gone as a whole; nothing of the new one, no temp folder
    assert after == before or not after, sorted(after)
    assert not leftovers(out), leftovers(out)
    return line


@pytest.mark.parametrize("external", ["--no-external-data", "--external-data"])
@pytest.mark.parametrize("previous", [False, True])
def test_full_disk_tmpfs(tiny_fs, tmp_path, external, previous):
    src = _big_input(tmp_path)
    if previous:
        save_model(matmul_model(seed=4), tiny_fs / "o.onnx", external_data=external == "--external-data")
    before = snapshot(tiny_fs)
    res = _cli(["apply", src, "-o", tiny_fs / "o.onnx", "-p", "fp16", external])
    _check_disk_full(res, tiny_fs, before, "No space left on device")
    if previous:
        load_model(tiny_fs / "o.onnx")  # still a complete, loadable model


def _limit_file_size(limit: int):
    def apply_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply_limit


@pytest.mark.parametrize("external", ["--no-external-data", "--external-data"])
def test_full_disk_rlimit_fsize(previous_output, tmp_path, external):
    """Runs everywhere: RLIMIT_FSIZE makes every write past 256 KB fail (EFBIG, 'File too large')."""
    src = _big_input(tmp_path)
    out = previous_output / "out"
    before = snapshot(out)
    res = _cli(["apply", src, "-o", out / "o.onnx", "-p", "fp16", external], preexec_fn=_limit_file_size(256 * 1024))
    _check_disk_full(res, out, before, "File too large")
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------ (c) Ctrl-C

HOOK = """
import sys, time
import graphkit.modelio as mio
sentinel = sys.argv[1]
real_write = mio._write
def slow_write(*args, **kwargs):
    files = real_write(*args, **kwargs)        # the temp files are complete, nothing is moved yet
    open(sentinel, "w").close()                # tell the test: writing has started
    time.sleep(120)                            # the test sends SIGINT during this
    return files
mio._write = slow_write
sys.argv = ["graphkit"] + sys.argv[2:]
from graphkit.cli import main
main()
"""


def _interrupt_while_writing(sentinel: Path, args: list, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run graphkit with the slow-write hook, send SIGINT once a model file is written, return the result."""
    proc = subprocess.Popen([sys.executable, "-c", HOOK, str(sentinel), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not sentinel.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"finished (rc {proc.returncode}) before writing: {err[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("never started writing")
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("external", ["--no-external-data", "--external-data"])
def test_ctrl_c_during_apply(previous_output, external):
    out = previous_output / "out"
    before = snapshot(out)
    res = _interrupt_while_writing(previous_output / "writing", ["apply", previous_output / "in" / "m.onnx", "-o",
                                                                 out / "o.onnx", "-p", "fp16", external])
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert snapshot(out) == before and not leftovers(out)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = build_tiny_model(tmp_path_factory.mktemp("atomic-hf") / "tiny")
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return folder


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_during_convert(hf_folder, tmp_path, existing):
    """SIGINT once convert wrote its first ONNX file: no output folder (or the old one, unchanged) and
    no temp folder beside it."""
    out = tmp_path / "conv"
    if existing:
        (out / "onnx").mkdir(parents=True)
        (out / "onnx" / "model.onnx").write_bytes(b"previous run")
        (out / "config.json").write_text("{}")
    before = snapshot(out) if existing else None
    args = ["convert", hf_folder, "-o", out, "--dtypes", "fp32", "--exporter", "torchscript"]
    res = _interrupt_while_writing(tmp_path / "writing", args + (["--overwrite"] if existing else []))
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["conv", "writing"] if existing else ["writing"]), names
    if existing:
        assert snapshot(out) == before


# ------------------------------------------------------------------------------------------ (d) convert refuses


def test_convert_into_non_empty_folder_without_overwrite(hf_folder, tmp_path):
    out = tmp_path / "conv"
    (out / "onnx").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "onnx" / "model.onnx").write_bytes(b"someone else's model")
    before = snapshot(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    res = _cli(["convert", hf_folder, "-o", out, "--dtypes", "fp32", "--exporter", "torchscript"])
    assert res.returncode == 2, res.stdout + res.stderr
    line = _one_error_line(res.stderr)
    assert str(out) in line and "--overwrite" in line, line
    assert snapshot(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no temp folder beside it
