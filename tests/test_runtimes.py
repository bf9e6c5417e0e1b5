"""The Transformers.js version matrix and the runtime facts in graphkit/runtimes.py.

* Matrix (real clients, Node): Transformers.js 3.8.1 (onnxruntime-node 1.21), the pinned 4.3.1 and the newest 4.x
  (4.3.2) each run in ONE Node process (tests/js/generate_matrix.mjs) over the folders it must run: every dtype of
  `convert --target transformers.js@3` in all three, every dtype of the default and `--fuse` folders in 4.3.2 (4.3.1
  runs those in tests/test_tjs.py). Tokens must equal Python onnxruntime's greedy loop on the same file (strict) and
  the text stay the adapter's epicrisis.
* Every entry of graphkit.runtimes.KNOWN is held to an observed failure: the same Node processes run a file with the
  form, and the runtime must fail the way the entry says (does not load: that error; wrong output: tokens differ
  from onnxruntime's), while 4.3.1 runs the same file right. If an entry stops failing (say a fixed runtime), its
  test fails: drop the entry.
* What is not in that list does not break 3.x: the default folder's fp32, fp16 and q8 run in 3.8.1 as they are.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT
from graphkit import runtimes
from graphkit.errors import GraphkitError
from graphkit.tjs import compare_tokens, python_reference, run_matrix, variant_path

NEW_TOKENS = 32
DTYPES = ["fp32", "fp16", "q4", "q4f16", "q8"]
CLIENTS = {"3.8.1": "js-tjs3", "4.3.1": "js", "4.3.2": "js-tjs4-latest"}


# ------------------------------------------------------------------------- probe folders (one form each)

def _copy_folder(src, dst, keep: str):
    dst.mkdir(parents=True)
    for f in src.glob("*.json"):
        shutil.copy(f, dst / f.name)
    (dst / "onnx").mkdir()
    shutil.copy(src / "onnx" / keep, dst / "onnx" / keep)
    return dst


def _probe_fp16_logits(converted, root):
    from graphkit.modelio import load_model, save_model
    from passes.fp16 import Fp16Pass
    d = _copy_folder(converted, root / "probe-f16logits", "model.onnx")
    m = Fp16Pass(keep_logits_fp32=False)(load_model(d / "onnx" / "model.onnx")).model
    save_model(m, d / "onnx" / "model_fp16.onnx")
    return d


def _probe_kv_cache_dtype(converted, root):
    d = _copy_folder(converted, root / "probe-nokv", "model_fp16.onnx")
    cfg = json.loads((d / "config.json").read_text())
    cfg["transformers.js_config"].pop("kv_cache_dtype")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _convert_plain(root):
    """`convert --no-fuse --no-logits-to-keep --size-budget 1.0x`: the export's graph, each dtype's quantization alone
    (the previous defaults: all-4-bit bodies), so each 3.x fact of q4 / q4f16 / fp16 is seen without num_logits_to_keep
    or the budget's 8-bit MatMuls beside it."""
    out = root / "epicrisis-plain"
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", "--no-fuse", "--no-logits-to-keep", "--size-budget", "1.0x", "--output",
                          str(out), "--json", "--no-agreement"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def case(converted, converted_tjs3, fused, golden, tmp_path_factory):
    """All folders and the Node runs: one process per Transformers.js version."""
    folder = converted[0]
    root = tmp_path_factory.mktemp("probes")
    plain = _convert_plain(root)
    folders = {"default": folder, "fuse": fused, "tjs3": converted_tjs3, "plain": plain,
               "probe-f16logits": _probe_fp16_logits(plain, root),
               "probe-nokv": _probe_kv_cache_dtype(plain, root)}
    # KNOWN entry → (folder, dtype) with that form alone: the plain q4 / q4f16 carry theirs, the default fp32 has
    # num_logits_to_keep and nothing else 3.x lacks
    probes = {"matmulnbits-bits": ("plain", "q4"), "matmulnbits-f16-level4": ("plain", "q4f16"),
              "gqa-inputs": ("fuse", "fp32"), "num-logits-to-keep": ("default", "fp32"),
              "fp16-logits": ("probe-f16logits", "fp16"), "kv-cache-dtype": ("probe-nokv", "fp16")}
    assert set(probes) == {p.code for p in runtimes.KNOWN if not p.condition}, "every KNOWN entry needs a probe here"
    extra = [(k, d) for k, d in probes.values() if k.startswith("probe-")]
    jobs = {  # 4.3.1 runs the default and --fuse folders in tests/test_tjs.py
        "3.8.1": [(k, d) for k in ("tjs3", "default", "fuse", "plain") for d in DTYPES] + extra,
        "4.3.1": [("tjs3", d) for d in DTYPES] + extra,
        "4.3.2": [(k, d) for k in ("tjs3", "default", "fuse") for d in DTYPES] + [("plain", "q4"), ("plain", "q4f16")],
    }
    messages = [p["messages"] for p in golden["prompts"]]
    runs = {}
    for version, todo in jobs.items():
        out = run_matrix(CLIENTS[version], [(folders[k], d) for k, d in todo], messages, NEW_TOKENS)
        assert out["returncode"] == 0 and out["transformers_version"] == version, out.get("error")
        for (k, d), r in zip(todo, out["runs"]):
            runs[(version, k, d)] = r
        runs[(version, "ort")] = out["onnxruntime_node_version"]
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    refs: dict = {}

    def reference(key, dtype):
        if (key, dtype) not in refs:
            refs[(key, dtype)] = python_reference(variant_path(folders[key], dtype),
                                                  [p["prompt_ids"] for p in golden["prompts"]], NEW_TOKENS, eos)
        return refs[(key, dtype)]
    return {"folders": folders, "runs": runs, "probes": probes, "reference": reference, "golden": golden}


def _assert_equal_to_ort(case, version, key, dtype, ref_key=None):
    run = case["runs"][(version, key, dtype)]
    assert "error" not in run, f"{version} {key} {dtype}: {run['error']}"
    assert [r["prompt_ids"] for r in run["results"]] == [p["prompt_ids"] for p in case["golden"]["prompts"]]
    comps = compare_tokens(case["reference"](ref_key or key, dtype), run["results"])
    report = ["equal" if c.equal else f"diverges at {c.first_divergence} (margin {c.margin_at_divergence})" for c in comps]
    print(f"Transformers.js {version} {key} {dtype}: {'; '.join(report)}")
    assert all(c.equal for c in comps), report
    assert all("Motivo de ingreso" in r["text"] for r in run["results"]), [r["text"] for r in run["results"]]


# ----------------------------------------------------------------------------------------------- matrix

@pytest.mark.js
@pytest.mark.parametrize("version", list(CLIENTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_target_tjs3_runs_everywhere(case, version, dtype):
    """`--target transformers.js@3`: every dtype equals onnxruntime in 3.8.1, 4.3.1 and 4.3.2."""
    _assert_equal_to_ort(case, version, "tjs3", dtype)


@pytest.mark.js
@pytest.mark.parametrize("key", ["default", "fuse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_newest_4x_runs_default_and_fuse(case, key, dtype):
    _assert_equal_to_ort(case, "4.3.2", key, dtype)


@pytest.mark.js
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "q8"])
def test_tjs3_refuses_the_default_files_as_known(case, dtype):
    """The default folder is made for 4.x: every file carries num_logits_to_keep (the default for --target
    transformers.js@4), which 3.8.1 refuses as runtimes.KNOWN says, and nothing else 3.x is known to break on these
    dtypes; --target transformers.js@3 (test_target_tjs3_runs_everywhere) is the 3.x folder."""
    found = runtimes.check_file(variant_path(case["folders"]["default"], dtype), None, dtype, ("transformers.js@3",))
    assert [p["code"] for p in found] == ["num-logits-to-keep"], found
    run = case["runs"][("3.8.1", "default", dtype)]
    assert "Missing the following inputs: num_logits_to_keep" in run.get("error", ""), run.get("error")


@pytest.mark.js
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "q8"])
def test_tjs3_runs_the_plain_files_without_known_problems(case, dtype):
    """`--no-fuse --no-logits-to-keep` (the previous defaults): the files that have no entry in runtimes.KNOWN run in
    3.8.1 unchanged."""
    assert not runtimes.check_file(variant_path(case["folders"]["plain"], dtype), None, dtype, ("transformers.js@3",))
    _assert_equal_to_ort(case, "3.8.1", "plain", dtype)


@pytest.mark.js
def test_runtime_versions_are_the_ones_recorded(case):
    """RUNTIMES states what each client bundles; the clients report it themselves."""
    assert case["runs"][("3.8.1", "ort")] == runtimes.RUNTIMES["transformers.js@3"].onnxruntime_node
    assert case["runs"][("4.3.1", "ort")] == case["runs"][("4.3.2", "ort")] == runtimes.RUNTIMES["transformers.js@4"].onnxruntime_node
    assert set(CLIENTS) == {v for r in runtimes.RUNTIMES.values() for v in r.tested}


# ------------------------------------------------------------------------------- each entry, observed

def test_every_entry_names_the_test_that_observes_it():
    """Conditional entries (a device condition this machine may not have) are held by the test they name; the
    others by test_known_problems_observed below."""
    for p in runtimes.KNOWN:
        path, name = p.observed_by.split("::")
        assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), p.observed_by
        assert p.runtime in runtimes.RUNTIMES and p.effect in ("does not load", "wrong output") and p.fix
        if not p.condition:
            assert p.observed_by == f"tests/test_runtimes.py::test_known_problems_observed[{p.code}]"


@pytest.mark.js
@pytest.mark.parametrize("code", [p.code for p in runtimes.KNOWN if not p.condition])
def test_known_problems_observed(case, code):
    """graphkit.runtimes.KNOWN[code]: inspect's detector finds the form in the probe file, the runtime fails on it
    as the entry says, and the pinned 4.x runs the same file right."""
    problem = runtimes.PROBLEMS[code]
    assert problem.runtime == "transformers.js@3"
    key, dtype = case["probes"][code]
    path = case["folders"][key]
    found = runtimes.check_file(variant_path(path, dtype), json.loads((path / "config.json").read_text()), dtype,
                                conditional=False)
    assert [p["code"] for p in found] == [code], found
    run = case["runs"][("3.8.1", key, dtype)]
    if problem.effect == "does not load":
        assert "error" in run, f"{code}: 3.8.1 ran the file"
        quoted = problem.observed.split("'")[1]  # the entry quotes the runtime's own message
        assert quoted[:40] in run["error"], (quoted, run["error"][:300])
    else:
        assert "error" not in run, run.get("error")
        comps = compare_tokens(case["reference"](key, dtype), run["results"])
        assert not any(c.equal for c in comps), f"{code}: 3.8.1 now matches onnxruntime; drop the entry"
        if code == "matmulnbits-f16-level4":  # the symptom: token 0 over and over
            assert all(set(r["new_ids"]) == {0} for r in run["results"]), [r["new_ids"][:8] for r in run["results"]]
    _assert_equal_to_ort(case, "4.3.1" if key.startswith("probe-") else "4.3.2", key, dtype)


# ------------------------------------------------------------------------------ fast, no Node needed

def _nbits_model(bits=4, level=4, f16=False, gqa_inputs=0, logits_f16=False, nltk=False):
    ft = TensorProto.FLOAT16 if f16 else TensorProto.FLOAT
    npf = np.float16 if f16 else np.float32
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "S"], ["logits"], domain="com.microsoft", K=16, N=8,
                              bits=bits, block_size=16, accuracy_level=level)]
    inits = [numpy_helper.from_array(np.zeros((8, 1, 16 * bits // 8), np.uint8), "B"),
             numpy_helper.from_array(np.ones(8, npf), "S")]
    inputs = [helper.make_tensor_value_info("x", ft, [1, 1, 16])]
    if gqa_inputs:
        names = ["q", "k", "v", "pk", "pv", "sl", "tl"] + [""] * (gqa_inputs - 8) + ["bias"]
        nodes.append(helper.make_node("GroupQueryAttention", names[:gqa_inputs], ["o"], domain="com.microsoft"))
    if nltk:
        inputs.append(helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, []))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT16 if logits_f16 else TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "g", inputs, [out], inits))


@pytest.mark.parametrize("kwargs, code", [
    (dict(bits=8), "matmulnbits-bits"), (dict(bits=2), "matmulnbits-bits"),
    (dict(f16=True, level=4, logits_f16=False), "matmulnbits-f16-level4"),
    (dict(gqa_inputs=11), "gqa-inputs"), (dict(nltk=True), "num-logits-to-keep"),
    (dict(logits_f16=True, level=0), "fp16-logits"),
])
def test_detectors_hit_the_form_and_not_its_fix(kwargs, code):
    assert [p["code"] for p in runtimes.check_model(_nbits_model(**kwargs), conditional=False)] == [code]
    fixed = {"matmulnbits-bits": dict(bits=4), "matmulnbits-f16-level4": dict(f16=True, level=0),
             "gqa-inputs": dict(gqa_inputs=9), "num-logits-to-keep": {}, "fp16-logits": dict(level=0)}[code]
    assert runtimes.check_model(_nbits_model(**fixed), conditional=False) == []
    assert runtimes.check_model(_nbits_model(**kwargs), runtimes=("transformers.js@4",), conditional=False) == []


def test_conditional_caveat_is_reported_not_refused():
    """Any GroupQueryAttention carries the WebGPU subgroup caveat for 4.x: reported, with its condition."""
    found = runtimes.check_model(_nbits_model(gqa_inputs=9))
    assert [(p["code"], p["runtime"]) for p in found] == [("webgpu-gqa-subgroup", "transformers.js@4")]
    assert "subgroup sizes 4 and 8" in found[0]["message"] and "--fuse" in found[0]["fix"]


def test_kv_cache_dtype_needs_the_folder_config():
    m = _nbits_model()
    m.graph.input.append(helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, [1, 2, 0, 4]))
    cfg = {"transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16"}}}
    assert runtimes.check_model(m, cfg, "q4f16") == []
    assert [p["code"] for p in runtimes.check_model(m, cfg, "fp16")] == ["kv-cache-dtype"]
    assert runtimes.check_model(m, None, "fp16") == []  # a lone file: nothing to check against


def test_parse_target():
    for text in ("transformers.js@3", "tjs3", "3", "3.8.1", "Transformers.js@3"):
        assert runtimes.parse_target(text) == "transformers.js@3"
    assert runtimes.parse_target("transformers.js@4") == runtimes.DEFAULT_TARGET
    with pytest.raises(GraphkitError, match="choose one of transformers.js@3, transformers.js@4"):
        runtimes.parse_target("transformers.js@2")


def test_convert_records_its_target_and_inspect_grades_by_it(converted, converted_tjs3, tmp_path):
    """config.json says which runtimes the folder was made for; inspect reports 3.x problems of a default folder
    as warnings, and as errors once the folder claims 3.x."""
    from graphkit.inspect import inspect_path
    folder = converted[0]
    assert json.loads((folder / "config.json").read_text())["graphkit"]["runtimes"] == ["transformers.js@4"]
    rec = json.loads((converted_tjs3 / "config.json").read_text())["graphkit"]
    assert rec["target"] == "transformers.js@3" and rec["runtimes"] == ["transformers.js@3", "transformers.js@4"]
    assert rec["tested"]["transformers.js@3"]["onnxruntime-node"] == "1.21.0"
    good = inspect_path(converted_tjs3)
    assert good["errors"] == 0 and not [f for m in good["models"] for f in m["findings"] if f.get("runtime")]
    default = inspect_path(folder)
    per_file = {m["path"].rsplit("/", 1)[1]: {f["code"]: f["level"] for f in m["findings"] if f.get("runtime")}
                for m in default["models"]}
    nltk = {"num-logits-to-keep": "warning"}  # every default file: the 4.x input (convert's default for @4)
    assert per_file["model_q4.onnx"] == {"matmulnbits-bits": "warning", **nltk}
    # the default --size-budget (1.5x) puts q4f16's table and its most sensitive MatMuls at 8 bits
    assert per_file["model_q4f16.onnx"] == {"matmulnbits-bits": "warning", "matmulnbits-f16-level4": "warning", **nltk}
    assert per_file["model.onnx"] == per_file["model_fp16.onnx"] == per_file["model_quantized.onnx"] == nltk
    rows = {r["runtime"]: r for r in next(m for m in default["models"] if m["path"].endswith("_q4.onnx"))["runtimes"]}
    assert rows["transformers.js@3"]["problems"] == [{"code": "matmulnbits-bits", "effect": "does not load"},
                                                     {"code": "num-logits-to-keep", "effect": "does not load"}]
    assert rows["transformers.js@4"]["problems"] == [] and rows["transformers.js@4"]["made_for"]
    # the same 8-bit file in a folder that claims 3.x: an error
    claim = tmp_path / "claims-3x"
    shutil.copytree(converted_tjs3, claim)
    shutil.copy(folder / "onnx" / "model_q4.onnx", claim / "onnx" / "model_q4.onnx")
    bad = inspect_path(claim)
    assert bad["errors"] == 2  # the 8-bit head and the default's num_logits_to_keep: 3.x loads neither
    f = next(f for m in bad["models"] for f in m["findings"] if f["code"] == "matmulnbits-bits")
    assert f["level"] == "error" and "--target transformers.js@3" in f["fix"] and "Only 4b quantization" in f["message"]


def test_convert_refuses_a_file_its_target_cannot_run(converted):
    from graphkit.convert import _check_runtimes
    model = onnx.load(str(variant_path(converted[0], "q4")), load_external_data=False)
    _check_runtimes(model, "model_q4.onnx", "q4", "transformers.js@4")  # made for 4.x: fine
    with pytest.raises(GraphkitError, match=r"model_q4.onnx is made for --target transformers.js@3 but "
                                            r"Transformers.js 3.x does not load .*Fix: `convert --target"):
        _check_runtimes(model, "model_q4.onnx", "q4", "transformers.js@3")


def test_convert_target3_refuses_fuse(tmp_path):
    res = subprocess.run([sys.executable, "-m", "graphkit", "convert", "-o", str(tmp_path / "o"), "--fuse", "--target",
                          "transformers.js@3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "min=7, max=9" in res.stderr and "drop --fuse" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 3 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_verify_browser_names_known_problems(converted):
    """verify --browser appends the list's entry to a failing row, for the Transformers.js version that ran it."""
    from graphkit.tjs import known_problem_note
    folder = converted[0]
    note = known_problem_note(folder, "q4", "3.8.1", "wasm")
    assert "known (matmulnbits-bits)" in note and "Fix: `convert --target transformers.js@3`" in note
    assert known_problem_note(folder, "q4", "4.3.1", "wasm") == ""
    # the default q4f16 carries 8-bit parts (the default --size-budget: its table and the most sensitive MatMuls), which
    # 3.x's wasm refuses; its float16 accuracy_level=4 problem is observed in onnxruntime-node only
    wasm = known_problem_note(folder, "q4f16", "3.8.1", "wasm")
    assert "known (matmulnbits-bits)" in wasm and "matmulnbits-f16-level4" not in wasm, wasm
    assert "matmulnbits-f16-level4" in known_problem_note(folder, "q4f16", "3.8.1", "cpu")


def test_logits_to_keep_refused_for_tjs3(tmp_path):
    """--logits-to-keep adds an input Transformers.js 3.x never feeds: refused up front for a 3.x target, nothing written."""
    from graphkit.convert import convert
    from graphkit.errors import GraphkitError
    out = tmp_path / "out"
    with pytest.raises(GraphkitError, match="num_logits_to_keep"):
        convert(ROOT / "graphkit" / "examples" / "epicrisis-tiny" / "base", out, dtypes=["q8"], target="transformers.js@3", logits_to_keep=True)
    assert not out.exists()
