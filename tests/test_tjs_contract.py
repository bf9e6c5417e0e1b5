"""graphkit.tjs_contract: the one place that says what Transformers.js expects (names, dims, files, config keys)."""
from __future__ import annotations

from graphkit import tjs_contract as tjs


def test_file_names_follow_the_suffix_mapping():
    assert tjs.DTYPE_FILES["fp32"] == "model.onnx" and tjs.DTYPE_FILES["q8"] == "model_quantized.onnx"
    for dtype, name in tjs.DTYPE_FILES.items():
        assert tjs.split_file_name(name) == ("model", dtype)
    assert tjs.split_file_name("decoder_model_merged_q4f16.onnx") == ("decoder_model_merged", "q4f16")
    assert str(tjs.variant_path("out", "q4f16")).endswith("out/onnx/model_q4f16.onnx")


def test_external_data_names_round_trip():
    names = [tjs.external_data_name("model_q4.onnx", i) for i in range(3)]
    assert names == ["model_q4.onnx_data", "model_q4.onnx_data_1", "model_q4.onnx_data_2"]
    pat = tjs.external_data_pattern("model_q4.onnx")
    assert [m.group(1) for m in map(pat.match, names)] == [None, "1", "2"]
    assert not pat.match("model_q4f16.onnx_data") and not pat.match("sub/model_q4.onnx_data")


def test_io_names_and_axes():
    ins, outs = tjs.io_names(2)
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"] and ins[3] == "past_key_values.0.key"
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert [tjs.present_to_past(o) for o in outs[1:]] == ins[3:]
    assert all(tjs.PAST_RE.match(n) for n in ins[3:]) and all(tjs.PRESENT_RE.match(n) for n in outs[1:])
    assert tjs.axes_of("past_key_values.1.value") == {0: "batch_size", 2: "past_sequence_length"}
    assert tjs.axes_of("present.0.key") == {0: "batch_size", 2: "total_sequence_length"}
    assert tjs.axes_of("attention_mask") == {0: "batch_size", 1: "total_sequence_length"}
    assert tjs.axes_of("hidden") is None
