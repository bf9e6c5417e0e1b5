"""The Transformers.js contract: what a decoder folder must look like for Transformers.js to load and run it.

One place for every name Transformers.js relies on, so the exporter, the passes (kv-rename, fp16, fusions),
``inspect``, ``verify`` and ``convert`` agree by construction:

- graph I/O: inputs ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value``;
  outputs ``logits`` and ``present.{i}.key/value`` (``present`` is fed back as ``past_key_values``);
- dims: ``batch_size``, ``sequence_length``, ``past_sequence_length``, ``total_sequence_length``; the KV layout
  is ``[batch_size, kv_heads, seq, head_dim]`` with kv_heads and head_dim numbers (Transformers.js 4.x fills only
  ``batch_size`` when it builds the empty cache: every other symbol becomes 0);
- files: ``onnx/model{suffix}.onnx`` per dtype (src/utils/dtypes.js ``DEFAULT_DTYPE_SUFFIX_MAPPING``);
  external data in bare-named chunks ``model_X.onnx_data``, ``model_X.onnx_data_1``, … each under 2 GB
  (browsers read each into one ArrayBuffer; Transformers.js fetches exactly those names);
- ``config.json`` keys under ``transformers.js_config``: ``kv_cache_dtype`` (read by 3.x–4.1; 4.2+ reads the
  graph) and ``use_external_data_format`` ({file: number of extra chunks}).

Pure data and string helpers: no onnx, no torch (``inspect`` must start quickly).
"""
from __future__ import annotations

import re
from pathlib import Path

# ------------------------------------------------------------------------------------------- graph I/O
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
DECODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
# Inputs some exporters add that Transformers.js knows how to feed (not KV cache).
KNOWN_INPUTS = frozenset({*DECODER_INPUTS, "num_logits_to_keep", "use_cache_branch"})
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
KV_PREFIXES = (PAST_PREFIX, PRESENT_PREFIX)
KV_KINDS = ("key", "value")
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")


def past_name(layer: int, kind: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def present_to_past(name: str) -> str:
    """``present.3.key`` → ``past_key_values.3.key`` (what the next step is fed)."""
    return name.replace(PRESENT_PREFIX, PAST_PREFIX, 1)


def past_to_present(name: str) -> str:
    return name.replace(PAST_PREFIX, PRESENT_PREFIX, 1)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a decoder with ``num_layers`` KV layers, in the exporter's order."""
    kv = [(i, k) for i in range(num_layers) for k in KV_KINDS]
    return ([*DECODER_INPUTS] + [past_name(i, k) for i, k in kv], [LOGITS] + [present_name(i, k) for i, k in kv])


# ------------------------------------------------------------------------------------------------ dims
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"
DIM_NAMES = (BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE)
# Named dynamic axes of the non-KV I/O: {name: {axis: dim}}.
IO_AXES: dict[str, dict[int, str]] = {
    INPUT_IDS: {0: BATCH, 1: SEQUENCE},
    ATTENTION_MASK: {0: BATCH, 1: TOTAL_SEQUENCE},
    POSITION_IDS: {0: BATCH, 1: SEQUENCE},
    LOGITS: {0: BATCH, 1: SEQUENCE},
}
PAST_AXES: dict[int, str] = {0: BATCH, 2: PAST_SEQUENCE}
PRESENT_AXES: dict[int, str] = {0: BATCH, 2: TOTAL_SEQUENCE}


def axes_of(name: str) -> dict[int, str] | None:
    """The named dynamic axes Transformers.js expects on graph I/O ``name`` (None: not part of the contract)."""
    if name in IO_AXES:
        return IO_AXES[name]
    if name.startswith(PAST_PREFIX):
        return PAST_AXES
    if name.startswith(PRESENT_PREFIX):
        return PRESENT_AXES
    return None


# ------------------------------------------------------------------------------------------ file names
ONNX_DIR = "onnx"
# Transformers.js file suffix → dtype (src/utils/dtypes.js DEFAULT_DTYPE_SUFFIX_MAPPING).
SUFFIX_DTYPE = {"": "fp32", "_fp16": "fp16", "_quantized": "q8", "_int8": "int8", "_uint8": "uint8",
                "_q4": "q4", "_q4f16": "q4f16", "_bnb4": "bnb4", "_q2": "q2", "_q2f16": "q2f16",
                "_q1": "q1", "_q1f16": "q1f16"}
DTYPE_SUFFIX = {v: k for k, v in SUFFIX_DTYPE.items()}
# The dtypes `verify` and `convert` know, in the order they report them → the file Transformers.js loads.
DTYPE_FILES = {d: f"model{DTYPE_SUFFIX[d]}.onnx" for d in ("fp32", "fp16", "q8", "int8", "uint8", "q4", "q4f16", "bnb4")}
# dtypes whose KV cache is float16 (config.json kv_cache_dtype).
FP16_KV_DTYPES = frozenset({"fp16", "q4f16"})


def split_file_name(name: str) -> tuple[str, str | None]:
    """'model_q4f16.onnx' → ('model', 'q4f16'); unknown suffixes give dtype 'fp32' with the whole stem."""
    stem = name[:-5] if name.endswith(".onnx") else name
    for suffix in sorted((s for s in SUFFIX_DTYPE if s), key=len, reverse=True):
        if stem.endswith(suffix):
            return stem[: -len(suffix)], SUFFIX_DTYPE[suffix]
    return stem, "fp32"


def variant_path(folder: str | Path, dtype: str) -> Path:
    """``folder/onnx/model{suffix}.onnx`` for a dtype of DTYPE_FILES."""
    return Path(folder) / ONNX_DIR / DTYPE_FILES[dtype]


# ------------------------------------------------------------------------------------ external data
# Each chunk must stay under this (browsers read each data file into one ArrayBuffer).
CHUNK_LIMIT = 2_000_000_000


def external_data_name(onnx_file_name: str, index: int) -> str:
    """Chunk ``index`` of ``model_X.onnx``'s external data: ``model_X.onnx_data``, ``model_X.onnx_data_1``, …"""
    return f"{onnx_file_name}_data" + (f"_{index}" if index else "")


def external_data_pattern(onnx_file_name: str) -> re.Pattern[str]:
    """Matches the chunk names of ``onnx_file_name``; group 1 is the index (None for chunk 0)."""
    return re.compile(rf"^{re.escape(onnx_file_name)}_data(?:_(\d+))?$")


# ------------------------------------------------------------------------------------------ config.json
TJS_CONFIG = "transformers.js_config"
KV_CACHE_DTYPE = "kv_cache_dtype"
USE_EXTERNAL_DATA = "use_external_data_format"
