"""Memory-frugal export: trace the decoder without weights, then stream them in one tensor at a time.

The in-memory export (``graphkit.export``) loads the whole model in float32, lets peft merge the
adapter, and the exporter then keeps its own copies: about 4x the fp32 weights at peak. Here:

1. the model is built under ``FakeTensorMode`` from ``config.json`` (no weight memory at all) and
   traced by the same ``torch.onnx.export(dynamo=True)`` call, so the graph is the one the in-memory
   export writes (same ops, same I/O, same initializer names);
2. every weight initializer is left without data; ``Transpose`` nodes applied to a weight (the
   exporter's ``nn.Linear``) are folded into a transposed initializer under the Transpose's output
   name, as the exporter's constant folding does when it has the values;
3. the weights are then written to external data one tensor at a time: read from safetensors
   (bf16/fp16/fp32 → fp32), LoRA delta added (``W + scaling * B @ A``, peft's merge), transposed
   where the graph wants it. Peak memory is about one embedding table plus the traced graph.

Guarantees: the result equals the in-memory export within 1e-5 on logits (a test compares both on
the shipped model with its adapter). Adapters using features this merge does not implement (DoRA,
``modules_to_save``, bias training, ``fan_in_fan_out``, …) raise :class:`StreamingUnsupported`;
``convert`` then falls back to the in-memory export and says so.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from graphkit.errors import GraphkitError
from graphkit.hfmodel import _offline_env, check_adapter_dir, check_model_dir, read_json


class StreamingUnsupported(GraphkitError):
    """The model or adapter needs the in-memory export (the message says why)."""


# Adapter config fields that change the merge math or add weights this merge does not handle.
_UNSUPPORTED_ADAPTER_FLAGS = ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "layer_replication",
                              "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config",
                              "velora_config", "use_bdlora", "megatron_config", "trainable_token_indices",
                              "target_parameters", "modules_to_save")


class SafetensorsWeights:
    """Read named tensors from a model folder's safetensors files as float32 numpy arrays.

    Each tensor is read with a plain file read into its own buffer (no memory map): a mapped file's
    pages count as the process's resident memory for as long as the map lives, which would make
    reading every weight once look like holding the whole checkpoint."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        files = sorted(model_dir.glob("*.safetensors"))
        if index.exists():
            weight_map = read_json(index, "").get("weight_map", {})
            files = sorted({model_dir / f for f in weight_map.values()})
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for key, info in header.items():
                if key != "__metadata__":
                    self._where[key] = (f, info, 8 + n)

    def keys(self) -> set[str]:
        return set(self._where)

    def fp32_nbytes(self) -> int:
        """Bytes of all tensors once widened to float32 (from the headers; nothing is read)."""
        return sum(4 * math.prod(info["shape"]) for _, info, _ in self._where.values())

    def get(self, key: str) -> np.ndarray:
        path, info, data_start = self._where[key]
        dtype = self._DTYPES.get(info["dtype"])
        if dtype is None:
            raise GraphkitError(f"{path}: tensor {key!r} has dtype {info['dtype']}; expected float weights")
        begin, end = info["data_offsets"]
        arr = np.fromfile(path, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize, offset=data_start + begin)
        if arr.nbytes != end - begin:
            raise GraphkitError(f"{path}: tensor {key!r} is truncated; re-download the file")
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32, copy=False).reshape(info["shape"])


class LoraDeltas:
    """``scaling * B @ A`` per adapted module, computed on demand (peft's merge for nn.Linear LoRA)."""

    def __init__(self, adapter_dir: Path) -> None:
        from safetensors import safe_open
        self.dir = adapter_dir
        self.cfg = check_adapter_dir(adapter_dir)
        for flag in _UNSUPPORTED_ADAPTER_FLAGS:
            if self.cfg.get(flag):
                raise StreamingUnsupported(f"{adapter_dir}: adapter uses {flag}; the streaming merge supports plain LoRA")
        if self.cfg.get("bias", "none") != "none":
            raise StreamingUnsupported(f"{adapter_dir}: adapter trains biases (bias={self.cfg['bias']!r})")
        self._file = safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt")
        self.modules: dict[str, tuple[str, str]] = {}
        pattern = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
        pairs: dict[str, dict[str, str]] = {}
        for key in self._file.keys():
            m = pattern.match(key)
            if not m:
                raise StreamingUnsupported(f"{adapter_dir}: adapter tensor {key!r} is not a LoRA A/B matrix of a linear layer")
            pairs.setdefault(m.group(1), {})[m.group(2)] = key
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise GraphkitError(f"{adapter_dir}: adapter has lora_A without lora_B (or the reverse) for {module}; re-save it")
            self.modules[module] = (ab["A"], ab["B"])

    def _pattern_value(self, patterns: dict, module: str, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def scaling(self, module: str, rank: int) -> float:
        configured = self._pattern_value(self.cfg.get("rank_pattern"), module, self.cfg.get("r", 8))
        if configured != rank:
            raise GraphkitError(f"{self.dir}: {module} has LoRA rank {rank} but adapter_config.json says {configured}")
        alpha = self._pattern_value(self.cfg.get("alpha_pattern"), module, self.cfg.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.cfg.get("use_rslora") else alpha / rank

    def delta(self, module: str, weight_shape: tuple[int, ...]):
        """The merged delta for ``module`` (a torch float32 tensor shaped like its weight) or None."""
        import torch
        if module not in self.modules:
            return None
        a = self._file.get_tensor(self.modules[module][0]).to(torch.float32)
        b = self._file.get_tensor(self.modules[module][1]).to(torch.float32)
        if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != tuple(weight_shape) or b.shape[1] != a.shape[0]:
            raise GraphkitError(f"{self.dir}: cannot merge adapter: the adapter was trained for a different base model "
                                f"(tensor shapes differ: {module} is {list(weight_shape)}, LoRA B@A is "
                                f"[{b.shape[0]}, {a.shape[1]}])")
        return (b @ a) * self.scaling(module, a.shape[0])


def trace(config, progress: Callable[[str], None]) -> tuple[onnx.ModelProto, dict[str, tuple[tuple[int, ...], str]]]:
    """Export the decoder graph with fake weights. Returns the ONNX model (weights without data) and,
    per weight initializer, (shape, state-dict key)."""
    import logging
    import warnings

    import onnx_ir as ir
    import onnxscript
    import torch
    import transformers
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from graphkit.tracing import WRAPPER_PREFIX, dynamo_program, flat_cache_wrapper, sample_inputs
    transformers.logging.set_verbosity_error()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    real_buffers = _real_buffers(model, config)
    args = tuple(mode.from_tensor(a) for a in sample_inputs(config))
    progress("tracing the decoder with torch.onnx (dynamo), weights not loaded")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            prog = dynamo_program(flat_cache_wrapper(model), args, config.num_hidden_layers, optimize=False)
    except GraphkitError:
        raise
    except Exception as exc:
        raise StreamingUnsupported(f"tracing without weights failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]})") from None

    aliases = _alias_groups(model)
    weights: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, value in prog.model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if not isinstance(raw, FakeTensor):
            continue
        key = name.removeprefix(WRAPPER_PREFIX)
        if key in real_buffers:
            value.const_value = ir.tensor(real_buffers[key], name=name)
            continue
        weights[name] = (tuple(raw.shape), aliases.get(key, key))
        value.const_value = None
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)  # "initializer has no constant value": by design here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnxscript.optimizer.optimize_ir(prog.model)
            proto = ir.serde.serialize_model(prog.model)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return proto, weights


def _real_buffers(model, config) -> dict[str, np.ndarray]:
    """Values of the buffers that are computed at construction (rotary ``inv_freq``), rebuilt for real."""
    out: dict[str, np.ndarray] = {}
    for name, module in model.named_modules():
        own = [b for b, _ in module.named_buffers(recurse=False)]
        if not own:
            continue
        if list(module.parameters(recurse=False)):
            raise StreamingUnsupported(f"module {name} ({type(module).__name__}) has both weights and computed buffers")
        try:
            real = type(module)(config=config)
        except Exception as exc:
            raise StreamingUnsupported(f"cannot rebuild {type(module).__name__} to compute its buffers ({exc})") from None
        for b in own:
            out[f"{name}.{b}" if name else b] = getattr(real, b).detach().to(dtype=getattr(real, b).dtype).numpy().copy()
    return out


def _alias_groups(model) -> dict[str, str]:
    """state-dict name → the name it shares storage with (tied embeddings): lets a missing
    ``lm_head.weight`` be read from ``model.embed_tokens.weight``."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    out: dict[str, str] = {}
    for names in groups.values():
        for n in names:
            out[n] = "|".join(names)
    return out


def fold_weight_transposes(model: onnx.ModelProto, weights: dict[str, tuple[tuple[int, ...], str]]
                           ) -> dict[str, tuple[str, list[int] | None]]:
    """Replace ``Transpose(weight)`` by a transposed weight initializer named like the Transpose's
    output, where the Transpose is the weight's only consumer (the exporter's constant folding does
    the same; a shared weight, the tied embedding, keeps its Transpose so it is stored once).
    Returns initializer name → (weight initializer it comes from, perm or None)."""
    g = model.graph
    recipes: dict[str, tuple[str, list[int] | None]] = {name: (name, None) for name in weights}
    consumers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            consumers[x] = consumers.get(x, 0) + 1
    keep = []
    for n in g.node:
        if n.op_type == "Transpose" and n.input and n.input[0] in weights and consumers[n.input[0]] == 1:
            shape = weights[n.input[0]][0]
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), list(reversed(range(len(shape)))))
            recipes[n.output[0]] = (n.input[0], perm)
            del recipes[n.input[0]]
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return recipes


def export_streaming(model_dir: Path, output: Path, adapter_dir: Path | None = None,
                     max_chunk_bytes: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Trace without weights, then write ``output`` (+ external data chunks) tensor by tensor, atomically."""
    import transformers

    from graphkit.modelio import DEFAULT_CHUNK_BYTES, ExternalDataWriter, atomic_output_dir, check_model, move_into_place
    from graphkit.tensors import set_external
    from graphkit.tracing import finalize
    step = progress or (lambda msg: None)
    _offline_env()
    t0 = time.perf_counter()
    model_dir, output = Path(model_dir), Path(output)
    check_model_dir(model_dir)
    source = SafetensorsWeights(model_dir)
    lora = LoraDeltas(Path(adapter_dir)) if adapter_dir else None
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise GraphkitError(f"{model_dir / 'config.json'}: transformers cannot read it ({exc})") from None
    proto, weights = trace(config, step)
    recipes = fold_weight_transposes(proto, weights)
    known = source.keys()
    if lora:
        adapted = {k.removesuffix(".weight") for k in known}
        foreign = sorted(set(lora.modules) - adapted)
        if foreign:
            raise GraphkitError(f"{adapter_dir}: cannot merge adapter: the adapter targets modules this base model "
                                f"does not have ({', '.join(foreign[:3])})")
    finalize(proto, config, "dynamo")
    meta = proto.metadata_props.add()
    meta.key, meta.value = "graphkit.weights", "streamed"

    inits = {t.name: t for t in proto.graph.initializer}
    order = [t.name for t in proto.graph.initializer if t.name not in recipes] + list(recipes)
    del proto.graph.initializer[:]
    step(f"writing {len(recipes)} weights one at a time" + (" with the adapter merged" if lora else ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(output.parent) as tmp:
        writer = ExternalDataWriter(tmp / output.name, max_chunk_bytes or DEFAULT_CHUNK_BYTES)
        try:
            for name in order:
                if name not in recipes:
                    proto.graph.initializer.append(inits[name])
                    continue
                base, perm = recipes[name]
                shape, key = weights[base]
                arr = _weight(source, lora, key, shape, adapter_dir)
                if perm is not None:
                    arr = np.ascontiguousarray(arr.transpose(perm))
                t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=list(arr.shape))
                location, offset, length = writer.write(arr)
                del arr
                set_external(t, location, offset, length)
                proto.graph.initializer.append(t)
        finally:
            writer.close()
        onnx_tmp = tmp / output.name
        with open(onnx_tmp, "wb") as fh:
            fh.write(proto.SerializeToString())
        check_model(proto)  # external weights stand aside as inputs (graph_skeleton): files not opened
        files = move_into_place([onnx_tmp] + writer.files, output)
    return {"output": str(output), "files": [str(f) for f in files], "exporter": "dynamo-streaming",
            "total_s": round(time.perf_counter() - t0, 2), "num_layers": config.num_hidden_layers,
            "weights": len(recipes)}


def _weight(source: SafetensorsWeights, lora: LoraDeltas | None, key: str, shape: tuple[int, ...],
            adapter_dir) -> np.ndarray:
    names = key.split("|")
    found = next((n for n in names if n in source.keys()), None)
    if found is None:
        raise GraphkitError(f"{source.model_dir}: safetensors has no tensor {names[0]!r} (needed by the graph); "
                            "the weights do not match config.json")
    arr = source.get(found)
    if tuple(arr.shape) != tuple(shape):
        raise GraphkitError(f"{source.model_dir}: tensor {found!r} has shape {list(arr.shape)}, config.json implies {list(shape)}")
    if lora is not None:
        for n in names:
            delta = lora.delta(n.removesuffix(".weight"), arr.shape) if n.endswith(".weight") else None
            if delta is not None:
                import torch
                merged = torch.from_numpy(np.array(arr, copy=True))
                merged += delta
                return merged.numpy()
    return arr
