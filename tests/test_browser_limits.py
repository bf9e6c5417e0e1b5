"""graphkit.browser_limits: the browser limits a written file breaks, and `convert` warning about them at write time.

The limits are checked at their real sizes on small synthetic graphs whose big weights live in sparse external-data
files (a 4 GiB tensor costs no disk): WebGPU's 128 MiB storage-buffer binding (lavapipe's maximum; measured in
benchmarks/RESULTS.md `browser-1.5b`) and wasm32's 4 GiB memory.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphkit import browser_limits
from graphkit.modelio import load_model


def _graph_with_table(folder, rows: int, cols: int, dtype=TensorProto.FLOAT, name="model.onnx"):
    """Gather(table[rows, cols], ids) with the table in a sparse external-data file."""
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(dtype)).itemsize
    length = rows * cols * itemsize
    with open(folder / (name + "_data"), "wb") as fh:
        fh.truncate(length)  # sparse: no disk blocks
    table = TensorProto(name="embed.weight", data_type=dtype, dims=[rows, cols])
    table.data_location = TensorProto.EXTERNAL
    for k, v in (("location", name + "_data"), ("offset", "0"), ("length", str(length))):
        table.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Gather", ["embed.weight", "ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "S"])],
                              [helper.make_tensor_value_info("out", dtype, [1, "S", cols])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / name))
    return load_model(folder / name, load_external="lazy")


def test_wasm32_memory_limit(tmp_path):
    model = _graph_with_table(tmp_path, 2**20, 2**10 + 1)  # 4.004 GiB of float32 in one tensor
    (msg,) = browser_limits.check(model, "fp32")
    assert "device 'wasm'" in msg and "4 GiB" in msg and "q4f16" in msg  # the limit and the alternative


def test_under_the_limits_no_warning(tmp_path):
    model = _graph_with_table(tmp_path, 2**20, 2**10 - 1)  # just under 4 GiB
    assert browser_limits.check(model, "q4f16") == []


@pytest.mark.slow
def test_convert_warns_at_write_time(tmp_path, monkeypatch, capsys):
    """The wiring: `convert` checks every file as it writes it, prints the warning and records it in --json's output.
    The tiny model's ~420 KiB of float32 weights break the limit scaled down to 200 KiB; its q4f16 file does not."""
    from tiny_decoder import build_tiny_model
    from graphkit.convert import convert, render
    monkeypatch.setattr(browser_limits, "WASM32_MEMORY_BYTES", 200 * 1024)
    model_dir = build_tiny_model(tmp_path / "tiny")
    (model_dir / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    lines: list[str] = []
    summary = convert(model_dir, tmp_path / "out", dtypes=["fp32", "q4f16"], check_agreement=False, calibration="none",
                      progress=lines.append)
    warned = {d["dtype"]: d["warnings"] for d in summary["dtypes"]}
    assert warned["q4f16"] is None, warned
    assert warned["fp32"] and "device 'wasm'" in warned["fp32"][0], warned
    assert any("WARNING: onnx/model.onnx:" in ln and "device 'wasm'" in ln for ln in lines), lines
    json.dumps(summary)  # --json prints this
    render(summary)
    assert "warning: onnx/model.onnx:" in capsys.readouterr().out
