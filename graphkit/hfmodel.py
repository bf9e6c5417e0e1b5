"""Loading Hugging Face model folders and LoRA adapters: local files only, safetensors only.

Every failure becomes a one-line GraphkitError naming the file and what to do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from graphkit.errors import GraphkitError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "adapter_model.bin", "pytorch_model.bin.index.json")


def _offline_env() -> None:
    # Never touch a hub, even if a folder name looks like a hub id.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (missing, unreadable, not JSON, not an object) is a
    GraphkitError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraphkitError(f"{path}: missing; {what}") from None
    except IsADirectoryError:
        raise GraphkitError(f"{path}: is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise GraphkitError(f"{path}: not valid JSON ({str(exc)[:150]}); fix or re-download the file") from None
    except OSError as exc:
        raise GraphkitError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise GraphkitError(f"{path}: expected a JSON object ({{...}}), found {type(data).__name__}; "
                            "fix or re-download the file")
    return data


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header and length without loading tensors."""
    from safetensors import safe_open
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end} but the file has {size} bytes")
        with safe_open(str(path), framework="np"):
            pass
    except GraphkitError:
        raise
    except Exception as exc:
        raise GraphkitError(f"{path}: corrupt or truncated safetensors file ({str(exc)[:150]}); re-download or re-save it") from None


def check_model_dir(model_dir: Path, allow_pickle: bool = False) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise GraphkitError(f"{model_dir}: no such folder; give a local Hugging Face model folder (hub ids are never downloaded)")
    if not model_dir.is_dir():
        raise GraphkitError(f"{model_dir}: not a folder; give a Hugging Face model folder with config.json and *.safetensors")
    config = read_json(model_dir / "config.json", "a model folder needs config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GraphkitError(f"{model_dir / 'config.json'}: model_type {model_type!r} is not supported; "
                            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    weights = sorted(model_dir.glob("*.safetensors"))
    pickles = [p for p in model_dir.iterdir() if p.name in PICKLE_NAMES or p.suffix in (".bin", ".pt", ".pth")]
    if not weights:
        if pickles and not allow_pickle:
            raise GraphkitError(f"{pickles[0]}: pickle checkpoints can run arbitrary code when loaded; refusing it. "
                                "Convert it to safetensors, or pass --allow-pickle if you trust its source")
        if not pickles:
            raise GraphkitError(f"{model_dir}: no model.safetensors found; a model folder needs its weights as *.safetensors")
    for w in weights:
        check_safetensors(w)
    return config


def load_causal_lm(model_dir: Path, adapter_dir: Path | None = None, allow_pickle: bool = False,
                   trust_remote_code: bool = False):
    """Load base (+ merged adapter) in float32 eval mode. Returns (model, config dict)."""
    _offline_env()
    model_dir = Path(model_dir)
    config = check_model_dir(model_dir, allow_pickle)
    if adapter_dir is not None:
        check_adapter_dir(Path(adapter_dir), allow_pickle)
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, dtype=torch.float32, trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle or None, attn_implementation="sdpa")
    except GraphkitError:
        raise
    except Exception as exc:
        raise GraphkitError(f"{model_dir}: transformers could not load the model ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from None
    model.eval()
    if adapter_dir is not None:
        model = merge_adapter(model, Path(adapter_dir))
    return model, config


def check_adapter_dir(adapter_dir: Path, allow_pickle: bool = False) -> dict[str, Any]:
    if not adapter_dir.is_dir():
        raise GraphkitError(f"{adapter_dir}: no such adapter folder; give a peft adapter folder with adapter_config.json")
    cfg = read_json(adapter_dir / "adapter_config.json", "a peft adapter folder needs adapter_config.json")
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        check_safetensors(st)
    elif (adapter_dir / "adapter_model.bin").exists() and not allow_pickle:
        raise GraphkitError(f"{adapter_dir / 'adapter_model.bin'}: pickle checkpoints can run arbitrary code; refusing it. "
                            "Re-save the adapter with safetensors, or pass --allow-pickle if you trust its source")
    else:
        raise GraphkitError(f"{adapter_dir}: no adapter_model.safetensors found")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise GraphkitError(f"{adapter_dir / 'adapter_config.json'}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are merged")
    return cfg


def merge_adapter(model, adapter_dir: Path):
    from peft import PeftModel
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False, local_files_only=True)
        merged = peft_model.merge_and_unload()
    except Exception as exc:
        msg = _first_line(exc)
        if "size mismatch" in str(exc) or "shape" in msg.lower():
            hint = "the adapter was trained for a different base model (tensor shapes differ)"
        elif "target modules" in str(exc).lower() or "not found in the base model" in str(exc):
            hint = "the adapter targets modules this base model does not have"
        else:
            hint = "peft could not apply it"
        raise GraphkitError(f"{adapter_dir}: cannot merge adapter: {hint} ({msg[:160]})") from None
    merged.eval()
    return merged


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
