"""Pass spec parsing, the pass runner, and safe/atomic model I/O."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphkit.errors import GraphkitError
from graphkit.modelio import load_model, save_model
from graphkit.pipeline import parse_spec, run_passes
from tiny_decoder import matmul_model


def test_parse_spec_order_and_options():
    passes = parse_spec("kv-rename, matmul-nbits(bits=8, block_size=64, symmetric=false), fp16")
    assert [p.name for p in passes] == ["kv-rename", "matmul-nbits", "fp16"]
    assert passes[1].options.bits == 8 and passes[1].options.block_size == 64 and passes[1].options.symmetric is False


@pytest.mark.parametrize("spec,needle", [
    ("nope", "unknown pass 'nope'"),
    ("matmul-nbits(color=red)", "unknown option 'color'"),
    ("matmul-nbits(bits=four)", "expected an integer"),
    ("matmul-nbits(bits=4", "missing ')'"),
    ("", "empty pass spec"),
    ("matmul-nbits(bits=3)", "bits"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(GraphkitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


def test_run_passes_reports_each_pass():
    model, reports = run_passes(matmul_model(), parse_spec("kv-rename,matmul-nbits(bits=4,block_size=32)"))
    assert [r.modified for r in reports] == [False, True]
    assert "not applicable" in reports[0].summary
    assert reports[1].checked == "checker ok, shapes ok"
    assert reports[1].bytes_after < reports[1].bytes_before
    assert "matmul-nbits" in reports[1].line()


def test_save_external_data_roundtrip(tmp_path):
    m = matmul_model()
    files = save_model(m, tmp_path / "m.onnx", external_data=True)
    assert [f.name for f in files] == ["m.onnx", "m.onnx_data"]
    raw = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert {e.value for e in raw.graph.initializer[0].external_data if e.key == "location"} == {"m.onnx_data"}
    again = load_model(tmp_path / "m.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(again.graph.initializer[0]),
                                  numpy_helper.to_array(m.graph.initializer[0]))
    # the caller's model is left in memory as it was
    assert m.graph.initializer[0].data_location == TensorProto.DEFAULT and m.graph.initializer[0].raw_data


def test_chunked_external_data(tmp_path):
    m = matmul_model()
    w2 = numpy_helper.from_array(np.ones((64, 48), np.float32), "w2")
    m.graph.initializer.append(w2)
    m.graph.node.append(helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2"))
    m.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch_size", 48]))
    files = save_model(m, tmp_path / "m.onnx", external_data=True, max_chunk_bytes=64 * 48 * 4 + 100)
    assert [f.name for f in files] == ["m.onnx", "m.onnx_data", "m.onnx_data_1"]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), np.float32)
    y, y2 = sess.run(None, {"x": x})
    np.testing.assert_allclose(y2, np.full((1, 48), 64.0), rtol=1e-6)


def test_resave_removes_stale_chunks(tmp_path):
    save_model(matmul_model(), tmp_path / "m.onnx", external_data=True)
    save_model(matmul_model(), tmp_path / "m.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../x"])
def test_external_location_outside_folder_refused(tmp_path, location):
    save_model(matmul_model(), tmp_path / "m.onnx", external_data=True)
    raw = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for e in raw.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    onnx.save(raw, str(tmp_path / "m.onnx"))
    with pytest.raises(GraphkitError, match="outside the model folder"):
        load_model(tmp_path / "m.onnx")


def test_external_symlink_out_refused(tmp_path):
    (tmp_path / "a").mkdir()
    save_model(matmul_model(), tmp_path / "m.onnx", external_data=True)
    os.replace(tmp_path / "m.onnx_data", tmp_path / "a" / "real")
    os.replace(tmp_path / "m.onnx", tmp_path / "a" / "m.onnx")
    (tmp_path / "b").mkdir()
    os.replace(tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx")
    os.symlink(tmp_path / "a" / "real", tmp_path / "b" / "m.onnx_data")
    with pytest.raises(GraphkitError, match="link that leaves"):
        load_model(tmp_path / "b" / "m.onnx")


def test_truncated_external_data(tmp_path):
    save_model(matmul_model(), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx_data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(GraphkitError, match="truncated"):
        load_model(tmp_path / "m.onnx")


def test_truncated_onnx(tmp_path):
    save_model(matmul_model(), tmp_path / "m.onnx")
    p = tmp_path / "m.onnx"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(GraphkitError, match="m.onnx"):
        load_model(p)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "graphkit", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_apply_and_passes(tmp_path):
    save_model(matmul_model(), tmp_path / "in.onnx")
    res = _cli("apply", tmp_path / "in.onnx", "-o", tmp_path / "out.onnx", "--passes", "matmul-nbits(bits=4,block_size=32)", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["passes"][0]["modified"] and rep["passes"][0]["nodes_after"] == 1
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node] == ["MatMulNBits"]
    listing = _cli("passes", "--json")
    names = json.loads(listing.stdout)
    assert {"kv-rename", "matmul-nbits", "fp16"} <= set(names)
    assert all(v["tolerance"] for v in names.values())


def test_cli_apply_unknown_pass_leaves_nothing(tmp_path):
    save_model(matmul_model(), tmp_path / "in.onnx")
    res = _cli("apply", tmp_path / "in.onnx", "-o", tmp_path / "out.onnx", "--passes", "quantize-everything")
    assert res.returncode == 2 and "unknown pass" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_cli_help_lists_commands():
    res = _cli("--help")
    for cmd in ("export", "apply", "passes", "convert", "verify"):
        assert cmd in res.stdout
