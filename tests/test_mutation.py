"""Corrupted inputs: every command either works or says, in one line, what is wrong with which file.

Valid inputs (a MatMul ``.onnx`` saved inline and with external data, and a tiny Qwen2 safetensors
folder) are mutated at deterministic positions (bytes flipped, zeroed, truncated, appended) and fed to
``inspect``, ``apply``, ``diff``, ``export`` and ``convert --dtypes fp32``. Each run must

* exit 0 (a mutation inside weight bytes can leave a valid file), or exit 2 with exactly one
  ``error:`` line on stderr that names the mutated file (or the model file / folder that refers to
  it), and nothing after it;
* never print a traceback, never hang (timeout per call);
* never leave a partial output: after a failure the output folder is empty (no ``.onnx``, no
  ``.onnx_data``, no ``.graphkit-tmp-*``, no convert temp folder); after a success the output loads.

The counts (tried / clear errors / successes) are printed at the end of each test; set
``GRAPHKIT_MUTATION_REPORT=path.json`` to also write every outcome (docs/refusals.md is built from it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.modelio import load_model, save_model
from tiny_decoder import build_tiny_model, matmul_model

ONNX_TIMEOUT = 60
EXPORT_TIMEOUT = 240
WORKERS = 3
ENV = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb", OMP_NUM_THREADS="2",
           HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")

# ------------------------------------------------------------------------------------------ mutations

def _mutate(data: bytes, op: str, pos: int) -> bytes:
    pos = max(0, min(pos, len(data)))
    if op == "flip":
        pos = min(pos, len(data) - 1)
        return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
    if op == "zero":
        return data[:pos] + b"\0" * len(data[pos:pos + 16]) + data[pos + 16:]
    if op == "truncate":
        return data[:pos]
    if op == "append":
        return data + b"\x07graphkit-garbage\xff\x00"
    raise AssertionError(op)


def onnx_mutations(size: int) -> list[tuple[str, int]]:
    """16 mutations: protobuf header, the middle (weight bytes inline), the tail (graph I/O, opsets)."""
    q = size // 4
    return [("flip", 0), ("flip", 1), ("flip", 3), ("flip", 9), ("flip", 20), ("flip", 2 * q),
            ("flip", size - 1), ("flip", size - 12), ("zero", 0), ("zero", 8), ("zero", q), ("zero", size - 16),
            ("truncate", 0), ("truncate", 17), ("truncate", 2 * q), ("truncate", size - 1)]


def data_mutations(size: int) -> list[tuple[str, int]]:
    """6 mutations of an .onnx_data file: changed weight bytes are valid, a short file is not."""
    return [("flip", 0), ("zero", size // 2), ("append", 0), ("truncate", 0), ("truncate", size // 2),
            ("truncate", size - 1)]


def safetensors_mutations(path: Path) -> list[tuple[str, int]]:
    """Header length, JSON header (start, middle, end), data end; one flip in the weight bytes."""
    size = path.stat().st_size
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return [("flip", 0), ("flip", 5), ("zero", 8), ("flip", 8 + n // 2), ("truncate", 8 + n), ("truncate", size - 1),
            ("flip", 8 + n + (size - 8 - n) // 2)]


# ------------------------------------------------------------------------------------------ running

@dataclass
class Outcome:
    group: str
    command: str
    mutation: str
    rc: int | None
    verdict: str            # "ok" | "clear" | "BAD: why"
    error: str = ""
    seconds: float = 0.0


def _cli(args: list[str], timeout: int) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([sys.executable, "-m", "graphkit", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None


def _leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


def _judge(group: str, command: str, mutation: str, args: list[str], out_dir: Path, names: list[str],
           timeout: int, check_output) -> Outcome:
    """Run ``graphkit ARGS`` in its own interpreter and classify the result."""
    t0 = time.perf_counter()
    res = _cli(args, timeout)
    return _classify(group, command, mutation, res, round(time.perf_counter() - t0, 2), out_dir, names, timeout,
                     check_output)


def _classify(group: str, command: str, mutation: str, res: subprocess.CompletedProcess | None, seconds: float,
              out_dir: Path, names: list[str], timeout: int, check_output) -> Outcome:
    if res is None:
        return Outcome(group, command, mutation, None, f"BAD: no answer within {timeout} s (hang)", seconds=seconds)
    text = res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    err_at = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    error = lines[err_at[0]] if err_at else ""
    o = Outcome(group, command, mutation, res.returncode, "", error, seconds)
    if "Traceback (most recent call last)" in text:
        o.verdict = "BAD: traceback: " + (lines[-1] if lines else "")[:200]
    elif res.returncode == 0:
        left = _leftovers(out_dir)
        bad = [n for n in left if n.startswith(".")]
        problem = check_output() if check_output else None
        o.verdict = f"BAD: temp files left after success: {bad}" if bad else (f"BAD: {problem}" if problem else "ok")
    elif res.returncode != 2:
        o.verdict = f"BAD: exit status {res.returncode}: {(lines[-1] if lines else '')[:200]}"
    elif len(err_at) != 1 or err_at[0] != len(lines) - 1:
        o.verdict = f"BAD: expected one final 'error:' line, stderr ends with {lines[-3:]}"
    elif not any(n in error for n in names):
        o.verdict = f"BAD: error names none of {names}: {error[:200]}"
    elif _leftovers(out_dir):
        o.verdict = f"BAD: partial output left after a failure: {_leftovers(out_dir)}"
    else:
        o.verdict = "clear"
    return o


# A fork server for the ~100 cheap ONNX runs: it imports graphkit once, then runs each command in a
# forked child (its own process: real exit status, stdout/stderr files, an uncaught exception prints
# the interpreter's traceback, SIGALRM kills a hang) instead of paying ~0.4 s of imports per run.
ZYGOTE = r"""
import json, os, signal, sys, time, traceback
import graphkit.cli, graphkit.diff, graphkit.inspect, graphkit.modelio, graphkit.pipeline, passes  # no threads
from graphkit.cli import main
jobs = json.load(open(sys.argv[1]))
results = []
for job in jobs:
    sys.stdout.flush(); sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        signal.alarm(job["timeout"])
        for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        sys.argv = ["graphkit", *job["args"]]
        code = 1
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()  # exactly what the interpreter prints for an uncaught exception
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            except Exception:
                pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append([os.waitstatus_to_exitcode(status), round(time.perf_counter() - t0, 2)])
json.dump(results, open(sys.argv[2], "w"))
"""


def _run_forked(jobs: list[tuple], scratch: Path) -> list[Outcome]:
    """Run the jobs of ``_onnx_runs`` through WORKERS fork servers; SIGALRM kills a hung run (-14)."""
    scratch.mkdir(parents=True, exist_ok=True)
    specs = [{"args": [str(a) for a in job[3]], "timeout": job[6], "stdout": str(scratch / f"{i}.out"),
              "stderr": str(scratch / f"{i}.err")} for i, job in enumerate(jobs)]
    shares = [list(range(w, len(jobs), WORKERS)) for w in range(WORKERS)]
    procs = []
    for w, idx in enumerate(shares):
        (scratch / f"jobs{w}.json").write_text(json.dumps([specs[i] for i in idx]))
        procs.append(subprocess.Popen([sys.executable, "-c", ZYGOTE, str(scratch / f"jobs{w}.json"),
                                       str(scratch / f"res{w}.json")], env=ENV, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    outcomes: list[Outcome | None] = [None] * len(jobs)
    for w, (proc, idx) in enumerate(zip(procs, shares)):
        _, err = proc.communicate(timeout=sum(specs[i]["timeout"] for i in idx) + 60)
        assert proc.returncode == 0, f"fork server failed: {err[-2000:]}"
        for i, (rc, seconds) in zip(idx, json.loads((scratch / f"res{w}.json").read_text())):
            group, command, mutation, _, out_dir, names, timeout, check = jobs[i]
            res = None if rc == -signal.SIGALRM else subprocess.CompletedProcess(
                jobs[i][3], rc, Path(specs[i]["stdout"]).read_text(errors="replace"),
                Path(specs[i]["stderr"]).read_text(errors="replace"))
            outcomes[i] = _classify(group, command, mutation, res, seconds, out_dir, names, timeout, check)
    return outcomes


def _report(capsys, group: str, outcomes: list[Outcome]) -> None:
    tried = len(outcomes)
    clear = sum(o.verdict == "clear" for o in outcomes)
    ok = sum(o.verdict == "ok" for o in outcomes)
    bad = [o for o in outcomes if o.verdict.startswith("BAD")]
    line = (f"[mutation] {group}: {tried} runs on mutated inputs, {clear} clear errors (exit 2, one line), "
            f"{ok} succeeded, {len(bad)} bad; {sum(o.seconds for o in outcomes):.0f} s of runs")
    with capsys.disabled():  # the counts are part of the test's result: always show them
        print("\n" + line)
    path = os.environ.get("GRAPHKIT_MUTATION_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else []
        old = [x for x in old if x["group"] != group] + [asdict(o) for o in outcomes]
        Path(path).write_text(json.dumps(old, indent=1))
    assert not bad, "\n".join(f"{o.command} [{o.mutation}] -> {o.verdict}" for o in bad)


def _loads(path: Path):
    def check() -> str | None:
        try:
            load_model(path)
        except Exception as exc:  # noqa: BLE001 - any failure means a broken output
            return f"output {path.name} does not load after success: {exc}"
        return None
    return check


# ------------------------------------------------------------------------------------------ ONNX inputs

PASS_SPECS = ["matmul-nbits(bits=4,block_size=16)", "matmul-int8", "fp16", "matmul-nbits(bits=8,block_size=32),fp16"]


def _onnx_runs(tmp: Path, group: str, good: Path, target: Path, muts: list[tuple[str, int]],
               names_extra: list[str]) -> list[tuple]:
    """For each mutation: a copy of the model folder with ``target`` mutated; inspect / apply / diff on it."""
    jobs = []
    original = target.read_bytes()
    for i, (op, pos) in enumerate(muts):
        label = f"{target.name} {op}@{pos}"
        case = tmp / f"{group}-{i}"
        shutil.copytree(good.parent, case)
        (case / target.name).write_bytes(_mutate(original, op, pos))
        model = case / good.name
        names = [target.name, good.name] + names_extra
        out = tmp / f"{group}-{i}-out"
        out.mkdir()
        spec = PASS_SPECS[i % len(PASS_SPECS)]
        jobs += [
            (group, "inspect", label, ["inspect", model], out, names, ONNX_TIMEOUT, None),
            (group, f"apply -p {spec}", label, ["apply", model, "-o", out / "o.onnx", "-p", spec,
                                                "--external-data" if i % 2 else "--no-external-data"],
             out, names, ONNX_TIMEOUT, _loads(out / "o.onnx")),
            (group, "diff", label, ["diff", model, tmp / "reference" / "ref.onnx"], out, names, ONNX_TIMEOUT, None),
        ]
    return jobs


def _run_jobs(jobs: list[tuple]) -> list[Outcome]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda j: _judge(*j), jobs))


@pytest.fixture(scope="module")
def onnx_inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mut-onnx")
    save_model(matmul_model(bias=True), tmp / "inline" / "m.onnx", external_data=False)
    save_model(matmul_model(bias=True), tmp / "external" / "m.onnx", external_data=True)
    save_model(matmul_model(bias=True), tmp / "reference" / "ref.onnx")
    assert (tmp / "external" / "m.onnx_data").is_file()
    return tmp


def test_mutated_inline_onnx(onnx_inputs, capsys):
    good = onnx_inputs / "inline" / "m.onnx"
    jobs = _onnx_runs(onnx_inputs, "inline .onnx", good, good, onnx_mutations(good.stat().st_size), [])
    _report(capsys, "inline .onnx", _run_forked(jobs, onnx_inputs / "runs-inline"))


def test_mutated_external_data_onnx(onnx_inputs, capsys):
    good = onnx_inputs / "external" / "m.onnx"
    jobs = _onnx_runs(onnx_inputs, "external .onnx", good, good, onnx_mutations(good.stat().st_size), [])
    data = good.with_name("m.onnx_data")
    jobs += _onnx_runs(onnx_inputs, "external .onnx_data", good, data, data_mutations(data.stat().st_size), [])
    _report(capsys, "external-data .onnx / .onnx_data", _run_forked(jobs, onnx_inputs / "runs-external"))


# ------------------------------------------------------------------------------------------ safetensors inputs

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = build_tiny_model(tmp_path_factory.mktemp("mut-hf") / "tiny")
    # convert also copies tokenizer files; their content is not read for an fp32-only conversion
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return folder


def test_mutated_safetensors_folder(hf_folder, tmp_path, capsys):
    st_file = hf_folder / "model.safetensors"
    original = st_file.read_bytes()
    jobs = []
    muts = [("model.safetensors", m) for m in safetensors_mutations(st_file)]
    muts += [("config.json", ("truncate", 40)), ("config.json", ("flip", 0))]
    for i, (fname, (op, pos)) in enumerate(muts):
        case = tmp_path / f"st-{i}" / "tiny"
        shutil.copytree(hf_folder, case)
        src = original if fname == "model.safetensors" else (hf_folder / fname).read_bytes()
        (case / fname).write_bytes(_mutate(src, op, pos))
        label = f"{fname} {op}@{pos}"
        names = [fname, str(case)]
        out = tmp_path / f"st-{i}-out"
        out.mkdir()
        jobs.append(("safetensors", "export --exporter torchscript", label,
                     ["export", case, "-o", out / "m.onnx", "--exporter", "torchscript"], out, names, EXPORT_TIMEOUT,
                     _loads(out / "m.onnx")))
        if op in ("zero", "truncate") or fname == "config.json":  # convert: the fast failures only
            cout = tmp_path / f"st-{i}-conv"
            cout.mkdir()
            jobs.append(("safetensors", "convert --dtypes fp32", label,
                         ["convert", case, "-o", cout / "out", "--dtypes", "fp32", "--exporter", "torchscript"],
                         cout, names, EXPORT_TIMEOUT, _loads(cout / "out" / "onnx" / "model.onnx")))
    _report(capsys, "safetensors folder", _run_jobs(jobs))


# ------------------------------------------------------------------------------------------ error rendering

def test_error_with_bracketed_path_is_one_line(tmp_path):
    folder = tmp_path / "a[" / "x]"
    folder.mkdir(parents=True)
    res = _cli(["inspect", folder / "m.onnx"], ONNX_TIMEOUT)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-400:]
    assert "a[/x]/m.onnx" in res.stderr


def test_error_keeps_brackets_in_file_names(tmp_path):
    res = _cli(["inspect", tmp_path / "[red]m.onnx"], ONNX_TIMEOUT)
    assert res.returncode == 2
    assert "[red]m.onnx" in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------ structural corruption
# Byte-level mutations that keep the protobuf parseable but break ONNX's own invariants. Found by flipping
# every byte of the external-data .onnx in process; each is reproduced here from the proto itself.

def _save_raw(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _short_raw_data(m: onnx.ModelProto) -> None:
    m.graph.initializer[1].dims[0] = 49          # bias: 48 floats of raw data, shape [49]


def _lost_external_flag(m: onnx.ModelProto) -> None:
    t = m.graph.initializer[0]                   # weight [64, 48] with neither data nor an external reference
    t.ClearField("raw_data")


STRUCTURAL = {
    "raw data shorter than shape": (_short_raw_data, "needs"),
    "weight without data": (_lost_external_flag, "needs"),
}


@pytest.mark.parametrize("what", sorted(STRUCTURAL))
@pytest.mark.parametrize("command", ["inspect", "apply", "diff"])
def test_structurally_corrupt_onnx(tmp_path, what, command):
    mutate, needle = STRUCTURAL[what]
    m = matmul_model(bias=True)
    mutate(m)
    path = _save_raw(m, tmp_path / "in" / "bad.onnx")
    ref = save_model(matmul_model(bias=True), tmp_path / "ref" / "ref.onnx")[0]
    out = tmp_path / "out"
    out.mkdir()
    args = {"inspect": ["inspect", path], "diff": ["diff", path, ref],
            "apply": ["apply", path, "-o", out / "o.onnx", "-p", "fp16"]}[command]
    o = _judge("structural", command, what, args, out, ["bad.onnx"], ONNX_TIMEOUT, None)
    if command == "diff" and o.verdict == "ok":
        return  # diff reads no weight values: a corrupt tensor it never decodes is not its business
    assert o.verdict == "clear", o
    assert needle in o.error and "'" in o.error, o.error


def test_non_utf8_names_are_refused(tmp_path):
    """A flipped byte inside a node name: protobuf (proto2) hands the name back as bytes, which used to
    crash `inspect` (TypeError) and `apply` (UnicodeDecodeError) with a traceback."""
    data = matmul_model(bias=True).SerializeToString()
    i = data.index(b"\x12\x02mm")                # NodeProto field 2 (output) = "mm": the MatMul's output name
    data = data[:i + 2] + b"\xff\xfe" + data[i + 4:]
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    for args in (["inspect", path], ["apply", path, "-o", out / "o.onnx", "-p", "matmul-int8"]):
        o = _judge("structural", args[0], "non-UTF-8 name", args, out, ["bad.onnx"], ONNX_TIMEOUT, None)
        assert o.verdict == "clear" and "UTF-8" in o.error, o


def _add_with_one_input(tmp_path: Path) -> Path:
    m = matmul_model(bias=True)
    del m.graph.node[1].input[1]                 # Add with a single input: invalid ONNX, parseable protobuf
    return _save_raw(m, tmp_path / "bad.onnx")


def test_checker_invalid_graph_is_refused_by_apply(tmp_path):
    """`apply` checks its input before the first pass (it used to reach matmul-int8, which crashed)."""
    path = _add_with_one_input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    o = _judge("structural", "apply", "Add with one input", ["apply", path, "-o", out / "o.onnx", "-p", "matmul-int8"],
               out, ["bad.onnx"], ONNX_TIMEOUT, None)
    assert o.verdict == "clear" and "onnx.checker" in o.error, o


@pytest.mark.parametrize("spec", ["matmul-int8", "matmul-nbits", "fp16", "kv-rename"])
def test_checker_invalid_graph_with_no_check(tmp_path, spec):
    """--no-check skips the checker: the passes themselves must still not crash (matmul-int8 used to index
    add.input[1] of an Add with one input: IndexError traceback)."""
    path = _add_with_one_input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    o = _judge("structural", "apply --no-check", "Add with one input",
               ["apply", path, "-o", out / "o.onnx", "-p", spec, "--no-check"], out, ["bad.onnx"],
               ONNX_TIMEOUT, None)
    assert o.verdict in ("clear", "ok"), o


@pytest.mark.parametrize("content", ["[1, 2]", "null", "\"qwen2\"", "[" * 100_000,
                                     json.dumps({"model_type": "qwen2", "num_hidden_layers": "x"})])
def test_config_json_not_an_object(hf_folder, tmp_path, content):
    """JSON that is not an object used to crash with AttributeError; values transformers rejects are
    reported naming the folder."""
    case = tmp_path / "tiny"
    shutil.copytree(hf_folder, case)
    (case / "config.json").write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    o = _judge("structural", "export", "config.json " + content[:10], ["export", case, "-o", out / "m.onnx",
                                                                      "--exporter", "torchscript"], out,
               ["config.json", str(case)], EXPORT_TIMEOUT, None)
    assert o.verdict == "clear", o


def test_external_length_disagreeing_with_shape(onnx_inputs, tmp_path):
    m = onnx.load(str(onnx_inputs / "external" / "m.onnx"), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "length":
            e.value = str(int(e.value) - 4)
    case = tmp_path / "case"
    shutil.copytree(onnx_inputs / "external", case)
    _save_raw(m, case / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    o = _judge("structural", "inspect", "external length", ["inspect", case / "m.onnx"], out, ["m.onnx"],
               ONNX_TIMEOUT, None)
    assert o.verdict == "clear" and "does not match its shape/dtype" in o.error, o


def test_fp16_refuses_control_flow(tmp_path):
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["n"])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n"])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)],
                          "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    src = save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "if.onnx")[0]
    out = tmp_path / "out"
    out.mkdir()
    o = _judge("structural", "apply", "If node", ["apply", src, "-o", out / "o.onnx", "-p", "fp16"], out,
               ["fp16"], ONNX_TIMEOUT, None)
    assert o.verdict == "clear" and "control-flow" in o.error, o


def test_apply_report_keeps_bracketed_text(tmp_path):
    src = save_model(matmul_model(bias=True), tmp_path / "m.onnx")[0]
    res = _cli(["apply", src, "-o", tmp_path / "o.onnx", "-p", "matmul-int8"], ONNX_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert "[checker ok, shapes ok]" in res.stderr, res.stderr


@pytest.mark.parametrize("name", ["FLOAT4E2M1", "UINT4", "INT4", "UINT2", "INT2"])
def test_valid_packed_sub_byte_tensors_are_not_refused(tmp_path, name):
    """The size checks know that these types pack 2 (4-bit) or 4 (2-bit) values per byte: a valid tensor,
    inline or external, loads (FLOAT4E2M1 and 2-bit types used to be taken as one byte per value)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = getattr(TensorProto, name, None)
    np_type = getattr(ml_dtypes, {"FLOAT4E2M1": "float4_e2m1fn"}.get(name, name.lower()), None)
    if dt is None or np_type is None:
        pytest.skip(f"{name} not in this onnx / ml_dtypes")
    for count, external in ((9001, True), (33, False)):
        t = numpy_helper.from_array(np.zeros(count, dtype=np_type), "t")
        g = helper.make_graph([helper.make_node("Identity", ["t"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", dt, [count])], [t])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
        path = tmp_path / f"{name}-{count}.onnx"
        files = save_model(m, path, external_data=external)
        assert (len(files) == 2) == external
        assert list(load_model(path).graph.initializer[0].dims) == [count]
