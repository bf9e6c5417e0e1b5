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
from graphkit.tjs_contract import (ATTENTION_MASK, BATCH, INPUT_IDS, KV_PREFIXES, PAST_SEQUENCE, POSITION_IDS, SEQUENCE,
                                   TOTAL_SEQUENCE, axes_of, io_names)

Exporter = Literal["dynamo", "torchscript"]


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    num_layers = model.config.num_hidden_layers

    class FlatCacheDecoder(torch.nn.Module):
        """Takes the past as flat tensors, returns logits and the flat present."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, return_dict=True)
            layers = out.past_key_values.layers[:num_layers]
            return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])

    return FlatCacheDecoder(model).eval()


def kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def sample_inputs(config, batch: int = 2, seq: int = 4, past: int = 3):
    """Trace inputs: past length > 1 so the exporter does not specialise on 0/1."""
    import torch
    kv_heads, head_dim = kv_shape(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, head_dim, generator=g) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, pos, *kv)


def _export_torchscript(wrapper, args, path: Path, num_layers: int) -> None:
    import torch
    ins, outs = io_names(num_layers)
    axes = {n: dict(axes_of(n)) for n in ins + outs}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=ins, output_names=outs,
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True)


def _export_dynamo(wrapper, args, path: Path, num_layers: int) -> None:
    _dynamo_program(wrapper, args, num_layers).save(str(path), external_data=True)


def _dynamo_program(wrapper, args, num_layers: int, optimize: bool = True):
    """torch.onnx.export(dynamo=True) with Transformers.js I/O names and dynamic dims; the ONNXProgram."""
    import torch
    from torch.export import Dim
    ins, outs = io_names(num_layers)
    batch = Dim(BATCH, min=1, max=1024)
    seq = Dim(SEQUENCE, min=1, max=32768)
    past = Dim(PAST_SEQUENCE, min=0, max=32768)
    total = Dim(TOTAL_SEQUENCE, min=1, max=65536)
    shapes = {INPUT_IDS: {0: batch, 1: seq}, ATTENTION_MASK: {0: batch, 1: total},
              POSITION_IDS: {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers))}
    import logging
    import warnings
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(wrapper, args, None, dynamo=True, dynamic_shapes=shapes, input_names=ins,
                                 output_names=outs, optimize=optimize, opset_version=18, verbose=False)


def normalize_io(model: onnx.ModelProto) -> None:
    """Name every dynamic dim of the graph I/O the way Transformers.js expects."""
    def set_dims(vi, names: dict[int, str]) -> None:
        dims = vi.type.tensor_type.shape.dim
        for idx, name in names.items():
            if idx < len(dims) and not dims[idx].HasField("dim_value"):
                dims[idx].dim_param = name
    for vi in list(model.graph.input) + list(model.graph.output):
        axes = axes_of(vi.name)
        if axes:
            set_dims(vi, axes)


def check_static_kv(model: onnx.ModelProto, kv_heads: int, head_dim: int) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name.startswith(KV_PREFIXES):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) != 4 or dims[1].dim_value != kv_heads or dims[3].dim_value != head_dim:
                shown = [d.dim_value or d.dim_param for d in dims]
                raise GraphkitError(f"export produced {vi.name} with shape {shown}; expected [batch_size, {kv_heads}, seq, {head_dim}]")


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
        onnx_model = _finalize(load_model(raw), config, exporter)
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
        return _finalize(load_model(path), model.config, exporter)


def _export_to_file(model, exporter: Exporter, path: Path, step) -> None:
    import torch
    config = model.config
    wrapper = _wrapper(model)
    args = sample_inputs(config)
    step(f"exporting with torch.onnx ({exporter})")
    try:
        with torch.no_grad():
            if exporter == "torchscript":
                _export_torchscript(wrapper, args, path, config.num_hidden_layers)
            elif exporter == "dynamo":
                _export_dynamo(wrapper, args, path, config.num_hidden_layers)
            else:
                raise GraphkitError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    except GraphkitError:
        raise
    except Exception as exc:
        raise GraphkitError(f"torch.onnx.export failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})") from None


def strip_trace_metadata(model: onnx.ModelProto) -> None:
    """Drop torch.onnx's per-node debugging metadata (``pkg.torch.onnx.*`` stack traces with absolute source paths
    and line numbers, ``namespace``): it leaks the converting machine's paths into the shipped files and made the
    same model's bytes depend on where graphkit is installed."""
    def strip(props) -> None:
        keep = [p for p in props if not (p.key.startswith("pkg.torch.") or p.key == "namespace")]
        if len(keep) != len(props):
            kept = [(p.key, p.value) for p in keep]
            del props[:]
            for k, v in kept:
                props.add(key=k, value=v)
    strip(model.graph.metadata_props)  # the ExportedProgram's signature and range constraints
    for graph in [model.graph] + [f for f in model.functions]:
        for n in graph.node:
            strip(n.metadata_props)
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        strip(vi.metadata_props)
    for t in model.graph.initializer:
        strip(t.metadata_props)


def _finalize(onnx_model: onnx.ModelProto, config, exporter: str) -> onnx.ModelProto:
    strip_trace_metadata(onnx_model)
    normalize_io(onnx_model)
    check_static_kv(onnx_model, *kv_shape(config))
    onnx_model.producer_name = "graphkit"
    meta = onnx_model.metadata_props.add()
    meta.key, meta.value = "graphkit.exporter", exporter
    return onnx_model
