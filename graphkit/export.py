"""Export a (merged) causal LM to a Transformers.js-shaped decoder ONNX graph with KV cache.

Guarantees of the exported graph:
- inputs ``input_ids``, ``attention_mask``, ``position_ids`` (int64) and
  ``past_key_values.{i}.key/.value``; outputs ``logits`` and ``present.{i}.key/.value``;
- KV layout ``[batch_size, kv_heads, seq, head_dim]`` with kv_heads and head_dim static numbers
  (Transformers.js 4.x fills only ``batch_size`` when it builds the empty cache: every other
  symbol becomes 0);
- dynamic dims named ``batch_size``, ``sequence_length``, ``past_sequence_length``,
  ``total_sequence_length``;
- runs for past length 0 and > 0 and batch > 1 with left padding; fp32 logits within 1e-4 of PyTorch.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Literal

import onnx

from graphkit.errors import GraphkitError
from graphkit.hfmodel import load_causal_lm
from graphkit.modelio import DEFAULT_CHUNK_BYTES, PROTOBUF_LIMIT, load_model, save_model
from graphkit.tracing import export_dynamo, export_torchscript, finalize, flat_cache_wrapper, sample_inputs

Exporter = Literal["dynamo", "torchscript"]


def export_model(model_dir: str | Path, output: str | Path, adapter_dir: str | Path | None = None,
                 exporter: Exporter = "dynamo", allow_pickle: bool = False, trust_remote_code: bool = False,
                 external_data: bool | None = None, progress=None, stream: bool = True,
                 max_chunk_bytes: int | None = None) -> dict:
    """Load (and merge) the model and write the decoder ONNX atomically. Returns a summary dict.

    With ``stream`` (the default, dynamo exporter only) the graph is traced without weights and the
    weights are written one tensor at a time (``graphkit.stream_export``): peak memory about one
    embedding table instead of several copies of the model. Models or adapters it does not handle
    fall back to the in-memory export, reported through ``progress``. The streamed file always
    keeps its weights in external data (``<file>_data``)."""
    step = progress or (lambda msg: None)
    if stream and exporter == "dynamo" and not allow_pickle and not trust_remote_code:
        from graphkit.hfmodel import check_model_dir
        from graphkit.stream_export import SafetensorsWeights, StreamingUnsupported, export_streaming
        output = Path(output)
        try:
            check_model_dir(Path(model_dir))  # clear errors before the headers are read
            fp32_bytes = SafetensorsWeights(Path(model_dir)).fp32_nbytes()
            if external_data or (external_data is None and fp32_bytes > PROTOBUF_LIMIT - 64 * 2**20):
                # external data either way: stream straight into place, no second copy
                return export_streaming(Path(model_dir), output, Path(adapter_dir) if adapter_dir else None,
                                        max_chunk_bytes=max_chunk_bytes, progress=step)
            with tempfile.TemporaryDirectory(prefix="graphkit-export-", dir=_scratch_dir(output)) as tmp:
                summary = export_streaming(Path(model_dir), Path(tmp) / "model.onnx",
                                           Path(adapter_dir) if adapter_dir else None, progress=step)
                step(f"writing {output}")
                written = save_model(load_model(Path(tmp) / "model.onnx", load_external="lazy"), output,
                                     external_data=external_data, max_chunk_bytes=max_chunk_bytes or DEFAULT_CHUNK_BYTES)
            summary.update(output=str(output), files=[str(p) for p in written])
            return summary
        except StreamingUnsupported as exc:
            step(f"streaming export not possible ({exc}); exporting in memory instead")
    return _export_in_memory(model_dir, output, adapter_dir, exporter, allow_pickle, trust_remote_code,
                             external_data, step)


def _export_in_memory(model_dir, output, adapter_dir, exporter: Exporter, allow_pickle: bool,
                      trust_remote_code: bool, external_data: bool | None, step) -> dict:
    """Memory: the torch model is freed before the ONNX graph is read back, so the two full copies of
    the weights never coexist with the exporter's own."""
    import gc
    output = Path(output)
    t0 = time.perf_counter()
    step("loading model" + (" and merging adapter" if adapter_dir else ""))
    model, _ = load_causal_lm(Path(model_dir), Path(adapter_dir) if adapter_dir else None, allow_pickle, trust_remote_code)
    t_load = time.perf_counter() - t0
    config = model.config
    with tempfile.TemporaryDirectory(prefix="graphkit-export-", dir=_scratch_dir(output)) as tmp:
        raw = Path(tmp) / "model.onnx"
        _export_to_file(model, exporter, raw, step)
        del model
        gc.collect()
        onnx_model = finalize(load_model(raw), config, exporter)
    step(f"writing {output}")
    written = save_model(onnx_model, output, external_data=external_data)
    return {"output": str(output), "files": [str(p) for p in written], "exporter": exporter,
            "load_s": round(t_load, 2), "total_s": round(time.perf_counter() - t0, 2),
            "num_layers": config.num_hidden_layers}


def _scratch_dir(output: Path) -> str | None:
    """Export scratch beside the output when possible (same disk as the result, not a small /tmp)."""
    parent = output.parent if str(output.parent) else Path(".")
    return str(parent) if parent.is_dir() else None


def export_loaded(model, exporter: Exporter = "dynamo", progress=None) -> onnx.ModelProto:
    """Export an already-loaded transformers causal LM; returns the ONNX model in memory."""
    with tempfile.TemporaryDirectory(prefix="graphkit-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        _export_to_file(model, exporter, path, progress or (lambda msg: None))
        return finalize(load_model(path), model.config, exporter)


def _export_to_file(model, exporter: Exporter, path: Path, step) -> None:
    import torch
    config = model.config
    wrapper = flat_cache_wrapper(model)
    args = sample_inputs(config)
    step(f"exporting with torch.onnx ({exporter})")
    try:
        with torch.no_grad():
            if exporter == "torchscript":
                export_torchscript(wrapper, args, path, config.num_hidden_layers)
            elif exporter == "dynamo":
                export_dynamo(wrapper, args, path, config.num_hidden_layers)
            else:
                raise GraphkitError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    except GraphkitError:
        raise
    except Exception as exc:
        raise GraphkitError(f"torch.onnx.export failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})") from None
