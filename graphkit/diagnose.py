"""Known causes of a model that loads but generates garbage, found from the files alone (no PyTorch).

`graphkit inspect` calls :func:`model_diagnoses` for each .onnx and :func:`folder_diagnoses` for a
model folder; `graphkit convert` from an ONNX export calls :func:`blocking` to refuse a wrong fp32.
Every finding is ``{"level", "code", "message", "fix", "evidence"}`` (``evidence``: what was
measured in the files, JSON-ready). Errors are causes of wrong tokens; warnings are known accuracy
costs with the figure measured for them.

* ``act-quant-per-tensor`` (error): ``DynamicQuantizeLinear`` → ``MatMulInteger`` (or
  ``DynamicQuantizeMatMul``) in a decoder: one uint8 scale for a whole activation tensor. The
  massive activations of a few tokens set it for the whole prompt (docs/q8.md: the stock recipe
  falls to top-1 0.305 where per-token scales hold 0.953).
* ``rope-mismatch`` (error): the rotary frequencies in the graph (an ``inv_freq`` constant, or
  cos/sin caches: row 1 is cos/sin of inv_freq) differ from the ones config.json's ``rope_parameters``
  / ``rope_theta`` / ``rope_scaling`` give (default, linear, dynamic, llama3 are computed; other
  types are not checked). ``config-rope-conflict`` (warning): config.json states two thetas.
* ``config-vocab`` (error): the logits width is not config.json's ``vocab_size``.
* ``tokenizer-digits`` (error): a Qwen tokenizer.json without Qwen's digit-splitting regex:
  transformers 5 rebuilds the Qwen2 pre-tokenizer with it whatever tokenizer.json says,
  Transformers.js uses tokenizer.json as is, so the browser sees other ids for every number.
* ``fp16-norm-variance``, ``fp16-softmax``, ``int4-lm-head``, ``accuracy-level-4`` (warnings).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from graphkit.modelview import all_initializers, all_nodes, attr_value, producers, tensor_array
from graphkit.tjs_contract import INPUT_IDS, LOGITS

REQUANT_FIX = ("re-quantize from the fp32 model with per-token activation scales: `graphkit convert FOLDER -o OUT` "
               "(its q8 is `matmul-int8`), or `graphkit apply model.onnx -o model_quantized.onnx --passes "
               "kv-rename,matmul-int8`")
REEXPORT_FIX = ("re-export with graphkit from the Hugging Face folder: `graphkit convert MODEL_DIR -o OUT` (reads "
                "rope_parameters the way transformers 5 does)")
MOVE_OPS = {"Reshape", "Identity", "Cast", "Unsqueeze", "Squeeze", "Transpose", "Flatten", "Expand"}
QWEN_TYPES = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen2_vl", "qwen2_5_vl"}
QWEN_DIGITS = "\\p{N}"


def finding(level: str, code: str, message: str, fix: str, evidence: dict[str, Any]) -> dict[str, Any]:
    return {"level": level, "code": code, "message": message, "fix": fix, "evidence": evidence}


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.4g}"


# ----------------------------------------------------------------------------- activation quantization

def act_quant_findings(model: onnx.ModelProto, decoder: bool) -> list[dict]:
    nodes = all_nodes(model.graph)
    producer = producers(nodes)

    def from_dql(name: str) -> bool:
        for _ in range(6):
            n = producer.get(name)
            if n is None:
                return False
            if n.op_type == "DynamicQuantizeLinear":
                return True
            if n.op_type not in MOVE_OPS:
                return False
            name = n.input[0]
        return False

    per_tensor, act_act = [], []
    for n in nodes:
        if n.op_type == "MatMulInteger" and from_dql(n.input[0]):
            per_tensor.append(n.name or n.output[0])
            if len(n.input) > 1 and from_dql(n.input[1]):
                act_act.append(n.name or n.output[0])
        elif n.op_type == "DynamicQuantizeMatMul":  # com.microsoft: the same per-tensor quantizer, fused
            per_tensor.append(n.name or n.output[0])
    if not per_tensor or not decoder:
        return []
    down = [x for x in per_tensor if "down_proj" in x]
    rotary = [x for x in act_act if "rotary" in x.lower()]
    evidence = {"DynamicQuantizeLinear": sum(n.op_type == "DynamicQuantizeLinear" for n in nodes),
                "per_tensor_matmuls": len(per_tensor), "activation_x_activation": len(act_act),
                "rotary_quantized": rotary, "examples": (down or per_tensor)[:3]}
    msg = (f"per-tensor dynamic activation quantization: {len(per_tensor)} MatMul(s) quantize their input with "
           "DynamicQuantizeLinear (one uint8 scale for the whole tensor): the massive activations of a few tokens "
           "(down_proj inputs) set the scale for every token of the prompt — the known cause of garbage from "
           "dynamic int8 (docs/q8.md: top-1 0.305 vs 0.953 per token)")
    if act_act:
        msg += (f"; {len(act_act)} of them quantize two activations (attention scores/values"
                + (", and the rotary angles" if rotary else "") + ")")
    return [finding("error", "act-quant-per-tensor", msg, REQUANT_FIX, evidence)]


# ------------------------------------------------------------------------------------------ rotary

def _rope_settings(config: dict) -> tuple[dict, list[dict]]:
    """(settings, conflict findings): theta, type and scaling as transformers 5 reads config.json."""
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    scaling = config.get("rope_scaling") if isinstance(config.get("rope_scaling"), dict) else {}
    top = config.get("rope_theta")
    theta = params.get("rope_theta", top)
    out: list[dict] = []
    if top is not None and params.get("rope_theta") is not None and not math.isclose(float(top), float(theta),
                                                                                      rel_tol=1e-6):
        out.append(finding("warning", "config-rope-conflict",
                           f"config.json states two rotary bases: rope_parameters.rope_theta={_fmt(float(theta))} and "
                           f"rope_theta={_fmt(float(top))} (a transformers 4.x tool that did not read rope_parameters "
                           "writes the default 10,000 beside them); transformers 5 uses rope_parameters",
                           "keep the value the model was trained with in both (rope_parameters is transformers 5's), "
                           "then re-export", {"rope_parameters.rope_theta": theta, "rope_theta": top}))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    return {"theta": float(theta) if theta is not None else None, "type": rope_type, "params": merged}, out


def expected_inv_freq(config: dict) -> tuple[np.ndarray | None, str]:
    """inv_freq that config.json implies (float64), or (None, why not checkable)."""
    rope, _ = _rope_settings(config)
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0)
    partial = float(rope["params"].get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
    dim = int(head_dim * partial)
    if not dim or rope["theta"] is None:
        return None, "config.json has no head_dim/rope_theta"
    inv = 1.0 / (rope["theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind, p = rope["type"], rope["params"]
    if kind in ("default", "dynamic"):  # dynamic NTK equals default up to the trained length
        return inv, kind
    if kind == "linear":
        return inv / float(p.get("factor", 1.0)), kind
    if kind == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, smoothed, out), kind
    return None, f"rope_type {kind!r} is not checked"


def _theta_of(freq: np.ndarray) -> float | None:
    """The base θ a default-rope inv_freq vector was made with: inv_freq[1] = θ^(-2/dim)."""
    if freq.size < 2 or not 0 < freq[1] < 1:
        return None
    return float(freq[1] ** (-freq.size))


def graph_rope_frequencies(model: onnx.ModelProto, base_dir: Path, half: int) -> list[tuple[str, str, np.ndarray]]:
    """Rotary frequency vectors found in constants: (tensor, form, inv_freq). Forms: ``inv_freq`` (a
    positive decreasing vector of head_dim/2 values ≤ 1), ``cos cache`` / ``sin cache`` ([positions,
    head_dim/2 or head_dim], row 0 = cos/sin 0, row 1 = cos/sin of inv_freq)."""
    found = []
    for name, t in all_initializers(model.graph).items():
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE) or not t.dims:
            continue
        dims = [int(d) for d in t.dims]
        n = int(np.prod(dims))
        try:
            if n == half:
                a = np.asarray(tensor_array(t, base_dir), np.float64).reshape(-1)
                if np.all(np.isfinite(a)) and np.all(a > 0) and a[0] <= 1 + 1e-6 and np.all(np.diff(a) < 0):
                    found.append((name, "inv_freq", a))
            elif len([d for d in dims if d > 1]) == 2 and dims[-1] in (half, 2 * half) and n // dims[-1] >= 2:
                a = np.asarray(tensor_array(t, base_dir).reshape(-1, dims[-1])[:2], np.float64)  # 2 rows only
                row0, row1 = a[0, :half], a[1, :half]
                if np.allclose(row0, 1, atol=1e-3) and np.all(np.abs(row1) <= 1):
                    found.append((name, "cos cache", np.arccos(np.clip(row1, -1, 1))))
                elif np.allclose(row0, 0, atol=1e-3) and np.all(np.abs(row1) <= 1) and np.all(row1 > 0):
                    found.append((name, "sin cache", np.arcsin(np.clip(row1, -1, 1))))
        except (OSError, ValueError):  # missing/short external data: the external-data checks name it
            continue
    return found


def rope_findings(model: onnx.ModelProto, base_dir: Path, config: dict | None) -> list[dict]:
    if not config:
        return []
    rope, out = _rope_settings(config)
    want, kind = expected_inv_freq(config)
    if want is None:
        return out
    found = graph_rope_frequencies(model, base_dir, want.size)
    if not found:
        return out
    # caches give the angle through arccos/arcsin of float32/16 values: ~1e-3 absolute near 0
    matches = [(n, f) for n, f, a in found if np.allclose(a, want, rtol=2e-3, atol=1e-6 if f == "inv_freq" else 2e-3)]
    if matches:
        return out
    name, form, got = found[0]
    theta = _theta_of(got)
    source = "rope_parameters" if isinstance(config.get("rope_parameters"), dict) else "rope_theta"
    evidence = {"tensor": name, "form": form, "graph_inv_freq": [round(float(x), 8) for x in got[:4]],
                "config_inv_freq": [round(float(x), 8) for x in want[:4]], "graph_theta": theta,
                "config_theta": rope["theta"], "rope_type": kind}
    msg = (f"rotary frequencies in the graph ({form} '{name}'"
           + (f": rope_theta ≈ {_fmt(theta)}" if theta else "") + f") differ from config.json's {source} "
           f"(rope_theta {_fmt(rope['theta'])}, {kind}): every position is rotated by the wrong angle — the fp32 "
           "export itself is wrong, and every file made from it")
    if theta and abs(theta - 10000) < 1 and rope["theta"] != 10000:
        msg += " (10,000 is transformers 4.x's default: the exporter did not read rope_parameters)"
    return out + [finding("error", "rope-mismatch", msg, REEXPORT_FIX, evidence)]


# ------------------------------------------------------------------------------------- config vs graph

def vocab_findings(report: dict, config: dict | None) -> list[dict]:
    if not config or not config.get("vocab_size"):
        return []
    logits = next((e for e in report["outputs"] if e["name"] == LOGITS), None)
    width = logits["shape"][-1] if logits and logits["shape"] else None
    if isinstance(width, int) and width != int(config["vocab_size"]):
        return [finding("error", "config-vocab", f"logits are {width} wide but config.json says vocab_size="
                        f"{config['vocab_size']}: token ids and the tokenizer do not line up with the weights",
                        "use the config.json that belongs to these weights, or re-export",
                        {"logits_width": width, "config_vocab_size": config["vocab_size"]})]
    return []


# ------------------------------------------------------------------------------------------ float16

def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value, by ONNX shape inference on a copy without weight data (large
    initializers become typed graph inputs: a 1 GB inline fp16 file is not copied for this)."""
    from graphkit.modelio import graph_skeleton
    light = graph_skeleton(model, min_bytes=4097)  # small ones can carry shapes (Reshape targets, axes)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # an unknown contrib op or a broken graph: use what the file states
        inferred = light
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def fp16_findings(model: onnx.ModelProto, report: dict) -> list[dict]:
    if report.get("float_weights") != "float16":
        return []
    nodes = all_nodes(model.graph)
    producer = producers(nodes)
    types = _elem_types(model)
    f16 = TensorProto.FLOAT16
    var = []
    for n in nodes:
        if n.op_type != "ReduceMean" or types.get(n.input[0]) != f16:
            continue
        p = producer.get(n.input[0])
        if p is not None and (p.op_type == "Pow" or (p.op_type == "Mul" and len(p.input) == 2
                                                     and p.input[0] == p.input[1])):
            var.append(n.name or n.output[0])
    soft = [n.name or n.output[0] for n in nodes if n.op_type in ("Softmax", "LogSoftmax") and types.get(n.input[0]) == f16]
    out = []
    if var:
        out.append(finding("warning", "fp16-norm-variance",
                           f"{len(var)} norm variance(s) computed in float16 (x² then mean): a hidden value above 256 "
                           "squares past float16's 65,504 and the norm silently returns 0 — onnxruntime#31626 measured "
                           "630,000 in a decomposed LayerNorm; graphkit's fp16 keeps this chain in float32",
                           "convert from the fp32 model with `graphkit convert` / `graphkit apply --passes fp16`",
                           {"nodes": var[:3], "count": len(var)}))
    if soft:
        out.append(finding("warning", "fp16-softmax",
                           f"{len(soft)} Softmax(es) computed in float16: scores and the additive mask are rounded to "
                           "11 bits before exp (a mask fill beyond -65,504 becomes -inf, and a fully masked row NaN); "
                           "graphkit's fp16 keeps Softmax and its mask Add in float32",
                           "convert from the fp32 model with `graphkit convert` / `graphkit apply --passes fp16`",
                           {"nodes": soft[:3], "count": len(soft)}))
    return out


# ------------------------------------------------------------------------------------- 4-bit choices

def nbits_findings(model: onnx.ModelProto, report: dict, config: dict | None) -> list[dict]:
    logits = next((e for e in report["outputs"] if e["name"] == LOGITS), None)
    vocab = logits["shape"][-1] if logits and logits["shape"] and isinstance(logits["shape"][-1], int) else None
    vocab = vocab or (config or {}).get("vocab_size")
    nbits = [n for n in all_nodes(model.graph) if n.op_type == "MatMulNBits"]
    out = []
    head = [n for n in nbits if vocab and attr_value(n, "N", 0) == vocab and attr_value(n, "bits", 4) == 4]
    if head:
        n = head[0]
        out.append(finding("warning", "int4-lm-head",
                           f"the lm_head is 4-bit (block {attr_value(n, 'block_size')}): measured on the shipped "
                           "example, a 4-bit head costs KL 8.8e-3–1.0e-2 and top-1 0.963–0.975 against 2.3e-3 / 0.981 "
                           "for an 8-bit head (docs/accuracy-level.md §4); graphkit's q4 uses 8 bits, its q4f16 keeps "
                           "4 bits for size",
                           "8-bit head: `tied-embedding(bits=8,block_size=128,accuracy_level=4)` before matmul-nbits "
                           "(graphkit's q4 pipeline)",
                           {"node": n.name or n.output[0], "N": vocab, "bits": 4,
                            "block_size": attr_value(n, "block_size")}))
    level4 = [n for n in nbits if attr_value(n, "accuracy_level", 0) == 4]
    if level4:
        out.append(finding("warning", "accuracy-level-4",
                           f"{len(level4)} MatMulNBits use accuracy_level=4 (int8 activations per block inside the "
                           "kernel): measured on the shipped example KL +1 % and no greedy token flipped "
                           "(docs/accuracy-level.md §1), but onnxruntime#29849 shows flipped greedy tokens on models "
                           "with massive activations (Qwen3-0.6B)",
                           "`graphkit verify` measures it on your model; if it fails, `--pipeline` with "
                           "accuracy_level=0 (about 1.5x slower decode on CPU)",
                           {"nodes": len(level4), "of": len(nbits)}))
    return out


# ------------------------------------------------------------------------------------------ entries

def is_decoder(report: dict) -> bool:
    names = {e["name"] for e in report["inputs"]} | {e["name"] for e in report["outputs"]}
    return LOGITS in names or INPUT_IDS in names


def model_diagnoses(model: onnx.ModelProto, path: Path, report: dict, config: dict | None) -> list[dict]:
    """Findings for one .onnx (``report``: inspect_model's, before findings)."""
    return (act_quant_findings(model, is_decoder(report)) + rope_findings(model, path.parent, config)
            + vocab_findings(report, config) + fp16_findings(model, report) + nbits_findings(model, report, config))


def _regexes(pre: Any) -> list[str]:
    if not isinstance(pre, dict):
        return []
    out = []
    if pre.get("type") == "Split":
        pat = pre.get("pattern") or {}
        out.append(pat.get("Regex") or re.escape(pat.get("String", "")))
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        out.append("ByteLevel(use_regex=true): GPT-2's regex, digits grouped (\\p{N}+)")
    for sub in pre.get("pretokenizers") or []:
        out += _regexes(sub)
    return out


def _splits_digits(regex: str) -> bool:
    """Does the regex take digits one at a time (\\p{N} not followed by a quantifier)?"""
    i = regex.find(QWEN_DIGITS)
    while i >= 0:
        nxt = regex[i + len(QWEN_DIGITS):i + len(QWEN_DIGITS) + 1]
        if nxt not in ("+", "*", "{"):
            return True
        i = regex.find(QWEN_DIGITS, i + 1)
    return False


def tokenizer_findings(folder: Path, config: dict | None, tok_cfg: dict | None) -> list[dict]:
    path = folder / "tokenizer.json"
    qwen = (config or {}).get("model_type") in QWEN_TYPES or \
        str((tok_cfg or {}).get("tokenizer_class", "")).startswith("Qwen2Tokenizer")
    if not qwen or not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):  # not a tokenizer (the missing-file
        return []                                                                # and bad-json checks say so)
    regexes = _regexes(data.get("pre_tokenizer"))
    if any(_splits_digits(r) for r in regexes):
        return []
    evidence: dict[str, Any] = {"pre_tokenizer_regexes": regexes}
    try:  # show the difference on a number with the file's own tokenizer
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(path))
        evidence["browser_pieces_for_2024"] = tok.pre_tokenizer.pre_tokenize_str("2024")[:4] if tok.pre_tokenizer else None
    except Exception:
        pass
    return [finding("error", "tokenizer-digits",
                    "tokenizer.json's pre-tokenizer lacks Qwen's digit-splitting regex (\\p{N} one digit at a time): "
                    "transformers 5 rebuilds the Qwen2 tokenizer with that regex whatever tokenizer.json says, "
                    "Transformers.js uses tokenizer.json as is — every number is tokenized differently in the browser "
                    "than in Python (and than in training)",
                    "put Qwen's Split regex in tokenizer.json's pre_tokenizer (Sequence[Split(Qwen regex, isolated), "
                    "ByteLevel(use_regex=false)]), as the original Qwen tokenizer.json has", evidence)]


def folder_diagnoses(folder: Path, config: dict | None, tok_cfg: dict | None) -> list[dict]:
    return tokenizer_findings(folder, config, tok_cfg)


BLOCKING = {"act-quant-per-tensor", "rope-mismatch", "config-vocab", "config-layers", "config-kv-shape"}


def blocking(findings: list[dict]) -> list[dict]:
    """The findings that make an ONNX export unusable as the fp32 source of `convert`."""
    return [f for f in findings if f["code"] in BLOCKING and f["level"] == "error"]


# ------------------------------------------------------------------------------------------ verdict

def verdict(report: dict) -> dict[str, Any]:
    """The one-line answer `inspect` leads with: which errors (causes of garbage first), each with its file."""
    items = [(None, f) for f in report.get("findings", [])]
    items += [(Path(m["path"]).name, f) for m in report.get("models", []) for f in m["findings"]]
    if report.get("kind") == "model":
        items = [(Path(report["path"]).name, f) for f in report["findings"]]
    errors = [(src, f) for src, f in items if f["level"] == "error"]
    errors.sort(key=lambda x: x[1]["code"] not in BLOCKING)  # the causes of wrong tokens first
    ok = not errors
    return {"ok": ok, "errors": [{"file": src, "code": f["code"], "fix": f["fix"]} for src, f in errors],
            "warnings": sum(f["level"] == "warning" for _, f in items),
            "text": "no known cause of wrong output found" if ok else
            f"{len(errors)} error(s): " + "; ".join(dict.fromkeys(f["code"] for _, f in errors))}


def render_verdict(report: dict, console) -> None:
    from rich.markup import escape
    v = verdict(report)
    if v["ok"]:
        console.print(f"[bold green]✓ verdict: {v['text']}[/] ({v['warnings']} warning(s), details below)")
        return
    console.print(f"[bold red]✗ verdict: {escape(v['text'])}[/]")
    every = [(None, f) for f in report.get("findings", [])] + \
        [(Path(m["path"]).name, f) for m in report.get("models", []) for f in m["findings"]]
    if report.get("kind") == "model":
        every = [(Path(report["path"]).name, f) for f in report["findings"]]
    shown = set()
    for src, f in sorted(every, key=lambda x: x[1]["code"] not in BLOCKING):
        if f["level"] != "error" or (f["code"], f["message"]) in shown:
            continue
        shown.add((f["code"], f["message"]))
        where = f"{src}: " if src else ""
        console.print(f"  [red]•[/] [bold]{escape(f['code'])}[/] {escape(where + f['message'])}", soft_wrap=True)
        console.print(f"    [cyan]fix: {escape(f['fix'])}[/]", soft_wrap=True)
    console.print(f"  ({v['warnings']} warning(s); details below)")
