"""The torch.onnx tracing both exports share: the flat-cache wrapper, sample inputs, the dynamo call with
Transformers.js names and dims, and the finishing of the traced graph (I/O dims, static KV check, metadata).

``graphkit.export`` (in memory, weights loaded) and ``graphkit.stream_export`` (traced without weights) both
import from here; neither imports the other's internals.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from graphkit.errors import GraphkitError
from graphkit.tjs_contract import (ATTENTION_MASK, BATCH, INPUT_IDS, KV_PREFIXES, PAST_SEQUENCE, POSITION_IDS, SEQUENCE,
                                   TOTAL_SEQUENCE, axes_of, io_names)

WRAPPER_PREFIX = "m."  # FlatCacheDecoder keeps the model as ``self.m``: its weights are named ``m.<state-dict key>``


def flat_cache_wrapper(model):
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


def export_torchscript(wrapper, args, path: Path, num_layers: int) -> None:
    import torch
    ins, outs = io_names(num_layers)
    axes = {n: dict(axes_of(n)) for n in ins + outs}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=ins, output_names=outs,
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True)


def export_dynamo(wrapper, args, path: Path, num_layers: int) -> None:
    dynamo_program(wrapper, args, num_layers).save(str(path), external_data=True)


def dynamo_program(wrapper, args, num_layers: int, optimize: bool = True):
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


def finalize(onnx_model: onnx.ModelProto, config, exporter: str) -> onnx.ModelProto:
    strip_trace_metadata(onnx_model)
    normalize_io(onnx_model)
    check_static_kv(onnx_model, *kv_shape(config))
    onnx_model.producer_name = "graphkit"
    meta = onnx_model.metadata_props.add()
    meta.key, meta.value = "graphkit.exporter", exporter
    return onnx_model
