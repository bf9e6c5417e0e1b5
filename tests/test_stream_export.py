"""The streaming export (trace without weights, write them one tensor at a time) against the
in-memory export with peft's merge: same graph, same initializers, same logits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE
from graphkit.errors import GraphkitError
from tiny_decoder import build_tiny_model


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None].repeat(len(ids), 0)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros([len(ids), i.shape[1], 0, i.shape[3]], np.float32)
    return sess.run(["logits"], feed)[0]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


def _compare(a: Path, b: Path, vocab: int, same_names: bool = True) -> None:
    """``same_names=False`` for fresh random models: the exporter's optimizer merges initializers with
    equal values (all-ones norms) when it has the values, the streamed trace cannot."""
    ma, mb = onnx.load(str(a), load_external_data=False), onnx.load(str(b), load_external_data=False)
    assert [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]
    ia, ib = _initializers(a), _initializers(b)
    if not same_names:
        shared = ia.keys() & ib.keys()
        assert sum(v.size for k, v in ib.items() if k not in shared) <= 4096  # only small norm/bias tensors differ
        ia, ib = {k: ia[k] for k in shared}, {k: ib[k] for k in shared}
    assert ia.keys() == ib.keys()
    worst = max(float(np.abs(ia[k].astype(np.float64) - ib[k]).max()) if ia[k].size else 0.0 for k in ia)
    assert worst <= 1e-6, worst
    ids = np.random.default_rng(0).integers(0, vocab, (2, 7))
    assert np.abs(_logits(a, ids) - _logits(b, ids)).max() <= 1e-5


def test_streamed_equals_in_memory_with_shipped_adapter(tmp_path, exported_example):
    from graphkit.export import export_model
    ref = tmp_path / "mem" / "model.onnx"
    summary = export_model(EXAMPLE / "base", ref, EXAMPLE / "adapter", stream=False)
    assert summary["exporter"] == "dynamo"
    meta = {p.key: p.value for p in onnx.load(str(exported_example), load_external_data=False).metadata_props}
    assert meta.get("graphkit.weights") == "streamed"  # the fixture (default export) streamed
    _compare(exported_example, ref, 2048)


def test_streamed_merge_handles_rank_and_alpha_patterns_and_rslora(tmp_path):
    """peft's scaling rules (rank_pattern, alpha_pattern, use_rslora) reproduced exactly."""
    import torch
    from peft import LoraConfig, get_peft_model

    from graphkit.export import export_model
    from graphkit.hfmodel import load_causal_lm
    base = build_tiny_model(tmp_path / "base", "qwen2")
    model, _ = load_causal_lm(base)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: make the delta visible
    peft_model.save_pretrained(tmp_path / "adapter")
    streamed, ref = tmp_path / "s" / "model.onnx", tmp_path / "m" / "model.onnx"
    assert export_model(base, streamed, tmp_path / "adapter")["exporter"] == "dynamo-streaming"
    export_model(base, ref, tmp_path / "adapter", stream=False)
    _compare(streamed, ref, 512, same_names=False)
    base_only = tmp_path / "b" / "model.onnx"
    export_model(base, base_only)
    ids = np.random.default_rng(0).integers(0, 512, (1, 5))
    assert np.abs(_logits(streamed, ids) - _logits(base_only, ids)).max() > 1e-3  # the adapter did something


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_streamed_other_architectures(tmp_path, model_type):
    """Untied lm_head (llama) and q/k norms (qwen3) take the same streaming path."""
    from graphkit.export import export_model
    base = build_tiny_model(tmp_path / "base", model_type)
    streamed, ref = tmp_path / "s" / "model.onnx", tmp_path / "m" / "model.onnx"
    assert export_model(base, streamed)["exporter"] == "dynamo-streaming"
    export_model(base, ref, stream=False)
    _compare(streamed, ref, 512, same_names=False)


def test_unsupported_adapter_falls_back_to_in_memory(tmp_path):
    """DoRA is not merged by the streaming path: the export says so and uses peft in memory."""
    import torch
    from peft import LoraConfig, get_peft_model

    from graphkit.convert import _export
    from graphkit.hfmodel import load_causal_lm
    base = build_tiny_model(tmp_path / "base", "qwen2")
    model, _ = load_causal_lm(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    notes: list[str] = []
    out = tmp_path / "x" / "model.onnx"
    _export(base, out, tmp_path / "adapter", "dynamo", True, notes.append)
    assert any("use_dora" in n and "in memory" in n for n in notes), notes
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert "graphkit.weights" not in meta


def test_missing_weight_is_a_clear_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    from graphkit.stream_export import export_streaming
    base = build_tiny_model(tmp_path / "base", "qwen2")
    weights = load_file(str(base / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(base / "model.safetensors"))
    with pytest.raises(GraphkitError, match="up_proj.weight"):
        export_streaming(base, tmp_path / "o" / "model.onnx")
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_bf16_checkpoint_streams_as_float32(tmp_path):
    """Hub checkpoints are bf16: read, widened to fp32, equal to transformers' own fp32 load."""
    import torch
    import transformers

    from graphkit.export import export_model
    base = build_tiny_model(tmp_path / "base", "qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    streamed, ref = tmp_path / "s" / "model.onnx", tmp_path / "m" / "model.onnx"
    export_model(tmp_path / "bf16", streamed)
    export_model(tmp_path / "bf16", ref, stream=False)
    _compare(streamed, ref, 512, same_names=False)


def test_lazy_model_through_passes_and_in_place_apply(tmp_path, exported_example):
    """A lazily loaded model keeps its weights on disk through the passes; save copies untouched
    tensors file to file, also when the output replaces the input."""
    import subprocess
    import sys

    from graphkit import tensors
    from graphkit.modelio import load_model, save_model
    src = tmp_path / "m.onnx"
    save_model(load_model(exported_example), src, external_data=True, max_chunk_bytes=1 << 20)
    assert len(list(tmp_path.glob("m.onnx_data*"))) > 1
    before = _initializers(src)
    lazy = load_model(src, load_external="lazy")
    assert all(tensors.is_external(t) for t in lazy.graph.initializer if tensors.nbytes(t) >= 1024)
    assert all(not t.HasField("raw_data") for t in lazy.graph.initializer if tensors.is_external(t))
    big = max(lazy.graph.initializer, key=tensors.nbytes)
    np.testing.assert_array_equal(tensors.array(big), before[big.name])
    assert not big.HasField("raw_data")  # reading did not pull the data into the proto
    ids = np.random.default_rng(1).integers(0, 2048, (1, 6))
    ref = _logits(src, ids)
    res = subprocess.run([sys.executable, "-m", "graphkit", "apply", str(src), "-o", str(src), "--passes",
                          "matmul-nbits(bits=8,block_size=32)", "--external-data"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    after = onnx.load(str(src), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in after.graph.node) >= 28
    assert np.abs(_logits(src, ids) - ref).max() < 0.5  # 8-bit weights: close (stale or misread data: far off)


@pytest.mark.parametrize("spec", ["fp16", "matmul-nbits(bits=4,block_size=32)", "matmul-int8(quantize_embedding_gather=true)",
                                  "pack-matmul", "fuse-rmsnorm,fuse-rotary,fuse-gqa(padding=bias),pack-matmul,pack-gqa"])
def test_passes_keep_weights_out_of_memory(tmp_path, exported_example, monkeypatch, spec):
    """Memory-frugal contract: on a lazily loaded model inside spill_to, no pass puts a large weight
    into the proto (it reads the ones it changes from disk and stages the new ones on disk), and the
    saved result equals the in-memory run."""
    from graphkit import tensors
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes
    monkeypatch.setattr(tensors, "SPILL_MIN_BYTES", 4096)
    src = tmp_path / "src.onnx"
    save_model(load_model(exported_example), src, external_data=True)
    with tensors.spill_to(tmp_path / "spill"):
        lazy, _ = run_passes(load_model(src, load_external="lazy"), parse_spec(spec))
        in_memory = [t.name for t in lazy.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= 4096]
        assert not in_memory, in_memory
        save_model(lazy, tmp_path / "lazy.onnx")
    eager, _ = run_passes(load_model(src), parse_spec(spec))
    save_model(eager, tmp_path / "eager.onnx")
    a, b = _initializers(tmp_path / "lazy.onnx"), _initializers(tmp_path / "eager.onnx")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
