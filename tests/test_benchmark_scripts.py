"""The benchmark scripts are not run in CI (they take minutes to hours), but each must at least import and
explain itself: ``--help`` exits 0, prints its usage, and starts no measurement (it writes nothing)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_every_script_is_listed():
    assert {"browser.py", "conversion.py", "decode_floor.py", "quality.py", "runtime.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_nothing(script: str, tmp_path: Path):
    env = {**os.environ, "GK_BENCH_DIR": str(tmp_path / "work"), "GK_BENCH_RESULTS": str(tmp_path / "RESULTS.md")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
    assert not (tmp_path / "RESULTS.md").exists()
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_others_cores_leave_out_processes_born_during_the_child():
    """A browser's renderer can outlive the driver (reparented) for a moment: its CPU is the measurement, not another
    agent's load. Only processes already running before the child count as others."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _common as C
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    me = os.getpid()
    before = {1: 10.0, 42: 5.0, me: 1.0}
    after = {1: 11.0, 42: 5.5, me: 9.0, 4242: 3.2}  # 4242: born during the child (its renderer), 3.2 s of CPU
    assert C.others_cores_between(before, after, wall=2.0) == pytest.approx(0.75)  # (1.0 + 0.5) / 2 s
    assert C.others_cores_between(before, {me: 9.0, 4242: 3.2}, wall=2.0) == 0.0
