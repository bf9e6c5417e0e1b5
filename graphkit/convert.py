"""`graphkit convert`: a Hugging Face model (+ LoRA adapter) → a folder Transformers.js loads offline.

Export once, then run one named pipeline of passes per dtype and write::

    OUT/config.json               (+ "transformers.js_config" where needed)
    OUT/generation_config.json
    OUT/tokenizer.json
    OUT/tokenizer_config.json     (chat_template embedded: Transformers.js reads it only there)
    OUT/onnx/model.onnx           fp32
    OUT/onnx/model_fp16.onnx      fp16
    OUT/onnx/model_q4.onnx        q4
    OUT/onnx/model_q4f16.onnx     q4f16
    OUT/onnx/model_quantized.onnx q8 (the browser's wasm default)
    OUT/onnx/model_w4.onnx        w4 (opt-in: + model_w4.w4bin and OUT/w4.mjs; passes/matmul_w4.py)

Files that would pass 2 GB get external data chunks ``model_X.onnx_data``, ``model_X.onnx_data_1``…

The folder is built in a temporary sibling folder and renamed into place at the end: a failure or
Ctrl-C leaves the previous output (or nothing). A dtype whose pipeline fails is left out entirely
and reported; the command then exits non-zero.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graphkit.errors import GraphkitError
from graphkit.tjs_contract import (OUTPUT_FILES as DTYPE_FILES, FP16_KV_DTYPES, KV_CACHE_DTYPE, ONNX_DIR, TJS_CONFIG,
                                   USE_EXTERNAL_DATA)

if TYPE_CHECKING:
    import onnx

# dtype → the pass spec that makes it from the fp32 export (empty: the export itself).
PIPELINES: dict[str, str] = {
    "fp32": "",
    "fp16": "fp16",
    # accuracy_level=4 everywhere (docs/accuracy-level.md); q4: 128-blocks with zero points keep the
    # quality of 32-blocks and decode fastest; its 8-bit shared table in 128-blocks decodes 6-18 % faster
    # than in 32-blocks at about the same quality (section 4 there); q4f16: the shared table at 4 bits
    # (16-blocks, zero points) keeps the file under the size goal at better KL than the anchor recipe.
    # The 4-bit body: GPTQ error compensation along the statistics of the fp32 model's MatMul inputs
    # (docs/quantization.md): from --calibration data, else from sequences the fp32 model samples itself.
    "q4": "tied-embedding(bits=8,block_size=128,accuracy_level=4),"
          "matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4,method=gptq,calibration={calibration})",
    "q4f16": "tied-embedding(bits=4,block_size=16,symmetric=false,accuracy_level=4),"
             "matmul-nbits(bits=4,block_size=32,accuracy_level=4,method=gptq,calibration={calibration}),fp16",
    "q8": "matmul-int8(quantize_embedding_gather=true)",
    # not a Transformers.js dtype: model_w4.onnx + model_w4.w4bin, the 4-bit download that wasm runs at q8 speed
    # once w4.mjs (copied into the folder) expands it (passes/matmul_w4.py, docs/w4.md)
    "w4": "matmul-w4(block_size=32,symmetric=false)",
}
DEFAULT_DTYPES = ["fp32", "fp16", "q4", "q4f16", "q8"]
# Where each file is meant to run (RESULTS.md "Transformers.js speed" and docs/w4.md have the measurements):
# MatMulNBits is fast only where onnxruntime has its native 4-bit GEMM (CPU, WebGPU), never in wasm.
DEVICE_FOR = {"fp32": "reference (CPU)", "fp16": "WebGPU with shader-f16", "q4": "Node / CPU",
              "q4f16": "WebGPU", "q8": "wasm (the browser default) and CPU", "w4": "wasm, 4-bit download (w4.mjs)"}
TABLE_8BIT_BLOCK = 32  # --size-budget's 8-bit tied table for q4f16 (its form before the 0.5B size goal, docs/accuracy-level.md §3)
CALIBRATION_SLOT = "{calibration}"  # replaced by the statistics file convert writes (graphkit/calibration.py)
SELF_CALIBRATION_SAMPLES = 32       # sequences the fp32 model samples for itself when no data is given
SELF_CALIBRATION_TOKENS = 96
DATA_CALIBRATION_SAMPLES = 64       # --calibration data.jsonl: the first N samples
# --size-budget's default for the calibrated, unfused Transformers.js 4.x folder (1.0x, all 4-bit, with --fuse — the
# speed path —, --calibration none or --target transformers.js@3): q4f16's table at 8 bits, then the most sensitive
# body MatMuls at 8 bits, up to 1.5x the all-4-bit size. The smallest budget that meets issue 17's goals on the
# shipped example (RESULTS.md `quantization-methods`, docs/quantization.md): held-out KL 0.2x onnxruntime's best
# 4-bit, every fact fp32 keeps kept, greedy = fp32 on 3-4 of the 4 default prompts; 1.3x misses the greedy and q4f16
# KL goals. Its cost: the files stay below onnxruntime's (example 1.0-1.1 vs 1.6 MB); at the Qwen2.5-1.5B shape about
# +0.45 GB (q4 ~1.41 GB, q4f16 ~1.34 GB, vs 0.94 / 0.89 GB all 4-bit and the anchor's 1.90 / 1.34 GB).
DEFAULT_SIZE_BUDGET = 1.5
# `--target transformers.js@3`: the dtypes whose default form a Transformers.js 3.x runtime refuses or runs wrongly
# (graphkit/runtimes.py; docs/runtimes.md has the measurements), in forms 3.x and 4.x both run. q4: the shared table
# in int8 read by MatMulInteger (onnxruntime 1.21 has no 8-bit MatMulNBits; KL as the 8-bit head's, a 4-bit head
# costs 4x); q4f16: accuracy_level=0 (1.21's CPU kernel is wrong for float16 at level 4).
TARGET_PIPELINES: dict[str, dict[str, str]] = {
    "transformers.js@3": {
        "q4": "matmul-int8(lm_head=only,quantize_embedding_gather=true),"
              "matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4,method=gptq,calibration={calibration})",
        "q4f16": "tied-embedding(bits=4,block_size=16,symmetric=false,accuracy_level=0),"
                 "matmul-nbits(bits=4,block_size=32,accuracy_level=0,method=gptq,calibration={calibration}),fp16",
    },
}
# --fuse: onnxruntime contrib-op fusions first (fewer, faster kernels); GQA takes the mask as an
# attention bias so left-padded batches stay exact.
FUSE_PREFIX = "fuse-rmsnorm,fuse-rotary(max_positions={max_positions}),fuse-gqa(padding=bias),pack-matmul,pack-gqa"
# The fusions without GroupQueryAttention: onnxruntime-web's WebGPU GroupQueryAttention is wrong on the adapters
# measured (SwiftShader and lavapipe, graphkit/runtimes.py `webgpu-gqa`); SimplifiedLayerNorm, RotaryEmbedding and
# packed MatMuls are not (tests/test_tjs.py runs them there).
FUSE_NO_GQA_PREFIX = "fuse-rmsnorm,fuse-rotary(max_positions={max_positions}),pack-matmul"
FUSIONS: dict[str, str] = {"none": "", "no-gqa": FUSE_NO_GQA_PREFIX, "full": FUSE_PREFIX}
# Without --fuse / --no-fuse: per dtype, the form that measured fastest on the device the dtype is meant for
# (DEVICE_FOR) among those correct on every runtime tested (Node CPU, Chromium wasm, WebGPU lavapipe); RESULTS.md
# `browser-0.5b-defaults` has the figures, docs/runtimes.md the decision. fp32 stays the exporter's graph: it is
# the reference every other file is checked against.
DEFAULT_FUSION: dict[str, str] = {"fp32": "none", "fp16": "no-gqa", "q4": "no-gqa", "q4f16": "no-gqa",
                                  "q8": "no-gqa", "w4": "no-gqa"}
# --logits-to-keep (the default for --target transformers.js@4): first in every pipeline (the lm_head is still a
# float MatMul there); Transformers.js 4.x only (passes/logits_to_keep.py says why it cannot be an optional input
# that 3.x ignores).
LOGITS_TO_KEEP_PREFIX = "logits-to-keep"


@dataclass
class DtypeResult:
    dtype: str
    file: str
    ok: bool
    bytes: int = 0
    seconds: float = 0.0
    passes: list[str] | None = None
    peak_rss: int | None = None  # bytes, this step's own peak (fp32: the export's)
    top1_vs_fp32: float | None = None
    kl_vs_fp32: float | None = None
    error: str | None = None
    pipeline: str | None = None  # the full pass spec that made this file ("" = the export itself)
    agreement_note: str | None = None  # why the agreement check left this file out
    device: str | None = None  # DEVICE_FOR: where the file is meant to run
    warnings: list[str] | None = None  # browser limits the file breaks (graphkit.browser_limits)
    mixed: dict | None = None  # --size-budget: the weights kept at 8 bits and why (graphkit/mixed.py)
    fusion: str | None = None  # FUSIONS key: the contrib-op fusions in this file (fusion_for)


def parse_dtypes(text: str) -> list[str]:
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in PIPELINES]
    if bad or not dtypes:
        raise GraphkitError(f"unknown dtype(s) {', '.join(bad) or '(none)'}; choose from {', '.join(PIPELINES)}")
    return dtypes


def parse_pipeline_overrides(items: list[str]) -> dict[str, str]:
    """``DTYPE=SPEC`` items (``--pipeline``) → {dtype: spec}; each spec is parsed now, so a typo fails
    before the export starts."""
    from graphkit.pipeline import parse_spec
    out: dict[str, str] = {}
    for item in items:
        dtype, sep, spec = item.partition("=")
        dtype, spec = dtype.strip(), spec.strip()
        if not sep or dtype not in PIPELINES:
            raise GraphkitError(f"--pipeline {item!r}: expected DTYPE=SPEC with DTYPE one of {', '.join(PIPELINES)}, "
                                f"e.g. \"q4={PIPELINES['q4']}\"")
        if dtype == "fp32":
            raise GraphkitError("--pipeline: fp32 is the export itself (model.onnx); give a pipeline for another dtype")
        if dtype in out:
            raise GraphkitError(f"--pipeline: {dtype} given twice")
        try:
            parse_spec(spec)
        except GraphkitError as exc:
            raise GraphkitError(f"--pipeline {dtype}: {exc}") from None
        out[dtype] = spec
    return out


def fusion_for(dtype: str, fuse: bool | str | None, target: str | None = None, size_budget: float = 1.0,
               overridden: bool = False) -> str:
    """The fusion level (a FUSIONS key) of ``dtype``: ``--fuse`` (True) "full", ``--no-fuse`` (False) "none", a FUSIONS
    key as given; by default DEFAULT_FUSION, except "none" for ``--target transformers.js@3`` (the forms 3.x was
    tested with), for the 4-bit dtypes under ``--size-budget`` (its plan names the unfused graph's MatMuls) and for a
    dtype whose passes ``--pipeline`` gives (``overridden``: the user's spec says which fusions it wants)."""
    if isinstance(fuse, str):
        if fuse not in FUSIONS:
            raise GraphkitError(f"unknown fusion {fuse!r}; choose from {', '.join(FUSIONS)}")
        return fuse
    if fuse is not None:
        return "full" if fuse else "none"
    if overridden or target == "transformers.js@3" or (size_budget > 1.0 and dtype in ("q4", "q4f16")):
        return "none"
    return DEFAULT_FUSION.get(dtype, "none")


def pipeline_spec(dtype: str, fuse: bool | str | None, model_dir: Path, overrides: dict[str, str] | None = None,
                  target: str | None = None, logits_to_keep: bool = False, size_budget: float = 1.0) -> str:
    """The pass spec for ``dtype``: ``overrides`` (``--pipeline``), else the target's form (TARGET_PIPELINES), else
    PIPELINES; after the fusions of :func:`fusion_for` (``fuse``: True = --fuse, False = --no-fuse, None = the
    dtype's default), after LOGITS_TO_KEEP_PREFIX with ``logits_to_keep``."""
    spec = (overrides or {}).get(dtype, TARGET_PIPELINES.get(target or "", {}).get(dtype, PIPELINES[dtype]))
    if logits_to_keep:
        return ",".join(p for p in (LOGITS_TO_KEEP_PREFIX,
                                    pipeline_spec(dtype, fuse, model_dir, overrides, target, size_budget=size_budget)) if p)
    prefix = FUSIONS[fusion_for(dtype, fuse, target, size_budget, dtype in (overrides or {}))]
    if not prefix:
        return spec
    from graphkit.hfmodel import read_json
    positions = int(read_json(Path(model_dir) / "config.json", "").get("max_position_embeddings", 32768))
    return ",".join(p for p in (prefix.format(max_positions=positions), spec) if p)


def write_configs(model_dir: Path, out: Path, dtypes_written: list[str], external: dict[str, int],
                  target: str | None = None) -> None:
    """config.json (+transformers.js_config, + "graphkit": the runtimes the folder was made for),
    generation_config.json, tokenizer files."""
    from graphkit.hfmodel import read_json
    config = read_json(model_dir / "config.json", "a model folder needs config.json")
    if "head_dim" not in config and config.get("hidden_size") and config.get("num_attention_heads"):
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]  # Transformers.js 3.x qwen3 reads it
    tjs = dict(config.get(TJS_CONFIG, {}))
    # these two describe the files written here, never the source's (converting a Transformers.js folder)
    tjs.pop(KV_CACHE_DTYPE, None)
    tjs.pop(USE_EXTERNAL_DATA, None)
    config.pop(TJS_CONFIG, None)
    fp16_kv = {d: "float16" for d in dtypes_written if d in FP16_KV_DTYPES}
    if fp16_kv:
        tjs[KV_CACHE_DTYPE] = fp16_kv  # read by Transformers.js 3.x–4.1; 4.2+ reads the graph
    if external:
        tjs[USE_EXTERNAL_DATA] = external
    if tjs:
        config[TJS_CONFIG] = tjs
    if target:
        from graphkit.runtimes import config_record
        config["graphkit"] = config_record(target)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    gen = model_dir / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, out / "generation_config.json")
    tok_json = model_dir / "tokenizer.json"
    tok_cfg_path = model_dir / "tokenizer_config.json"
    if not tok_json.exists() or not tok_cfg_path.exists():
        raise GraphkitError(f"{model_dir}: tokenizer.json and tokenizer_config.json are needed for a Transformers.js folder")
    shutil.copyfile(tok_json, out / "tokenizer.json")
    tok_cfg = read_json(tok_cfg_path, "")
    jinja = model_dir / "chat_template.jinja"
    if not tok_cfg.get("chat_template") and jinja.exists():
        tok_cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise GraphkitError(f"{output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise GraphkitError(f"{output} exists and is not empty; pass --overwrite to replace it")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphkitError(f"cannot create {output.parent}: {exc.strerror}") from None
    if not os.access(output.parent, os.W_OK):
        raise GraphkitError(f"{output.parent} is not writable; choose another --output")


# Output size of each dtype relative to the float32 weights (Qwen2.5 0.5B / 1.5B shapes, benchmarks/RESULTS.md).
SIZE_RATIO = {"fp32": 1.0, "fp16": 0.5, "q4": 0.16, "q4f16": 0.145, "q8": 0.25, "w4": 0.16}


def _check_free_space(model_dir: Path, output: Path, dtypes: list[str], packed: bool = False) -> None:
    """Refuse to start what cannot finish: the export (which becomes model.onnx) and the other files must fit
    beside the output (an old output being replaced stays until the new one is complete). ``packed``: a pipeline
    runs pack-matmul, whose concatenated float32 weights (about the whole model once) are staged there too."""
    from graphkit.stream_export import SafetensorsWeights
    try:
        fp32 = SafetensorsWeights(Path(model_dir)).fp32_nbytes()
    except (GraphkitError, OSError, ValueError):
        return  # not a safetensors folder: the export names the problem itself
    need = int(fp32 * (1 + sum(SIZE_RATIO[d] for d in dtypes if d != "fp32") + (1 if packed else 0)))
    free = shutil.disk_usage(output.parent).free
    if free < need:
        raise GraphkitError(f"{output.parent}: {free / 1e9:.1f} GB of disk free, but {', '.join(dtypes)} need at least "
                            f"about {need / 1e9:.1f} GB (the fp32 export is {fp32 / 1e9:.1f} GB; new weights are also "
                            "staged there while converting); free some space, choose another --output, or fewer --dtypes")


def _swap_into_place(tmp: Path, output: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary folder
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def without_calibration(spec: str) -> str:
    """The spec with the calibrated method replaced by round-to-nearest (``--calibration none``)."""
    return spec.replace(f",method=gptq,calibration={CALIBRATION_SLOT}", "").replace(
        f"method=gptq,calibration={CALIBRATION_SLOT}", "")


def calibration_sequences_for(calibration: str | Path | None, model_dir: Path, samples: int | None
                              ) -> list[list[int]] | None:
    """Token ids of the user's calibration file (read and checked before any work: bad input exits 2 with
    nothing written), or None for ``self`` / ``none``."""
    if calibration in (None, "self", "none"):
        return None
    from graphkit.dataset import calibration_sequences
    return calibration_sequences(Path(calibration), model_dir, limit=samples or DATA_CALIBRATION_SAMPLES)


def convert(model_dir: Path, output: Path, adapter_dir: Path | None = None, dtypes: list[str] | None = None,
            overwrite: bool = False, exporter: str = "dynamo", check_agreement: bool = True,
            max_chunk_bytes: int | None = None, fuse: bool | None = None, stream: bool = True,
            progress: Callable[[str], None] | None = None, pipelines: dict[str, str] | None = None,
            calibration: str | Path | None = "self", calibration_samples: int | None = None,
            size_budget: float | None = None, target: str | None = None, logits_to_keep: bool | None = None) -> dict:
    """Convert ``model_dir`` (+ ``adapter_dir``) into a Transformers.js folder ``output``. ``fuse``: True = every
    dtype fully fused (--fuse), False = none (--no-fuse), None = each dtype's measured default (DEFAULT_FUSION).
    ``size_budget``: None = DEFAULT_SIZE_BUDGET where a budget applies (calibrated, not --fuse, the default target),
    else 1.0 (all 4-bit); above 1.0 the 4-bit dtypes stay unfused (the plan names the unfused graph's MatMuls).
    ``logits_to_keep``: None = on for transformers.js@4 (the default target), off for @3 (which refuses True)."""
    from graphkit import browser_limits, tensors
    from graphkit.memory import peak_rss, release_free_memory, reset_peak
    from graphkit.modelio import DEFAULT_CHUNK_BYTES, PROTOBUF_LIMIT, load_model, model_nbytes, save_model
    from graphkit.pipeline import parse_spec, run_passes
    from graphkit.runtimes import DEFAULT_TARGET, TARGET_RUNTIMES

    step = progress or (lambda msg: None)
    dtypes = dtypes or DEFAULT_DTYPES
    target = target or DEFAULT_TARGET
    if target not in TARGET_RUNTIMES:
        raise GraphkitError(f"unknown target {target!r}; choose from {', '.join(TARGET_RUNTIMES)}")
    if fuse is True and target == "transformers.js@3":
        raise GraphkitError("--fuse with --target transformers.js@3: onnxruntime-node 1.21 (Transformers.js 3.x) refuses "
                            "GroupQueryAttention with an attention_bias input ('has input size 11 not in range [min=7, "
                            "max=9]'), and the form it loads is wrong for left-padded batches; drop --fuse, or target "
                            "transformers.js@4")
    if logits_to_keep is True and target == "transformers.js@3":
        raise GraphkitError("--logits-to-keep with --target transformers.js@3: Transformers.js 3.x does not feed "
                            "num_logits_to_keep and refuses a graph input it does not feed; drop --logits-to-keep, or "
                            "target transformers.js@4")
    if logits_to_keep is None:  # Transformers.js 4.x feeds it (a prefill computes one row of logits); 3.x cannot
        logits_to_keep = target != "transformers.js@3"
    model_dir, output = Path(model_dir), Path(output)
    _prepare_output(output, overwrite)
    from graphkit.onnx_source import find_onnx_source
    source = find_onnx_source(model_dir)  # an ONNX export instead of PyTorch weights: no export, no torch
    if source is not None and adapter_dir:
        raise GraphkitError(f"{model_dir}: an ONNX export cannot take --adapter (merge it before exporting, or convert "
                            "the Hugging Face folder with --adapter)")
    if size_budget is None:  # the default: DEFAULT_SIZE_BUDGET where a budget applies, else all 4-bit
        size_budget = DEFAULT_SIZE_BUDGET if (fuse is not True and calibration != "none" and target == DEFAULT_TARGET) else 1.0
    elif size_budget > 1.0 and (fuse is True or calibration == "none"):
        raise GraphkitError("--size-budget needs calibration statistics and the unfused graph's MatMul names; "
                            "drop --fuse / --calibration none, or use --size-budget 1.0")
    _check_free_space(model_dir, output, dtypes,
                      packed=any("pack-matmul" in FUSIONS[fusion_for(d, fuse, target, size_budget, d in (pipelines or {}))]
                                 for d in dtypes))
    calib_seqs = calibration_sequences_for(calibration, model_dir, calibration_samples)
    calib_info: dict | None = None
    chunk = max_chunk_bytes or DEFAULT_CHUNK_BYTES
    t_start = time.perf_counter()
    results: list[DtypeResult] = []
    external: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        onnx_dir = tmp / ONNX_DIR
        onnx_dir.mkdir()
        scratch = tmp / ".export" / "model.onnx"
        t0 = time.perf_counter()
        reset_peak()
        if source is not None:
            from graphkit.onnx_source import prepare_onnx_source
            step(f"export: none — starting from the ONNX export {source}")
            prepare_onnx_source(model_dir, source, scratch, lambda m: step("   " + m))
        else:
            step("export: loading, merging the adapter, exporting the decoder" if adapter_dir else "export: loading and exporting the decoder")
            _export(model_dir, scratch, adapter_dir, exporter, stream, lambda m: step("   " + m))
        export_s = time.perf_counter() - t0
        export_peak = peak_rss()
        release_free_memory()
        # The weights stay on disk: each pipeline reads the tensors it changes, one at a time, and
        # save_model copies the rest file to file. A pipeline that extends the previous one (q4f16 =
        # q4 + fp16) starts from that result instead of redoing the quantization.
        previous: tuple[list, object, list] | None = None  # (passes, model, reports)
        raw_specs = {d: pipeline_spec(d, fuse, model_dir, pipelines, target, logits_to_keep, size_budget) for d in dtypes}
        if calibration == "none":
            raw_specs = {d: without_calibration(sp) for d, sp in raw_specs.items()}
        if any(CALIBRATION_SLOT in sp for sp in raw_specs.values()):
            calib_info = _calibrate(scratch, model_dir, calib_seqs, calibration, calibration_samples,
                                    tmp / ".calib" / "stats.npz", step)
            raw_specs = {d: sp.replace(CALIBRATION_SLOT, calib_info["stats"]) for d, sp in raw_specs.items()}
        mixed: dict[str, dict] = {}
        if size_budget > 1.0 and calib_info is not None:
            for d in dtypes:
                if "matmul-nbits(" in raw_specs[d] and "method=gptq" in raw_specs[d]:
                    raw_specs[d], mixed[d] = _mixed_spec(raw_specs[d], scratch, Path(calib_info["stats"]), size_budget, step,
                                                         table_8bit=target != "transformers.js@3")
        specs = {d: _pass_names(raw_specs[d]) for d in dtypes}
        # the leading passes several dtypes share (logits-to-keep and the default fusions): run once, each dtype goes
        # on from a copy. pack-matmul writes new float weights (the whole body at float32), so one spilled copy
        # instead of one per dtype (disk) and one run instead of one per dtype (time)
        common = _shared_prefix([specs[d] for d in dtypes])
        shared: tuple[object, list] | None = None  # (model, reports) after the common passes
        with tensors.spill_to(tmp / ".spill", f"converting into {output}"):  # new weights go to disk, not into the proto
            for i, dtype in enumerate(dtypes):
                fname = DTYPE_FILES[dtype]
                spec = raw_specs[dtype]
                # what the result records: the statistics file is temporary (removed below), so the spec names
                # its slot and the result's "calibration" entry says what filled it (source, counts, sha256)
                recorded = spec if calib_info is None else spec.replace(calib_info["stats"], CALIBRATION_SLOT)
                step(f"{dtype}: {recorded or 'export as is'} → onnx/{fname}")
                t0 = time.perf_counter()
                reset_peak()
                try:
                    passes = parse_spec(spec) if spec else []
                    names = [p.describe() for p in passes]
                    reports: list = []
                    from_common = bool(common) and names[:len(common)] == common
                    if (previous and previous[0] and names[:len(previous[0])] == previous[0]
                            and not (from_common and len(common) > len(previous[0]))):
                        step(f"   starting from the {' → '.join(n.split('(')[0] for n in previous[0])} result")
                        model = previous[1]  # run_passes(keep_input=True) leaves it as it is for later dtypes
                        reports = list(previous[2])
                        passes = passes[len(previous[0]):]
                    elif from_common:
                        previous = None
                        if shared is None:
                            shared = run_passes(load_model(scratch, load_external="lazy"), passes[:len(common)],
                                                on_report=lambda r: step("   " + r.line()))
                        else:
                            step(f"   starting from the {' → '.join(n.split('(')[0] for n in common)} result")
                        model, reports = shared[0], list(shared[1])
                        passes = passes[len(common):]
                    else:
                        previous = None
                        model = load_model(scratch, load_external="lazy")
                    if passes:
                        kept = (previous[1] if previous else None, shared[0] if shared else None)
                        model, more = run_passes(model, passes, on_report=lambda r: step("   " + r.line()),
                                                 keep_input=any(model is k for k in kept))
                        reports += more
                    _check_runtimes(model, fname, dtype, target)
                    force_external = True if max_chunk_bytes else None  # None: only above 2 GB
                    if dtype == "w4":
                        from passes.matmul_w4 import save_w4
                        files = save_w4(model, onnx_dir / fname)
                        shutil.copyfile(Path(__file__).parent / "js" / "w4.mjs", tmp / "w4.mjs")
                    elif not names and fname == scratch.name and not max_chunk_bytes and model_nbytes(model) > PROTOBUF_LIMIT - 64 * 2**20:
                        files = _link_files(scratch, onnx_dir / fname)  # the export already has this layout
                    else:
                        files = save_model(model, onnx_dir / fname, external_data=force_external, max_chunk_bytes=chunk)
                    limits = browser_limits.check(model, dtype)
                    for w in limits:
                        step(f"   WARNING: onnx/{fname}: {w}")
                    extended_later = any(len(specs[d]) > len(names) and specs[d][:len(names)] == names for d in dtypes[i + 1:])
                    previous = (names, model, reports) if names and extended_later else None
                    if shared is not None and not any(specs[d][:len(common)] == common for d in dtypes[i + 1:]):
                        shared = None  # no later dtype starts from it
                    del model
                    release_free_memory()
                    if len(files) > 1 and dtype != "w4":  # w4's second file is its .w4bin, not ONNX external data
                        external[fname] = len(files) - 1
                    peak = peak_rss()
                    if dtype == "fp32" and peak is not None and export_peak is not None:
                        peak = max(peak, export_peak)
                    results.append(DtypeResult(dtype, f"onnx/{fname}", True, sum(f.stat().st_size for f in files),
                                               round(time.perf_counter() - t0 + (export_s if dtype == "fp32" else 0), 2),
                                               [r.name.split("(")[0] for r in reports], peak, pipeline=recorded,
                                               warnings=limits or None,
                                               mixed=mixed.get(dtype), device=DEVICE_FOR.get(dtype),
                                               fusion=fusion_for(dtype, fuse, target, size_budget,
                                                                 dtype in (pipelines or {}))))
                except GraphkitError as exc:
                    previous = None
                    for f in onnx_dir.glob(fname + "*"):
                        f.unlink()
                    results.append(DtypeResult(dtype, f"onnx/{fname}", False, seconds=round(time.perf_counter() - t0, 2),
                                               error=str(exc), pipeline=recorded))
                    step(f"{dtype}: FAILED: {exc}")
            previous = shared = None
        shutil.rmtree(scratch.parent, ignore_errors=True)
        shutil.rmtree(tmp / ".spill", ignore_errors=True)
        shutil.rmtree(tmp / ".calib", ignore_errors=True)
        written = [r.dtype for r in results if r.ok]
        write_configs(model_dir, tmp, written, external, target)
        if written:  # the app snippet: how to load this folder with Transformers.js (graphkit/usage.py)
            from graphkit.usage import write_usage
            write_usage(tmp, written, output)
        if check_agreement and "fp32" in written and len(written) > 1:
            step("agreement with fp32 on the default prompts")
            _agreement(tmp, results, output, torch_free=source is not None)
        _swap_into_place(tmp, output)
        # the whole run's peak: each step reset the high-water mark, so it is the largest of the steps' own peaks
        # (and of what the last reset saw: the last step plus the agreement check)
        step_peaks = {"export": export_peak, "agreement and last step": peak_rss(),
                      **({"calibration": calib_info.get("peak_rss")} if calib_info else {}),
                      **{r.dtype: r.peak_rss for r in results}}
        step_peaks = {k: v for k, v in step_peaks.items() if v}
        run_peak = max(step_peaks.items(), key=lambda kv: kv[1]) if step_peaks else None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(output), "model": str(model_dir), "adapter": str(adapter_dir) if adapter_dir else None,
            "onnx_source": str(source) if source is not None else None,
            "exporter": exporter, "fused": fuse, "target": target, "logits_to_keep": logits_to_keep,
            "total_s": round(time.perf_counter() - t_start, 2),
            "peak_rss": run_peak[1] if run_peak else None, "peak_rss_step": run_peak[0] if run_peak else None,
            "calibration": None if calib_info is None else {k: v for k, v in calib_info.items() if k != "stats"},
            "ok": all(r.ok for r in results), "dtypes": [asdict(r) for r in results]}


def _calibrate(scratch: Path, model_dir: Path, seqs: list[list[int]] | None, calibration, samples: int | None,
               out: Path, step) -> dict:
    """Statistics of every MatMul input of the fp32 export (graphkit/calibration.py) for the calibrated passes."""
    from graphkit.calibration import chat_prefix, collect_stats, self_generated_sequences
    from graphkit.memory import peak_rss, reset_peak
    reset_peak()
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    if seqs is None:
        n = samples or SELF_CALIBRATION_SAMPLES
        step(f"calibration: no data given; the fp32 model samples {n} sequences of {SELF_CALIBRATION_TOKENS} tokens itself")
        seqs = self_generated_sequences(scratch, chat_prefix(model_dir), n, SELF_CALIBRATION_TOKENS)
        source = "self-generated"
    else:
        source = str(calibration)
        step(f"calibration: {len(seqs)} samples from {calibration}")
    meta = collect_stats(scratch, seqs, out, progress=lambda m: step("   " + m))
    # a stable record of what was calibrated on (the statistics file itself is temporary): the token ids' hash
    digest = hashlib.sha256(json.dumps(seqs, separators=(",", ":")).encode()).hexdigest()
    return {"stats": str(out), "source": source, "sequences": meta["sequences"], "tokens": meta["tokens"],
            "sequences_sha256": digest,
            "seconds": round(time.perf_counter() - t0, 2), "peak_rss": peak_rss()}


def _mixed_spec(spec: str, scratch: Path, stats: Path, budget: float, step, table_8bit: bool = True
                ) -> tuple[str, dict]:
    """Keep the most sensitive MatMuls of ``spec``'s matmul-nbits at 8 bits within ``budget``; a 4-bit tied table
    first goes to 8 bits (graphkit/mixed.py). ``table_8bit`` false (a runtime without 8-bit MatMulNBits: onnxruntime
    1.21, Transformers.js 3.x): the table stays 4-bit and the kept MatMuls take matmul-int8's form (MatMulInteger)."""
    from graphkit import mixed
    from graphkit.pipeline import parse_spec
    passes = {p.name: p.options for p in parse_spec(spec)}
    o = passes["matmul-nbits"]
    scale_bytes = 2 if "fp16" in passes else 4
    table = table8 = 0
    if "tied-embedding" in passes:
        t = passes["tied-embedding"]
        table = _table_bytes(scratch, t.bits, t.block_size, t.symmetric, scale_bytes)
        if t.bits == 4 and table_8bit:
            table8 = _table_bytes(scratch, 8, TABLE_8BIT_BLOCK, True, scale_bytes)
    form = "nbits" if table_8bit else "int8"  # 8-bit MatMulNBits where the runtime has it (not onnxruntime 1.21)
    rows, info = mixed.plan(scratch, stats, budget, o.block_size, o.symmetric, scale_bytes, table, table8, form)
    table_kept = any(r.kept and r.node == mixed.TABLE for r in rows)
    kept = [r.node for r in rows if r.kept and r.node != mixed.TABLE]
    step(f"   size budget {budget:g}x: {'tied table at 8 bits, ' if table_kept else ''}{len(kept)} of "
         f"{len(rows) - (1 if table8 else 0)} MatMuls kept at 8 bits "
         f"(+{info['spent_bytes'] / 1e6:.2f} MB of +{info['allowance_bytes'] / 1e6:.2f} MB)")
    if table_kept:
        i = spec.index("tied-embedding(")
        j = spec.index(")", i)
        level = passes["tied-embedding"].accuracy_level
        spec = (spec[:i] + f"tied-embedding(bits=8,block_size={TABLE_8BIT_BLOCK}"
                + ("" if level is None else f",accuracy_level={level}") + ")" + spec[j + 1:])
    if not kept:
        return spec, info
    names = "|".join(kept)
    i = spec.index("matmul-nbits(")
    j = spec.index(")", i)
    level = "" if o.accuracy_level is None else f",accuracy_level={o.accuracy_level}"
    high = (f"matmul-nbits(bits=8,block_size={o.block_size}{level},include={names})" if form == "nbits"
            else f"matmul-int8(include={names},lm_head=keep)")
    spec = spec[:j] + f",exclude={names})" + f",{high}" + spec[j + 1:]
    return spec, info


def _table_bytes(model_path: Path, bits: int, block_size: int, symmetric: bool, scale_bytes: int) -> int:
    """Bytes of the tied table in tied-embedding's form (0 when there is no embedding Gather)."""
    import onnx
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            V, H = inits[n.input[0]].dims
            kb = -(-H // block_size)
            return V * kb * block_size * bits // 8 + V * kb * scale_bytes + (0 if symmetric else V * -(-kb * bits // 8))
    return 0


def _check_runtimes(model: onnx.ModelProto, fname: str, dtype: str, target: str) -> None:
    """Refuse a file that a runtime the folder is made for cannot load or runs wrongly (graphkit/runtimes.py),
    e.g. an 8-bit --pipeline override with --target transformers.js@3. The folder's own config (kv_cache_dtype)
    is written after the files, so config-level checks belong to `graphkit inspect`."""
    from graphkit.runtimes import TARGET_RUNTIMES, check_model
    # graph only, no weight is read; caveats that depend on the device (e.g. a WebGPU adapter) are inspect's
    problems = check_model(model, None, dtype, TARGET_RUNTIMES[target], conditional=False)
    if problems:
        p = problems[0]
        raise GraphkitError(f"onnx/{fname} is made for --target {target} but {p['message']} Fix: {p['fix']}")


def _link_files(export: Path, dest: Path) -> list[Path]:
    """The fp32 file is the export itself: hard-link it and its data chunks (copy where links fail)
    instead of writing gigabytes again. Same file name, so the external-data locations stay valid."""
    files = [export] + sorted(export.parent.glob(export.name + "_data*"))
    out = []
    for f in files:
        target = dest.parent / f.name
        try:
            os.link(f, target)
        except OSError:
            shutil.copyfile(f, target)
        out.append(target)
    return out


def _shared_prefix(pipelines: list[list[str]]) -> list[str]:
    """The leading passes that the most pipelines share (at least two, and at least two passes: logits-to-keep alone
    adds no weights, nothing is gained by sharing it); the longest such prefix, [] if none."""
    best: tuple[int, int] = (1, 0)
    out: list[str] = []
    for p in pipelines:
        for n in range(2, len(p) + 1):
            count = sum(q[:n] == p[:n] for q in pipelines)
            if count >= 2 and (count, n) > best:
                best, out = (count, n), p[:n]
    return out


def _pass_names(spec: str) -> list[str]:
    """The passes of a spec as ``describe()`` strings (empty if the spec is empty or invalid: the
    dtype's own run reports that error)."""
    from graphkit.pipeline import parse_spec
    try:
        return [p.describe() for p in parse_spec(spec)] if spec else []
    except GraphkitError:
        return []


def _export(model_dir: Path, scratch: Path, adapter_dir: Path | None, exporter: str, stream: bool, step) -> None:
    """The fp32 export every pipeline starts from, always with external data (never a 2 GB protobuf);
    export_model picks streaming or in memory."""
    from graphkit.export import export_model
    export_model(model_dir, scratch, adapter_dir, exporter=exporter, external_data=True, stream=stream, progress=step)


# onnxruntime's CPU provider runs float16 ops in float32 behind Casts it folds into a float32 copy of every
# weight (measured, 1.5B: 8.6 GB peak for the fp16 file's session); above this size convert's quick agreement
# check leaves fp16 to `graphkit verify`, so that convert itself stays within its conversion memory.
AGREEMENT_MAX_FP16_BYTES = 1 << 30


def _agreement(folder: Path, results: list[DtypeResult], output: Path, torch_free: bool = False) -> None:
    from graphkit.prompts import DEFAULT_PROMPTS, encode_prompts, encode_prompts_tokenizers
    from graphkit.verify import OnnxReference, check_variant, reference_runs
    # from an ONNX export nothing may import torch (transformers' AutoTokenizer does): tokenizers + jinja2
    prompts = (encode_prompts_tokenizers if torch_free else encode_prompts)(folder, DEFAULT_PROMPTS[:2])
    runs = reference_runs(OnnxReference(folder / "onnx" / "model.onnx"), prompts, 16)
    for r in results:
        if r.ok and r.dtype == "fp16" and r.bytes > AGREEMENT_MAX_FP16_BYTES:
            r.agreement_note = (f"fp16 not checked here: onnxruntime CPU would hold a float32 copy of its weights "
                                f"(~{2 * r.bytes / 1e9:.1f} GB); run `graphkit verify {output} --dtypes fp16`")
        elif r.ok and r.dtype != "fp32":
            rep = check_variant(r.dtype, folder / r.file, runs)
            r.top1_vs_fp32, r.kl_vs_fp32 = round(rep.top1_agreement, 4), round(rep.kl_mean, 5)


def render(summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from graphkit.console import fmt_bytes, out
    table = Table(title=f"graphkit convert → {summary['output']} ({summary['total_s']} s)")
    # the figures that matter first: below 80 columns the console splits the table after them (console.fit_table)
    for col in ("dtype", "size", "top-1", "KL", "status", "file", "time s", "peak RSS"):
        table.add_column(col, no_wrap=True)
    for d in summary["dtypes"]:
        table.add_row(d["dtype"], fmt_bytes(d["bytes"]) if d["ok"] else "-",
                      "-" if d["top1_vs_fp32"] is None else f"{d['top1_vs_fp32']:.3f}",
                      "-" if d["kl_vs_fp32"] is None else f"{d['kl_vs_fp32']:.5f}",
                      "[green]ok[/]" if d["ok"] else "[red]FAILED[/]",
                      d["file"].removeprefix("onnx/"), str(d["seconds"]),
                      fmt_bytes(d["peak_rss"]) if d.get("peak_rss") else "-")
    out.print(table)
    out.print("top-1 agreement and KL: teacher-forced against the fp32 model on the default prompts; "
              "peak RSS: the process's highest resident memory during that step (fp32: the export)", markup=False)
    if summary.get("peak_rss"):
        out.print(f"peak RSS of the whole run: {fmt_bytes(summary['peak_rss'])} (in {summary['peak_rss_step']})",
                  markup=False)
    for d in summary["dtypes"]:
        if not d["ok"]:
            out.print(f"[red]{d['dtype']} failed:[/] {escape(d['error'] or '')}", soft_wrap=True)
        elif d.get("agreement_note"):
            out.print(d["agreement_note"], markup=False, soft_wrap=True)
        for w in d.get("warnings") or []:
            out.print(f"warning: {d['file']}: {w}", markup=False, soft_wrap=True)
    out.print("meant for: " + "; ".join(f"{d['dtype']}: {DEVICE_FOR.get(d['dtype'], '-')}" for d in summary["dtypes"] if d["ok"]),
              markup=False, soft_wrap=True)
    out.print("pipelines: " + "; ".join(f"{d['dtype']}: {' → '.join(d['passes'] or []) or 'export'}" for d in summary["dtypes"] if d["ok"]),
              markup=False, soft_wrap=True)
    usage = Path(summary["output"]) / "USAGE.md"
    if usage.is_file():  # the few lines that load the folder in an app (also written there)
        from graphkit.usage import extract_snippet
        out.print(f"\nload it in your app with Transformers.js ({usage}; try it first: graphkit serve {summary['output']}):\n",
                  markup=False, soft_wrap=True)
        out.print(extract_snippet(usage.read_text(encoding="utf-8")), markup=False, soft_wrap=True, highlight=False)
