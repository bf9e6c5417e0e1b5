"""`inspect`'s diagnoses of known causes of garbage (graphkit/diagnose.py), each on the smallest graph that
shows it and on a real producer's output: the shipped example exported with optimum-onnx 0.1.0 and quantized
with optimum's ORTQuantizer (tests/fixtures/optimum, made by scripts/make_optimum_fixture.py); and `convert`
starting from that ONNX export (no PyTorch), its result checked with `verify` and Transformers.js in Node."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLE, ROOT
from graphkit.diagnose import expected_inv_freq
from graphkit.errors import GraphkitError
from graphkit.inspect import inspect_path
from graphkit.modelio import save_model
from test_inspect_diff_bench import HD, VOCAB, cli, codes, toy_decoder

FIXTURES = ROOT / "tests" / "fixtures" / "optimum"
ROPE_BAD, CORRECT = FIXTURES / "rope-mismatch", FIXTURES / "correct"


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    return path


def _folder_with(model: onnx.ModelProto, folder: Path, config: dict) -> Path:
    """An optimum-style folder: model.onnx beside config.json."""
    _save(model, folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model.onnx"


def _inv_freq(theta: float, dim: int = HD) -> np.ndarray:
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


def _rope_graph(table: np.ndarray, name: str = "inv_freq") -> onnx.ModelProto:
    """positions × table → Cos: the rotary angle computation of a decoder, nothing else."""
    nodes = [helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["pos_f", "axes"], ["pos_u"]),
             helper.make_node("Mul", ["pos_u", name], ["angles"]),
             helper.make_node("Cos", ["angles"], ["logits"])]
    g = helper.make_graph(nodes, "rope", [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(table, name), numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


QWEN_CONFIG = {"model_type": "qwen2", "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_size": 2 * HD,
               "head_dim": HD, "num_hidden_layers": 2, "vocab_size": VOCAB}


# ------------------------------------------------------------------------- smallest graphs, one cause each

def test_per_tensor_activation_quantization_is_an_error_per_token_is_not(tmp_path):
    from passes.matmul_int8 import MatMulInt8Pass
    base = toy_decoder()
    flagged = MatMulInt8Pass(activations="per-tensor")(base).model
    ok = MatMulInt8Pass()(base).model  # graphkit's q8: per-token scales
    f = codes(inspect_path(_save(flagged, tmp_path / "pt" / "model.onnx")))["act-quant-per-tensor"]
    assert f["level"] == "error" and "matmul-int8" in f["fix"] and "per-token" in f["fix"]
    assert f["evidence"]["per_tensor_matmuls"] >= 4 and f["evidence"]["DynamicQuantizeLinear"] >= 1
    assert "act-quant-per-tensor" not in codes(inspect_path(_save(ok, tmp_path / "tok" / "model.onnx")))


@pytest.mark.parametrize("form", ["inv_freq", "cos cache", "sin cache"])
def test_rope_mismatch_inv_freq_and_caches(tmp_path, form):
    def table(theta):
        inv = _inv_freq(theta)
        if form == "inv_freq":
            return inv
        pos = np.arange(16, dtype=np.float32)[:, None] * inv[None, :]
        return (np.cos(pos) if form == "cos cache" else np.sin(pos)).astype(np.float32)
    cfg = dict(QWEN_CONFIG, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    bad = codes(inspect_path(_folder_with(_rope_graph(table(1e4)), tmp_path / "bad", cfg)))["rope-mismatch"]
    assert bad["level"] == "error" and bad["evidence"]["form"] == form and "re-export" in bad["fix"]
    assert abs(bad["evidence"]["graph_theta"] - 1e4) < 1 and bad["evidence"]["config_theta"] == 1e6
    assert "10,000 is transformers 4.x's default" in bad["message"]
    good = inspect_path(_folder_with(_rope_graph(table(1e6)), tmp_path / "good", cfg))
    assert "rope-mismatch" not in codes(good)


def test_rope_from_fuse_rotary_cos_cache(tmp_path):
    """After fuse-rotary the graph has no inv_freq, only cos/sin caches: still checked (both ways)."""
    from graphkit.modelio import load_model
    from graphkit.pipeline import parse_spec, run_passes
    fused, _ = run_passes(load_model(CORRECT / "model.onnx"), parse_spec("fuse-rotary(max_positions=64)"))
    cfg = json.loads((CORRECT / "config.json").read_text())
    path = _folder_with(fused, tmp_path / "f", cfg)
    assert "rope-mismatch" not in codes(inspect_path(path))
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"] = 1e4
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    f = codes(inspect_path(path))["rope-mismatch"]
    assert f["evidence"]["form"] in ("cos cache", "sin cache") and abs(f["evidence"]["graph_theta"] - 1e6) < 1e3


def test_rope_expected_frequencies_match_transformers():
    """Our config → inv_freq for default / linear / llama3 equals transformers' own rope init."""
    import torch  # noqa: F401  (transformers' rope functions need it; inspect itself never imports it)
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cases = [{"rope_type": "default", "rope_theta": 1e6},
             {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
             {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}]
    for params in cases:
        cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, rope_parameters=params)
        fn = ROPE_INIT_FUNCTIONS[params["rope_type"]] if params["rope_type"] != "default" else None
        want = fn(cfg, "cpu")[0].numpy() if fn else 1.0 / params["rope_theta"] ** (np.arange(0, 64, 2) / 64)
        got, kind = expected_inv_freq(cfg.to_dict())
        assert kind == params["rope_type"] and np.allclose(got, want, rtol=1e-5), (kind, got[:4], want[:4])


def test_config_rope_conflict_and_vocab(tmp_path):
    cfg = dict(QWEN_CONFIG, vocab_size=VOCAB + 8, rope_theta=1e4, rope_parameters={"rope_theta": 1e6})
    f = codes(inspect_path(_folder_with(toy_decoder(), tmp_path / "m", cfg)))
    assert f["config-vocab"]["level"] == "error" and f["config-vocab"]["evidence"] == {
        "logits_width": VOCAB, "config_vocab_size": VOCAB + 8}
    assert f["config-rope-conflict"]["level"] == "warning"
    assert f["config-rope-conflict"]["evidence"] == {"rope_parameters.rope_theta": 1e6, "rope_theta": 1e4}
    cfg = dict(QWEN_CONFIG, num_key_value_heads=4, num_hidden_layers=3)
    f = codes(inspect_path(_folder_with(toy_decoder(), tmp_path / "k", cfg)))
    assert f["config-kv-shape"]["level"] == "error" and f["config-layers"]["level"] == "error"


def _tok_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(EXAMPLE / "base" / name, folder / name)
    return folder


def test_tokenizer_without_qwen_digit_regex(tmp_path):
    ok = _tok_folder(tmp_path / "ok")
    assert "tokenizer-digits" not in codes(inspect_path(ok))
    bad = _tok_folder(tmp_path / "bad")
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    f = codes(inspect_path(bad))["tokenizer-digits"]
    assert f["level"] == "error" and "Split" in f["fix"]
    assert [p for p, _ in f["evidence"]["browser_pieces_for_2024"]] == ["2024"]  # one piece, Python: four


def test_chat_template_missing_is_an_error_for_a_chat_tokenizer(tmp_path):
    folder = _tok_folder(tmp_path / "t")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    f = codes(inspect_path(folder))["chat-template"]
    assert f["level"] == "error" and "<|im_start|>" in f["message"]


def _fp16_graph() -> onnx.ModelProto:
    """RMSNorm variance and Softmax computed in float16 (what a naive float16 converter makes)."""
    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["x", "sd"], ["xn"]), helper.make_node("MatMul", ["xn", "w"], ["h"]),
             helper.make_node("Softmax", ["h"], ["logits"], axis=-1)]
    inits = [numpy_helper.from_array(np.array(2, np.float16), "two"), numpy_helper.from_array(np.array(1e-6, np.float16), "eps"),
             numpy_helper.from_array(np.ones((8, VOCAB), np.float16), "w")]
    g = helper.make_graph(nodes, "n", [helper.make_tensor_value_info("x", f16, [1, 3, 8])],
                          [helper.make_tensor_value_info("logits", f16, [1, 3, VOCAB])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_norm_variance_and_softmax_warnings(tmp_path):
    f = codes(inspect_path(_save(_fp16_graph(), tmp_path / "n" / "model.onnx")))
    assert f["fp16-norm-variance"]["level"] == "warning" and f["fp16-norm-variance"]["evidence"]["count"] == 1
    assert f["fp16-softmax"]["level"] == "warning" and "65,504" in f["fp16-softmax"]["message"]
    from passes.fp16 import Fp16Pass  # graphkit's fp16 keeps them in float32
    ours = Fp16Pass()(toy_decoder()).model
    f = codes(inspect_path(_save(ours, tmp_path / "ours" / "model.onnx")))
    assert "fp16-softmax" not in f and "fp16-norm-variance" not in f


def test_fp16_warnings_on_onnxruntime_float16_converter_output(tmp_path):
    """A real producer: onnxruntime's float16 converter (the anchor fp16 recipe) on the optimum export."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    m16 = convert_float_to_float16(onnx.load(CORRECT / "model.onnx"), keep_io_types=True)
    f = codes(inspect_path(_save(m16, tmp_path / "onnx" / "model_fp16.onnx")))
    assert f["fp16-norm-variance"]["evidence"]["count"] == 9 and f["fp16-softmax"]["evidence"]["count"] == 4


def test_verify_reads_an_optimum_export():
    from graphkit.verify import variants_in
    assert variants_in(ROPE_BAD) == [("fp32", ROPE_BAD / "model.onnx"), ("q8", ROPE_BAD / "model_quantized.onnx")]


def test_int4_lm_head_and_accuracy_level_warnings(tmp_path):
    from passes.matmul_nbits import MatMulNBitsPass
    q4 = MatMulNBitsPass(bits=4, block_size=16, accuracy_level=4, lm_head="4")(toy_decoder(tied=False)).model
    f = codes(inspect_path(_save(q4, tmp_path / "q" / "model.onnx")))
    assert f["int4-lm-head"]["level"] == "warning" and f["int4-lm-head"]["evidence"]["N"] == VOCAB
    assert "§4" in f["int4-lm-head"]["message"] and "tied-embedding(bits=8" in f["int4-lm-head"]["fix"]
    assert f["accuracy-level-4"]["level"] == "warning" and "29849" in f["accuracy-level-4"]["message"]
    float_head = MatMulNBitsPass(bits=4, block_size=16, exclude=["lm_head"])(toy_decoder(tied=False)).model
    f = codes(inspect_path(_save(float_head, tmp_path / "k" / "model.onnx")))
    assert "int4-lm-head" not in f and "accuracy-level-4" not in f


# ------------------------------------------------------------------------- the real producer's output

def test_optimum_ortquantizer_fixture_names_the_cause_and_the_fix():
    res = cli("inspect", str(ROPE_BAD / "model_quantized.onnx"))
    assert res.exit_code == 0, res.output
    head = res.output.lstrip().splitlines()[0]
    assert head.startswith("✗ verdict") and "act-quant-per-tensor" in head  # the verdict leads
    text = " ".join(res.output.split())
    assert "per-tensor dynamic activation quantization" in text and "matmul-int8" in text
    rep = json.loads(cli("inspect", str(ROPE_BAD / "model_quantized.onnx"), "--json").stdout)
    f = codes(rep)["act-quant-per-tensor"]
    assert f["level"] == "error" and "matmul-int8" in f["fix"]
    assert f["evidence"]["per_tensor_matmuls"] == 38 and f["evidence"]["rotary_quantized"]  # ORTQuantizer even quantizes the rotary angles
    assert rep["verdict"]["ok"] is False and "act-quant-per-tensor" in [e["code"] for e in rep["verdict"]["errors"]]


def test_optimum_export_from_transformers5_config_names_the_rope_mismatch():
    rep = json.loads(cli("inspect", str(ROPE_BAD), "--json").stdout)
    every = [f for m in rep["models"] for f in m["findings"]]
    rope = [f for f in every if f["code"] == "rope-mismatch"]
    assert len(rope) == 2 and all(f["level"] == "error" for f in rope)  # model.onnx and model_quantized.onnx
    assert abs(rope[0]["evidence"]["graph_theta"] - 1e4) < 1 and rope[0]["evidence"]["config_theta"] == 1e6
    assert rep["verdict"]["errors"][0]["code"] in ("rope-mismatch", "act-quant-per-tensor")
    # transformers 5 saved the chat template only in chat_template.jinja, which Transformers.js never reads
    assert codes(rep)["chat-template"]["level"] == "error"
    assert codes(rep)["config-rope-conflict"]["evidence"] == {"rope_parameters.rope_theta": 1e6, "rope_theta": 1e4}
    text = " ".join(cli("inspect", str(ROPE_BAD / "model.onnx")).output.split())
    assert text.startswith("✗ verdict") and "rope-mismatch" in text and "rope_theta ≈ 10,000" in text
    assert "re-export with graphkit" in text
    good = inspect_path(CORRECT)
    assert not {"rope-mismatch", "act-quant-per-tensor"} & set(codes(good))


# --------------------------------------------------------------------------------- convert from ONNX

def _convert(src: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, bool]:
    """`graphkit convert` in a fresh interpreter; also says whether torch got imported."""
    code = ("import sys, json\nfrom graphkit.cli import main\nsys.argv = ['graphkit', 'convert', sys.argv[1], '-o', "
            "sys.argv[2], '--json'] + sys.argv[3:]\ntry:\n    main()\nexcept SystemExit as e:\n    rc = e.code or 0\n"
            "else:\n    rc = 0\nsys.stderr.write('\\nTORCH=%s\\n' % ('torch' in sys.modules))\nsys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", code, str(src), str(out), *extra], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    return res, "TORCH=True" in res.stderr


@pytest.fixture(scope="module")
def from_optimum(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("from-onnx") / "out"
    res, torch_loaded = _convert(CORRECT, out)
    assert res.returncode == 0, res.stderr
    assert not torch_loaded, "convert from an ONNX export imported torch"
    return out, json.loads(res.stdout)


@pytest.mark.slow
def test_convert_from_optimum_export_writes_every_dtype_and_verify_passes(from_optimum):
    from graphkit.verify import verify_folder
    out, summary = from_optimum
    assert summary["onnx_source"].endswith("correct/model.onnx") and summary["ok"]
    assert {d["dtype"] for d in summary["dtypes"] if d["ok"]} == {"fp32", "fp16", "q4", "q4f16", "q8"}
    rep = inspect_path(out)
    assert rep["errors"] == 0 and rep["verdict"]["ok"], [f for m in rep["models"] for f in m["findings"]]
    fp16 = next(m for m in rep["models"] if m["path"].endswith("model_fp16.onnx"))
    assert not {"fp16-softmax", "fp16-norm-variance"} & {f["code"] for f in fp16["findings"]}
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())  # embedded from the .jinja
    result = verify_folder(out, dtypes=["q4f16", "q8"])
    assert result["passed"], result["variants"]
    assert {v["dtype"]: v["passed"] for v in result["variants"]} == {"q4f16": True, "q8": True}


@pytest.mark.slow
@pytest.mark.js
@pytest.mark.parametrize("dtype", ["q4f16", "q8"])
def test_convert_from_optimum_export_runs_in_transformersjs(from_optimum, golden, dtype):
    from graphkit.tjs import compare_tokens, python_reference, run_client, variant_path
    out, _ = from_optimum
    from graphkit.prompts import encode_prompts_tokenizers
    # the fixture is a snapshot of the first example (its own tokenizer): ids from the folder itself, not golden/
    messages = [p["messages"] for p in golden["prompts"][:2]]
    prompt_ids = encode_prompts_tokenizers(out, messages)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    result = run_client(out, dtype, messages, 32, "node")
    assert result["returncode"] == 0 and "error" not in result, result.get("error")
    assert [r["prompt_ids"] for r in result["results"]] == prompt_ids
    ref = python_reference(variant_path(out, dtype), prompt_ids, 32, eos)
    comps = compare_tokens(ref, result["results"])
    assert all(c.equal for c in comps), [(c.prompt, c.first_divergence) for c in comps]
    assert all("Motivo de ingreso" in r["text"] for r in result["results"])  # the merged adapter's behaviour


def test_convert_refuses_the_rope_mismatched_export(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROPE_BAD, src)
    (src / "model_quantized.onnx").unlink()
    res = cli("convert", str(src), "-o", str(tmp_path / "out"))
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "rotary frequencies" in text and "re-export with graphkit" in text
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_convert_refuses_an_already_quantized_export(tmp_path):
    only_q8 = tmp_path / "q8"
    shutil.copytree(ROPE_BAD, only_q8)
    (only_q8 / "model.onnx").unlink()
    res = cli("convert", str(only_q8), "-o", str(tmp_path / "o1"))
    assert res.exit_code == 2 and "no fp32 model.onnx" in " ".join(res.output.split())
    renamed = tmp_path / "renamed"
    shutil.copytree(CORRECT, renamed)
    shutil.copyfile(ROPE_BAD / "model_quantized.onnx", renamed / "model.onnx")
    res = cli("convert", str(renamed), "-o", str(tmp_path / "o2"))
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "already quantized" in text and "fp32" in text
    res = cli("convert", str(CORRECT), "-o", str(tmp_path / "o3"), "--adapter", str(EXAMPLE / "adapter"))
    assert res.exit_code == 2 and "--adapter" in res.output


@pytest.mark.slow
def test_convert_from_transformersjs_layout_with_external_data(tmp_path):
    """onnx/model.onnx with its weights in model.onnx_data (a Transformers.js folder), q8 only: no torch."""
    src = tmp_path / "tjs"
    (src / "onnx").mkdir(parents=True)
    for f in CORRECT.iterdir():
        if f.suffix != ".onnx":
            shutil.copyfile(f, src / f.name)
    cfg = json.loads((src / "config.json").read_text())  # as a Transformers.js folder declares its files
    cfg["transformers.js_config"] = {"use_external_data_format": {"model.onnx": 1}, "kv_cache_dtype": {"q4f16": "float16"}}
    (src / "config.json").write_text(json.dumps(cfg))
    save_model(onnx.load(CORRECT / "model.onnx"), src / "onnx" / "model.onnx", external_data=True)
    assert (src / "onnx" / "model.onnx_data").is_file()
    res, torch_loaded = _convert(src, tmp_path / "out", "--dtypes", "fp32,q8")
    assert res.returncode == 0, res.stderr
    assert not torch_loaded
    summary = json.loads(res.stdout)
    q8 = next(d for d in summary["dtypes"] if d["dtype"] == "q8")
    assert q8["ok"] and q8["top1_vs_fp32"] >= 0.9
    # the output's files are small and inline: the source's external-data / fp16-KV declarations must not carry over
    assert "transformers.js_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert inspect_path(tmp_path / "out")["errors"] == 0


def test_find_onnx_source_prefers_pytorch_weights(tmp_path):
    from graphkit.onnx_source import find_onnx_source
    assert find_onnx_source(EXAMPLE / "base") is None  # safetensors: the Hugging Face path
    assert find_onnx_source(CORRECT) == CORRECT / "model.onnx"
    with pytest.raises(GraphkitError, match="no fp32 model.onnx"):
        (tmp_path / "onnx").mkdir()
        (tmp_path / "onnx" / "model_q4.onnx").write_bytes(b"")
        find_onnx_source(tmp_path)
