"""The one place tests build models: a tiny decoder, and one pure-onnx builder for pattern graphs.

- ``build_tiny_model``: the smallest Qwen2-shaped Hugging Face decoder (2 layers, hidden 64, 4 query / 2 KV
  heads of 16, vocab 512, tied head; also ``qwen3`` and ``llama``), random weights from a fixed seed, saved as
  a model folder (config.json + safetensors). ``perturb`` draws the RMSNorm weights and the q/k/v biases too
  (from_config leaves them 1 and 0), so a rewrite that drops or misplaces one shows in the logits.
- ``TinyDecoders`` (the session-scoped ``tiny_decoder`` fixture in conftest.py): that decoder exported with
  graphkit's real exporter (``graphkit.export.export_model``, in memory, either torch exporter), built once per
  session per (architecture, exporter, options) and shared by every test file that asks for the same one.
  Each ``TinyDecoder`` gives a fresh ``ModelProto`` per ``model()`` call (tests may edit it), the file in the
  Transformers.js layout (``<folder>/onnx/model.onnx``) and the Hugging Face folder it came from.
- ``make_model`` / ``vi``: the smallest hand-built graphs the pass unit tests start from (one builder, with
  options for opset, extra domains, IR version and the checker); ``matmul_model``: y = x @ w (+ b), the smallest
  graph a quantization pass (and the pipeline, apply and the file-safety tests) runs on.

Shared model-free test helpers (running a graph in onnxruntime, op counts, the attention block) live in
``tests/graph_helpers.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, initializer_range=0.2, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_config(model_type: str = "qwen2", **overrides):
    """The tiny decoder's transformers config; ``overrides`` set any config attribute."""
    import transformers
    common = dict(TINY)
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=1e6, **common)
    elif model_type == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=32, rope_theta=1e6, **common)
    elif model_type == "llama":
        common["tie_word_embeddings"] = False
        cfg = transformers.LlamaConfig(rope_theta=5e5, **common)
    else:
        raise ValueError(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def perturb_norms_and_biases(model, seed: int = 1) -> None:
    """RMSNorm weights 1 + 0.3·N(0,1) and biases 0.3·N(0,1), in ``named_parameters`` order (deterministic)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def build_tiny_model(folder: Path, model_type: str = "qwen2", seed: int = 0, perturb: bool = False,
                     **overrides) -> Path:
    """A tiny random-weight model folder of the given architecture (config.json + safetensors)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    if perturb:
        perturb_norms_and_biases(model)
    model.save_pretrained(folder)
    return Path(folder)


@dataclass(frozen=True)
class TinyDecoder:
    """One exported tiny decoder: ``name`` like ``qwen2-torchscript``."""
    name: str
    arch: str
    exporter: str
    folder: Path      # the Hugging Face model folder it was exported from
    path: Path        # <folder>/onnx/model.onnx, the Transformers.js layout
    layers: int
    _bytes: bytes = field(repr=False)

    def model(self) -> onnx.ModelProto:
        """A fresh copy: tests may edit it freely."""
        return onnx.ModelProto.FromString(self._bytes)

    def torch_model(self):
        """The float32 transformers model the file was exported from."""
        from graphkit.hfmodel import load_causal_lm
        return load_causal_lm(self.folder)[0]


class TinyDecoders:
    """Session cache of exported tiny decoders (the ``tiny_decoder`` fixture)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._built: dict[tuple, TinyDecoder] = {}

    def __call__(self, arch: str = "qwen2", exporter: str = "torchscript", *, perturb: bool = True,
                 **overrides) -> TinyDecoder:
        """The tiny ``arch`` decoder exported with ``exporter`` (dynamo | torchscript), built on first use.

        ``perturb`` (default): norm weights and q/k/v biases drawn, not 1 / 0; ``overrides``: config
        attributes (a different key builds a different model)."""
        key = (arch, exporter, perturb, tuple(sorted(overrides.items())))
        if key not in self._built:
            from graphkit.export import export_model
            name = f"{arch}-{exporter}" + ("" if perturb else "-plain") + "".join(
                f"-{k}={v}" for k, v in sorted(overrides.items()))
            folder = build_tiny_model(self.root / name, arch, perturb=perturb, **overrides)
            path = folder / "onnx" / "model.onnx"
            summary = export_model(folder, path, exporter=exporter, stream=False)
            self._built[key] = TinyDecoder(name, arch, exporter, folder, path, int(summary["num_layers"]),
                                           onnx.load(str(path)).SerializeToString())
        return self._built[key]


# ----------------------------------------------------------------------------- hand-built pattern graphs
def vi(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    """A graph input/output: ``shape`` None = unknown rank; str entries are symbolic dims."""
    return helper.make_tensor_value_info(name, elem_type, shape)


def make_model(nodes: Iterable[onnx.NodeProto], inputs, outputs, inits=None, *, opset: int = 18,
               domains: dict[str, int] | None = None, ir_version: int | None = None, name: str = "g",
               check: bool = False) -> onnx.ModelProto:
    """A model from nodes; ``inits``: {name: array} or TensorProtos. ``com.microsoft`` (version 1) is imported
    when a node uses it; ``domains`` adds or pins other opset imports. ``ir_version`` None keeps onnx's default;
    ``check`` runs onnx.checker."""
    nodes = list(nodes)
    if isinstance(inits, dict):
        tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    else:
        tensors = list(inits or ())
    imports = {"": opset}
    if any(n.domain == "com.microsoft" for n in nodes):
        imports["com.microsoft"] = 1
    imports.update(domains or {})
    m = helper.make_model(helper.make_graph(nodes, name, list(inputs), list(outputs), tensors),
                          opset_imports=[helper.make_opsetid(d, v) for d, v in imports.items()])
    if ir_version is not None:
        m.ir_version = ir_version
    if check:
        onnx.checker.check_model(m)
    return m


def matmul_model(k: int = 64, n: int = 48, seed: int = 0, *, weight: np.ndarray | None = None,
                 bias: bool = False) -> onnx.ModelProto:
    """y = x @ w (+ b), x: [batch_size, k], opset 17. ``w`` ~ N(0, 1) from ``seed`` unless ``weight`` is given (its
    shape then sets k, n); ``bias``: b ~ N(0, 1) from ``seed + 1`` added after the MatMul (node names mm, add)."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) if weight is None else weight
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm" if bias else "y"], name="mm")]
    inits = {"w": w}
    if bias:
        inits["b"] = np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="add"))
    return make_model(nodes, [vi("x", onnx.TensorProto.FLOAT, ["batch_size", k])],
                      [vi("y", onnx.TensorProto.FLOAT, ["batch_size", n])], inits, opset=17)
