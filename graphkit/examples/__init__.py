"""Shipped example models (data, not code).

``epicrisis-tiny/`` holds a tiny trained Qwen2 causal LM (``base/``) and a peft LoRA
adapter for it (``adapter/``), with its fine-tuning data (``data/``: train and validation
JSONL), built by ``scripts/make_example_model.py``.
"""
from __future__ import annotations

from pathlib import Path

EXAMPLE_NAME = "epicrisis-tiny"


def example_dir() -> Path:
    """The ``epicrisis-tiny`` folder (contains ``base/`` and ``adapter/``)."""
    return Path(__file__).resolve().parent / EXAMPLE_NAME


def base_dir() -> Path:
    """The base model folder (config, safetensors, tokenizer, generation config)."""
    return example_dir() / "base"


def adapter_dir() -> Path:
    """The peft LoRA adapter folder (adapter_config.json, adapter_model.safetensors)."""
    return example_dir() / "adapter"


def data_dir() -> Path:
    """The fine-tuning data as a user would have it: ``train.jsonl`` (a sample of the adapter's training
    examples) and ``validation.jsonl`` (held-out cases), chat format ``{"messages": [...]}``."""
    return example_dir() / "data"
