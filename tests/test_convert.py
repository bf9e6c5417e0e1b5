"""`graphkit convert` and `graphkit verify` on the shipped fine-tuned model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE
from graphkit.ortrun import DecoderRunner, kl_divergence

ALL = ["fp32", "fp16", "q4", "q4f16", "q8"]
FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "q4": "model_q4.onnx", "q4f16": "model_q4f16.onnx",
         "q8": "model_quantized.onnx"}


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "graphkit", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_folder_layout(converted):
    out, summary = converted
    assert summary["ok"] and [d["dtype"] for d in summary["dtypes"]] == ALL
    for dt in ALL:
        assert (out / "onnx" / FILES[dt]).is_file()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transformers.js_config"]["kv_cache_dtype"] == {"fp16": "float16", "q4f16": "float16"}
    assert "use_external_data_format" not in cfg["transformers.js_config"]  # small model: single files
    # nothing temporary left beside the output or inside it
    assert sorted(p.name for p in out.parent.iterdir()) == ["epicrisis-tiny"]
    assert sorted(p.name for p in out.iterdir()) == ["USAGE.md", "config.json", "generation_config.json", "onnx",
                                                    "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in (out / "onnx").iterdir()) == sorted(FILES.values())


def test_variant_io_types(converted):
    out, _ = converted
    for dt, kv_type in (("fp32", "tensor(float)"), ("fp16", "tensor(float16)"), ("q4", "tensor(float)"),
                        ("q4f16", "tensor(float16)"), ("q8", "tensor(float)")):
        r = DecoderRunner.from_file(out / "onnx" / FILES[dt])
        assert r.inputs["past_key_values.0.key"].type == kv_type, dt
        assert {o.name: o.type for o in r.session.get_outputs()}["logits"] == "tensor(float)", dt
    ops = lambda dt: {n.op_type for n in onnx.load(str(out / "onnx" / FILES[dt])).graph.node}  # noqa: E731
    assert "MatMulNBits" in ops("q4") and "MatMulNBits" in ops("q4f16")
    assert "MatMulInteger" in ops("q8")


def test_quantized_agreement_with_fp32_over_golden(converted, golden):
    """Teacher-forced top-1 agreement with the fp32 reference over the golden continuations.

    Measured on the shipped model (2026-11-25): fp16 1.000, q4 0.981, q4f16 0.981, q8 1.000
    (mean KL 1e-7, 0.0010, 0.0010, 0.0001); the bar is 0.90 (issue 3)."""
    out, _ = converted
    ref = DecoderRunner.from_file(out / "onnx" / "model.onnx")
    figures = {}
    for dt in ("fp16", "q4", "q4f16", "q8"):
        r = DecoderRunner.from_file(out / "onnx" / FILES[dt])
        agree, total, kls = 0, 0, []
        for rec in golden["prompts"]:
            cont = rec["greedy_ids_adapter"]
            a = ref.teacher_forced_logits(rec["prompt_ids"], cont)
            b = r.teacher_forced_logits(rec["prompt_ids"], cont)
            assert np.isfinite(b).all(), dt
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(cont)
            kls.append(kl_divergence(a, b).mean())
        figures[dt] = (agree / total, float(np.mean(kls)))
    print("agreement, KL vs fp32:", figures)
    for dt, (agreement, _) in figures.items():
        assert agreement >= 0.90, (dt, figures)


def test_fp16_greedy_equals_golden(converted, golden):
    out, _ = converted
    r = DecoderRunner.from_file(out / "onnx" / FILES["fp16"])
    for rec in golden["prompts"]:
        assert r.greedy(rec["prompt_ids"], 32)[0] == rec["greedy_ids_adapter"]


def test_verify_against_pytorch(converted):
    out, _ = converted
    res = _cli("verify", out, "--reference", EXAMPLE / "base", "--adapter", EXAMPLE / "adapter", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(res.stdout)
    assert result["passed"] and result["reference"].startswith("PyTorch")
    by = {v["dtype"]: v for v in result["variants"]}
    assert set(by) == set(ALL)
    assert by["fp32"]["top1_agreement"] == 1.0 and by["fp32"]["kl_mean"] < 1e-6
    for v in by.values():
        assert v["nonfinite"] == 0 and v["error"] is None


def _break_q4_scales(path):
    m = onnx.load(str(path))
    names = {n.input[2] for n in m.graph.node if n.op_type == "MatMulNBits"}
    rng = np.random.default_rng(0)
    for t in m.graph.initializer:
        if t.name in names:
            a = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array((a * rng.uniform(-2, 2, a.shape)).astype(a.dtype), t.name))
    onnx.save(m, str(path))


def test_verify_flags_broken_variant(converted, tmp_path):
    out, _ = converted
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    _break_q4_scales(broken / "onnx" / "model_q4.onnx")
    res = _cli("verify", broken, "--json", "--dtypes", "fp32,q4,q8")
    assert res.returncode == 1, res.stdout + res.stderr
    by = {v["dtype"]: v for v in json.loads(res.stdout)["variants"]}
    assert not by["q4"]["passed"] and by["q4"]["top1_agreement"] < by["q4"]["threshold"]
    assert by["q8"]["passed"] and by["fp32"]["passed"]


def test_convert_refuses_nonempty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    res = _cli("convert", "--output", tmp_path / "out", "--dtypes", "fp32")
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failed_dtype_leaves_no_file(tmp_path, monkeypatch):
    from graphkit import convert as conv
    monkeypatch.setitem(conv.PIPELINES, "q4", "matmul-nbits(bits=3)")
    summary = conv.convert(EXAMPLE / "base", tmp_path / "out", EXAMPLE / "adapter", ["fp32", "q4"],
                           exporter="torchscript", check_agreement=False)
    assert not summary["ok"]
    by = {d["dtype"]: d for d in summary["dtypes"]}
    assert by["fp32"]["ok"] and not by["q4"]["ok"] and "bits" in by["q4"]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "onnx").iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unknown_dtype(tmp_path):
    res = _cli("convert", "--output", tmp_path / "o", "--dtypes", "q3")
    assert res.returncode == 2 and "q3" in res.stderr and not (tmp_path / "o").exists()


HEAD4_Q4 = ("tied-embedding(bits=4,block_size=32,symmetric=false,accuracy_level=4),"
            "matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4)")


def test_pipeline_override_replaces_one_dtype(tmp_path):
    """--pipeline q4=SPEC: the q4 file is made by that spec (a 4-bit shared table here) after logits-to-keep (the
    target's input) and without the default fusions (the spec says which it wants), the others as usual."""
    import onnx
    out = tmp_path / "o"
    res = _cli("convert", "--output", out, "--dtypes", "fp32,q4", "--pipeline", f"q4={HEAD4_Q4}", "--json",
               "--no-agreement")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    by = {d["dtype"]: d for d in summary["dtypes"]}
    assert [p.split("(")[0] for p in by["q4"]["passes"]] == ["logits-to-keep", "tied-embedding", "matmul-nbits"]
    assert by["q4"]["pipeline"] == "logits-to-keep," + HEAD4_Q4 and by["q4"]["fusion"] == "none"
    assert by["fp32"]["pipeline"] == "logits-to-keep"
    m = onnx.load(str(out / "onnx" / "model_q4.onnx"))
    head = [n for n in m.graph.node if n.op_type == "MatMulNBits"
            and next(a.i for a in n.attribute if a.name == "N") == 2048]
    assert head and all(next(a.i for a in n.attribute if a.name == "bits") == 4 for n in head)


BROWSER_Q8 = "fuse-rmsnorm,fuse-rotary,pack-matmul,matmul-int8(quantize_embedding_gather=true)"


def test_browser_q8_pipeline_from_the_docs(tmp_path):
    """docs/q8.md's q8 spec for browser-first files (the fusions but GroupQueryAttention, which is slow on prompts in
    onnxruntime-web's wasm): it runs, keeps q8's agreement with the fp32 file, and has no GroupQueryAttention."""
    import onnx
    docs = Path(__file__).resolve().parents[1] / "docs" / "q8.md"
    assert f'"q8={BROWSER_Q8}"' in docs.read_text()
    out = tmp_path / "o"
    res = _cli("convert", "--output", out, "--dtypes", "fp32,q8", "--pipeline", f"q8={BROWSER_Q8}", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    q8 = next(d for d in json.loads(res.stdout)["dtypes"] if d["dtype"] == "q8")
    assert q8["top1_vs_fp32"] >= 0.95 and q8["kl_vs_fp32"] < 0.01, q8
    ops = {n.op_type for n in onnx.load(str(out / "onnx" / "model_quantized.onnx")).graph.node}
    assert {"SimplifiedLayerNormalization", "RotaryEmbedding", "MatMulInteger"} <= ops
    assert "GroupQueryAttention" not in ops


@pytest.mark.parametrize("item,needle", [("q3=fp16", "DTYPE one of"), ("q4", "DTYPE=SPEC"),
                                         ("fp32=fp16", "fp32 is the export"), ("q4=matmul-nbit", "unknown pass")])
def test_pipeline_override_errors_before_export(tmp_path, item, needle):
    res = _cli("convert", "--output", tmp_path / "o", "--dtypes", "fp32,q4", "--pipeline", item)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


_ANON_PROBE = r"""
import sys, numpy as np
from graphkit.ortrun import make_session
s = make_session(sys.argv[1], prepack=sys.argv[2] == "1")
y = s.run(None, {"x": np.ones((1, 1024), np.float32)})[0]
anon = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024
print(anon, float(y.sum()))
"""


def test_reference_session_maps_weights_instead_of_packing(tmp_path):
    """The fp32 reference of verify / convert's agreement check opens its session with prepack=False: the weights
    stay in onnxruntime's memory map of the external data instead of a packed anonymous copy (at 1.5B: 6.1 GB of
    anonymous memory less, 29 s -> 2 s to load), with the same outputs."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((1024, 65536), dtype=np.float32) * 0.01   # 256 MiB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 65536])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="big.onnx_data")
    del w
    out = {}
    for prepack in ("1", "0"):
        res = subprocess.run([sys.executable, "-c", _ANON_PROBE, str(path), prepack], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-1000:]
        anon, total = res.stdout.split()
        out[prepack] = (int(anon), float(total))
    assert out["1"][0] > 200 * 2**20, out          # the packed copy of the 256 MiB weight
    assert out["0"][0] < out["1"][0] - 150 * 2**20, out
    assert abs(out["0"][1] - out["1"][1]) <= 1e-3 * max(1.0, abs(out["1"][1])), out



def test_agreement_leaves_large_fp16_to_verify(tmp_path, monkeypatch):
    """Above AGREEMENT_MAX_FP16_BYTES convert's agreement check skips fp16 (onnxruntime CPU would build a float32
    copy of it) and says how to check it; the other variants are still checked."""
    from graphkit import convert as conv
    monkeypatch.setattr(conv, "AGREEMENT_MAX_FP16_BYTES", 0)
    summary = conv.convert(EXAMPLE / "base", tmp_path / "out", EXAMPLE / "adapter", ["fp32", "fp16", "q8"])
    by = {d["dtype"]: d for d in summary["dtypes"]}
    assert by["fp16"]["ok"] and by["fp16"]["top1_vs_fp32"] is None
    assert "graphkit verify" in by["fp16"]["agreement_note"] and str(tmp_path / "out") in by["fp16"]["agreement_note"]
    assert by["q8"]["top1_vs_fp32"] is not None and by["q8"]["agreement_note"] is None


def test_convert_refuses_to_start_without_disk_space(tmp_path, monkeypatch):
    """Not enough free disk beside the output for the export + the requested files: a clear error before any work,
    nothing written."""
    import shutil as _shutil
    from graphkit import convert as conv
    from graphkit.errors import GraphkitError
    real = _shutil.disk_usage
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    with pytest.raises(GraphkitError, match=r"GB of disk free, but fp32, q4 need at least"):
        conv.convert(EXAMPLE / "base", tmp_path / "out", EXAMPLE / "adapter", ["fp32", "q4"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
