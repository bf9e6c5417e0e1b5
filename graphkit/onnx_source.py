"""`graphkit convert` from an ONNX export the user already has (no PyTorch, weights stay on disk).

A MODEL_DIR without PyTorch weights (``*.safetensors`` / ``pytorch_model*.bin``) but with an ONNX
decoder — an optimum export (``model.onnx`` beside ``config.json`` and the tokenizer) or a
Transformers.js folder (``onnx/model.onnx``), external data included — is the fp32 source instead
of a fresh export. Before any file is written it is checked the way ``graphkit inspect`` checks it
(:mod:`graphkit.diagnose`) and refused, naming the file and the fix, when:

* it is not the fp32 model (already quantized, or float16): quantizing again from it stacks errors;
  point MODEL_DIR at the fp32 export;
* its rotary frequencies disagree with config.json (a transformers 4.x export of a transformers 5
  config), or its layers / KV heads / head dim / vocabulary disagree with config.json: every file
  made from it would be wrong.

Then ``kv-rename`` (with config.json for the KV dims) gives it the Transformers.js I/O contract and
the result is staged, tensors copied file to file, as the export every pipeline starts from. This
module must not import torch or transformers (tested).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from graphkit.errors import GraphkitError
from graphkit.tjs_contract import DTYPE_FILES, ONNX_DIR

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
FP32_NAMES = (f"{ONNX_DIR}/{DTYPE_FILES['fp32']}", DTYPE_FILES["fp32"])  # Transformers.js layout, then optimum's


def find_onnx_source(model_dir: Path) -> Path | None:
    """The fp32 ONNX decoder to convert from, or None when MODEL_DIR is a PyTorch model folder (or has no
    ONNX at all: the Hugging Face path names what is missing). A folder with only quantized/fp16 ONNX
    files is refused here."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or any(next(model_dir.glob(g), None) for g in WEIGHT_GLOBS):
        return None
    for name in FP32_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    others = sorted(str(p.relative_to(model_dir)) for p in list(model_dir.glob("*.onnx")) + list(model_dir.glob(f"{ONNX_DIR}/*.onnx")))
    if others:
        raise GraphkitError(f"{model_dir}: holds {', '.join(others[:4])} but no fp32 model.onnx; convert starts from "
                            "the fp32 export (quantizing a quantized or float16 file again stacks the errors) — point "
                            "MODEL_DIR at the folder with the fp32 model.onnx, or at the Hugging Face model folder")
    return None


def _refuse_not_fp32(src: Path, report: dict) -> None:
    q = report["quantization"]["quantized"]
    if q:
        kinds = ", ".join(f"{k} ×{v['count']}" for k, v in q.items())
        raise GraphkitError(f"{src}: already quantized ({kinds}, looks "
                            f"like {report['detected_dtype']}); convert starts from the fp32 export — point MODEL_DIR "
                            "at the folder with the fp32 model.onnx (optimum: the export before ORTQuantizer)")
    if report["float_weights"] not in (None, "float"):
        raise GraphkitError(f"{src}: weights are {report['float_weights']}, not float32; convert starts from the fp32 "
                            "export — point MODEL_DIR at the folder with the fp32 model.onnx")


def _has_inline_weights(model, min_bytes: int = 1 << 20) -> bool:
    from onnx import TensorProto

    from graphkit.modelio import iter_tensors
    return any(t.data_location != TensorProto.EXTERNAL and len(t.raw_data) >= min_bytes for t in iter_tensors(model))


def _weights_report(model, base_dir: Path) -> dict:
    """The parts of inspect's report that say whether this is an fp32 model (no file needed)."""
    from graphkit.inspect import _float_weight_dtype, detected_dtype, dtype_name, quantization_report, tensor_nbytes
    from graphkit.modelio import iter_tensors
    by_dtype: dict = {}
    for t in iter_tensors(model):
        d = by_dtype.setdefault(dtype_name(t.data_type), {"count": 0, "bytes": 0})
        d["count"] += 1
        d["bytes"] += tensor_nbytes(t)
    report = {"quantization": quantization_report(model, base_dir), "float_weights": _float_weight_dtype(by_dtype)}
    report["detected_dtype"] = detected_dtype(report)
    return report


def prepare_onnx_source(model_dir: Path, src: Path, scratch: Path, step: Callable[[str], None]) -> dict:
    """Check ``src`` (refusing a wrong fp32), kv-rename it and stage it at ``scratch`` with external data.
    Returns {"source", "passes", "warnings"}.

    Memory: a file with inline weights (< 2 GB, no external data) is parsed once and its weights are
    written out to a staging file straight away; everything after that (the checks, kv-rename with its
    checker and shape inference, the pipelines) works on a weight-free proto reading tensors from disk."""
    from graphkit.diagnose import blocking
    from graphkit.hfmodel import read_json
    from graphkit.inspect import inspect_model
    from graphkit.memory import release_free_memory
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    config = read_json(config_path, "an ONNX export needs its config.json beside it (Transformers.js reads it)")
    scratch.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(src, load_external="lazy")  # external tensors stay on disk, read one at a time
    if _has_inline_weights(model):
        staged = scratch.with_name("source.onnx")
        step(f"moving the inline weights of {src.name} to {staged.name}_data (the rest works from disk)")
        save_model(model, staged, external_data=True)
        del model
        release_free_memory()
        model = load_model(staged, load_external="lazy")
    _refuse_not_fp32(src, _weights_report(model, scratch.parent))  # before kv-rename: it may not parse such graphs
    spec = f"kv-rename(config={config_path})"
    model, reports = run_passes(model, parse_spec(spec), on_report=lambda r: step("   " + r.line()))
    save_model(model, scratch, external_data=True)
    del model
    release_free_memory()
    for leftover in scratch.parent.glob("source.onnx*"):
        leftover.unlink()
    step(f"checking {src.name} against {config_path.name} (as `graphkit inspect` does)")
    report = inspect_model(scratch, config)
    _refuse_not_fp32(src, report)
    bad = blocking(report["findings"])
    if bad:
        f = bad[0]
        raise GraphkitError(f"{src}: cannot convert: {f['message']}; fix: {f['fix']}")
    errors = [f for f in report["findings"] if f["level"] == "error"]
    if errors:
        f = errors[0]
        raise GraphkitError(f"{src}: after kv-rename the graph still breaks Transformers.js: {f['message']}; "
                            f"fix: {f['fix']}")
    warnings = [f"{f['code']}: {f['message']}" for f in report["findings"] if f["level"] == "warning"]
    for w in warnings:
        step(f"   warning: {w}")
    return {"source": os.fspath(src), "passes": [r.name for r in reports if r.modified], "warnings": warnings}
