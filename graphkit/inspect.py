"""`graphkit inspect`: what is in an ONNX file or a Transformers.js model folder, and what would break.

Every function here returns plain dicts (the ``--json`` output); ``render_*`` turns them into rich
tables. This module must start fast: it never imports torch or transformers, and it reads weight
values only where a check needs them (tied-head detection), through memory maps.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from rich.markup import escape

from graphkit.modelio import iter_tensors, load_model
from graphkit.modelview import all_initializers, all_nodes, attr_value, producers, tensor_array
from graphkit.tjs_contract import (CHUNK_LIMIT, DTYPE_SUFFIX, KNOWN_INPUTS, PAST_RE, PRESENT_RE,
                                   TJS_CONFIG, USE_EXTERNAL_DATA, external_data_pattern, split_file_name)

KV_HINT = re.compile(r"past|present|cache|key|value|kv", re.I)
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
RESAVE_FIX = "re-save with `graphkit apply` (any pass) or `graphkit convert`"
QUANT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}


# ------------------------------------------------------------------------------------------ helpers

def dtype_name(dt: int) -> str:
    return TensorProto.DataType.Name(dt).lower() if dt in TensorProto.DataType.values() else f"type{dt}"


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes the tensor's data takes, without reading external data."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    elif t.HasField("raw_data"):
        return len(t.raw_data)
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return 0


def io_entry(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return {"name": vi.name, "dtype": dtype_name(tt.elem_type), "shape": shape}


def external_files(model: onnx.ModelProto, base_dir: Path) -> list[dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for t in iter_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        entry = files.setdefault(loc, {"name": loc, "bytes": None, "tensors": 0, "referenced_bytes": 0})
        entry["tensors"] += 1
        entry["referenced_bytes"] += tensor_nbytes(t)
    for loc, entry in files.items():
        p = base_dir / loc
        entry["bytes"] = p.stat().st_size if p.is_file() else None
    return sorted(files.values(), key=lambda e: e["name"])


# ------------------------------------------------------------------------------------ quantization

class _Graph:
    """Lookup tables over one model (all subgraphs flattened)."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.nodes = all_nodes(model.graph)
        self.inits = all_initializers(model.graph)
        self.producer = producers(self.nodes)

    def resolve(self, name: str) -> tuple[str | None, list[str]]:
        """Follow value-preserving ops back to an initializer: (initializer name or None, ops walked)."""
        walked: list[str] = []
        for _ in range(8):
            if name in self.inits:
                return name, walked
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Cast", "Identity", "Transpose", "Reshape", "DequantizeLinear",
                                                    "Unsqueeze", "Squeeze", "Flatten"):
                return None, walked
            walked.append(node.op_type)
            name = node.input[0]
        return None, walked


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """a == b, chunked so memory-mapped tables are never loaded whole."""
    if a.shape != b.shape:
        return False
    exact = a.dtype == b.dtype
    rows = max(1, 8_000_000 // max(1, int(np.prod(a.shape[1:]) or 1)))
    for start in range(0, a.shape[0] if a.ndim else 1, rows):
        x, y = (a[start:start + rows], b[start:start + rows]) if a.ndim else (a, b)
        if exact:
            if not np.array_equal(x, y):
                return False
        elif not np.allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-2, atol=1e-3):
            return False
    return True


def _is_tied(g: _Graph, weight: str, trans_b: bool, tables: dict[str, TensorProto]) -> bool:
    if weight in tables:
        return True
    w = g.inits[weight]
    if len(w.dims) != 2:
        return False
    for table in tables.values():
        if len(table.dims) != 2:
            continue
        want = tuple(table.dims) if trans_b else tuple(table.dims)[::-1]
        if tuple(w.dims) != want:
            continue
        wa, ta = tensor_array(w, g.base_dir), tensor_array(table, g.base_dir)
        if same_values(wa if trans_b else wa.T, ta):
            return True
    return False


def quantization_report(model: onnx.ModelProto, base_dir: Path) -> dict[str, Any]:
    """Share of MatMul weights that are quantized, and why the rest stayed float."""
    g = _Graph(model, base_dir)
    gathers = [n for n in g.nodes if n.op_type in ("Gather", "GatherBlockQuantized") and n.input]
    tables: dict[str, TensorProto] = {}
    gather_tables = []
    for n in gathers:
        src, _ = g.resolve(n.input[0])
        if src is None or len(g.inits[src].dims) < 2:
            continue
        t = g.inits[src]
        if n.op_type == "Gather":
            tables[src] = t
        gather_tables.append({"name": src, "node": n.name, "op": n.op_type, "dtype": dtype_name(t.data_type),
                              "shape": list(t.dims), "bytes": tensor_nbytes(t),
                              "quantized": n.op_type == "GatherBlockQuantized" or t.data_type in QUANT_TYPES})
    kinds: dict[str, dict[str, Any]] = {}
    float_reasons: dict[str, dict[str, Any]] = {k: {"count": 0, "bytes": 0, "params": 0, "nodes": []}
                                                for k in ("tied_head", "non_constant_b", "other")}

    def add_quant(kind: str, node: onnx.NodeProto, nbytes: int, params: int, bits: int | None = None,
                  block: int | None = None) -> None:
        k = kinds.setdefault(kind, {"count": 0, "bytes": 0, "params": 0, "bits": set(), "block_sizes": set(),
                                    "accuracy_levels": set(), "nodes_by_bits": {}})
        k["count"] += 1
        k["bytes"] += nbytes
        k["params"] += params
        if bits is not None:
            k["bits"].add(int(bits))
            k["nodes_by_bits"][str(bits)] = k["nodes_by_bits"].get(str(bits), 0) + 1
        if block is not None:
            k["block_sizes"].add(int(block))
        if kind == "MatMulNBits":
            k["accuracy_levels"].add(int(attr_value(node, "accuracy_level", 0)))

    def weight_bytes(names) -> int:
        return sum(tensor_nbytes(g.inits[n]) for n in names if n in g.inits)

    for n in g.nodes:
        op = n.op_type
        if op == "MatMulNBits":
            k, nn = attr_value(n, "K", 0), attr_value(n, "N", 0)
            add_quant(op, n, weight_bytes(n.input[1:]), k * nn, attr_value(n, "bits", 4), attr_value(n, "block_size"))
        elif op == "MatMulBnb4":
            add_quant(op, n, weight_bytes(n.input[1:]), attr_value(n, "K", 0) * attr_value(n, "N", 0), 4,
                      attr_value(n, "block_size"))
        elif op in ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat"):
            b_idx = 3 if op == "QLinearMatMul" else 1
            src, _ = g.resolve(n.input[b_idx]) if len(n.input) > b_idx else (None, [])
            params = int(np.prod(g.inits[src].dims)) if src else 0
            add_quant(op, n, weight_bytes([src or ""] + list(n.input[b_idx + 1:])), params, 8)
        elif op in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx") and len(n.input) > 1:
            src, walked = g.resolve(n.input[1])
            if src is None:
                r = float_reasons["non_constant_b"]
                r["count"] += 1
                r["nodes"].append(n.name or n.output[0])
                continue
            w = g.inits[src]
            params = int(np.prod(w.dims))
            if "DequantizeLinear" in walked and w.data_type in QUANT_TYPES:
                bits = 4 if w.data_type in (TensorProto.INT4, TensorProto.UINT4) else 8
                add_quant("QDQ MatMul", n, tensor_nbytes(w), params, bits)
                continue
            trans_b = bool(attr_value(n, "transB", 0)) if op == "Gemm" else False
            trans_b ^= walked.count("Transpose") % 2 == 1
            reason = "tied_head" if _is_tied(g, src, trans_b, tables) else "other"
            r = float_reasons[reason]
            r["count"] += 1
            r["bytes"] += tensor_nbytes(w)
            r["params"] += params
            r["nodes"].append(n.name or n.output[0])
    q_bytes = sum(k["bytes"] for k in kinds.values())
    q_params = sum(k["params"] for k in kinds.values())
    f_bytes = float_reasons["tied_head"]["bytes"] + float_reasons["other"]["bytes"]
    f_params = float_reasons["tied_head"]["params"] + float_reasons["other"]["params"]
    for k in kinds.values():
        for key in ("bits", "block_sizes", "accuracy_levels"):
            k[key] = sorted(k[key])
    return {
        "quantized_bytes": q_bytes, "float_bytes": f_bytes,
        "quantized_byte_share": round(q_bytes / (q_bytes + f_bytes), 4) if q_bytes + f_bytes else None,
        "quantized_param_share": round(q_params / (q_params + f_params), 4) if q_params + f_params else None,
        "bits": sorted({b for k in kinds.values() for b in k["bits"]} |
                       {int(attr_value(n, "bits", 4)) for n in gathers if n.op_type == "GatherBlockQuantized"}),
        "block_sizes": sorted({b for k in kinds.values() for b in k["block_sizes"]}),
        "quantized": kinds, "float": float_reasons, "gather_tables": gather_tables,
    }


# --------------------------------------------------------------------------------- model report

def _float_weight_dtype(by_dtype: dict[str, dict[str, int]]) -> str | None:
    floats = {k: v["bytes"] for k, v in by_dtype.items() if k in ("float", "float16", "bfloat16", "double")}
    return max(floats, key=floats.get) if floats else None


def detected_dtype(report: dict[str, Any]) -> str:
    """The Transformers.js dtype the content matches (regardless of the file name)."""
    q = report["quantization"]
    f16 = report["float_weights"] == "float16"
    if "MatMulBnb4" in q["quantized"]:
        return "bnb4"
    bits = set(q["bits"])
    for b in (4, 2, 1):
        if b in bits:
            return f"q{b}f16" if f16 else f"q{b}"
    if 8 in bits:
        return "q8"
    return "fp16" if f16 else "fp32"


def inspect_model(path: str | Path, config: dict | None = None) -> dict[str, Any]:
    """Everything `graphkit inspect` reports about one .onnx file (JSON-ready)."""
    path = Path(path)
    model = load_model(path, load_external=False)
    g = model.graph
    nodes = all_nodes(g)
    ops: dict[str, Counter] = defaultdict(Counter)
    for n in nodes:
        ops[n.domain or "ai.onnx"][n.op_type] += 1
    by_dtype: dict[str, dict[str, int]] = {}
    count = 0
    for t in iter_tensors(model):
        d = by_dtype.setdefault(dtype_name(t.data_type), {"count": 0, "bytes": 0})
        d["count"] += 1
        d["bytes"] += tensor_nbytes(t)
        count += 1
    ext = external_files(model, path.parent)
    file_bytes = path.stat().st_size
    report: dict[str, Any] = {
        "kind": "model", "path": str(path), "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": [io_entry(v) for v in g.input if v.name not in {t.name for t in g.initializer}],
        "outputs": [io_entry(v) for v in g.output],
        "nodes": len(nodes),
        "ops": {dom: dict(c.most_common()) for dom, c in sorted(ops.items())},
        "initializers": {"count": count, "bytes": sum(d["bytes"] for d in by_dtype.values()),
                         "by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"]))},
        "external_data": ext,
        "file_bytes": file_bytes,
        "total_bytes": file_bytes + sum(e["bytes"] or 0 for e in ext),
        "float_weights": _float_weight_dtype(by_dtype),
        "quantization": quantization_report(model, path.parent),
    }
    report["detected_dtype"] = detected_dtype(report)
    report["findings"] = model_findings(report, path, config)
    from graphkit.diagnose import model_diagnoses  # known causes of garbage (own module: no PyTorch either)
    report["findings"] += model_diagnoses(model, path, report, config)
    report["findings"] += runtime_findings(model, path, config)
    report["runtimes"] = runtime_summary(report["findings"], config)
    return report


def runtime_findings(model: onnx.ModelProto, path: Path, config: dict | None) -> list[dict[str, str]]:
    """What each Transformers.js runtime (graphkit/runtimes.py) will not load or will run wrongly in this file.
    An error where the folder's config.json says it was made for that runtime, a warning otherwise."""
    from graphkit.runtimes import check_model, folder_runtimes
    made_for = folder_runtimes(config)
    dtype = split_file_name(path.name)[1] if path.parent.name == "onnx" else None
    return [dict(finding("error" if p["runtime"] in made_for and not p["condition"] else "warning", p["code"],
                         p["message"], p["fix"]), runtime=p["runtime"], effect=p["effect"])
            for p in check_model(model, config, dtype)]


def runtime_summary(findings: list[dict], config: dict | None) -> list[dict[str, Any]]:
    """Per runtime: the versions, whether the folder was made for it, and which problems this file has there."""
    from graphkit.runtimes import RUNTIMES, folder_runtimes
    made_for = folder_runtimes(config)
    return [{"runtime": k, "versions": rt.describe(), "made_for": k in made_for,
             "problems": [{"code": f["code"], "effect": f["effect"]} for f in findings if f.get("runtime") == k]}
            for k, rt in RUNTIMES.items()]


# ------------------------------------------------------------------- Transformers.js compatibility

def finding(level: str, code: str, message: str, fix: str) -> dict[str, str]:
    return {"level": level, "code": code, "message": message, "fix": fix}


def _short(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _looks_kv(e: dict[str, Any]) -> bool:
    floaty = e["dtype"] in ("float", "float16", "bfloat16")
    return bool(KV_HINT.search(e["name"])) or (len(e["shape"] or []) == 4 and floaty)


def kv_inputs(ins: dict[str, dict]) -> list[dict]:
    """Past KV inputs: the Transformers.js names, or anything that looks like KV under another name."""
    return [e for n, e in ins.items() if PAST_RE.match(n) or (n not in KNOWN_INPUTS and _looks_kv(e))]


def kv_outputs(outs: dict[str, dict]) -> list[dict]:
    return [e for n, e in outs.items() if PRESENT_RE.match(n) or (n != "logits" and _looks_kv(e))]


def _io_findings(ins: dict[str, dict], outs: dict[str, dict]) -> list[dict[str, str]]:
    f = []
    missing = [n for n in ("input_ids",) if n not in ins] + [n for n in ("logits",) if n not in outs]
    if missing:
        f.append(finding("error", "missing-io", f"no {' / '.join(missing)}: Transformers.js feeds input_ids and reads "
                         "logits", "kv-rename"))
    bad = [n for n, e in ins.items() if n not in KNOWN_INPUTS and not PAST_RE.match(n) and _looks_kv(e)]
    bad += [n for n, e in outs.items() if n != "logits" and not PRESENT_RE.match(n) and _looks_kv(e)]
    if bad:
        f.append(finding("error", "kv-names", f"KV tensors not named past_key_values.{{i}}.key/value / present.{{i}}."
                         f"key/value: {_short(bad)}", "kv-rename"))
    other = [n for n in ins if n not in KNOWN_INPUTS and not PAST_RE.match(n) and n not in bad]
    if other:
        why = " ('logits_to_keep' is not recognised by any version; the name is num_logits_to_keep)" \
            if "logits_to_keep" in other else ""
        f.append(finding("error", "unknown-input", f"Transformers.js never feeds input(s) {_short(other)}{why}: "
                         "'Missing the following inputs'", "re-export without them (kv-rename for misnamed ones)"))
    past = {(int(m.group(1)), m.group(2)) for n in ins if (m := PAST_RE.match(n))}
    present = {(int(m.group(1)), m.group(2)) for n in outs if (m := PRESENT_RE.match(n))}
    unpaired = sorted({i for i, _ in past if {(i, "key"), (i, "value")} - past})
    if unpaired or (past and past != present):
        f.append(finding("error", "kv-pairs", "past_key_values.* and present.* do not cover the same layers with key "
                         f"and value (layers {_short([str(i) for i in unpaired] or ['present != past'])})", "kv-rename"))
    return f


def _dim_findings(ins: dict[str, dict], outs: dict[str, dict]) -> list[dict[str, str]]:
    f = []
    batched = [ins.get(n) for n in ("input_ids", "attention_mask", "position_ids")] + [outs.get("logits")]
    batched += kv_inputs(ins) + kv_outputs(outs)
    batched = [e for e in batched if e is not None and e["shape"]]
    wrong = sorted({f"{e['name']}[0]={e['shape'][0]!r}" for e in batched if e["shape"][0] != "batch_size"})
    if wrong:
        f.append(finding("error", "batch-dim", "batch dim not named 'batch_size' (Transformers.js fills only that "
                         f"symbol; any other becomes 0): {_short(wrong, 3)}", "kv-rename"))
    kv = kv_inputs(ins) + kv_outputs(outs)
    sym = [e for e in kv if e["shape"] is None or len(e["shape"]) != 4
           or not isinstance(e["shape"][1], int) or not isinstance(e["shape"][3], int)]
    if sym:
        f.append(finding("error", "kv-symbolic-dim", "KV heads / head dim must be static numbers (a symbol such as "
                         f"kv_cache_dim becomes 0 in the empty past): {len(sym)} KV tensor(s), e.g. "
                         f"{sym[0]['name']} {shape_str(sym[0]['shape'])}", "kv-rename"))
    fixed = [e["name"] for e in kv_inputs(ins) if e["shape"] and len(e["shape"]) == 4
             and isinstance(e["shape"][2], int)]
    if fixed:
        f.append(finding("warning", "kv-static-seq", f"past sequence dim is a fixed number: {_short(fixed, 2)}",
                         "kv-rename"))
    unnamed = [e["name"] for e in list(ins.values()) + list(outs.values()) if e["shape"] and None in e["shape"]]
    if unnamed:
        f.append(finding("warning", "unnamed-dim", f"unnamed dynamic dims (ORT metadata for them is unverified): "
                         f"{_short(unnamed)}", "kv-rename"))
    return f


def _external_findings(report: dict, path: Path) -> list[dict[str, str]]:
    f = []
    names = [e["name"] for e in report["external_data"]]
    pat = external_data_pattern(path.name)
    bad = [n for n in names if not pat.match(n)]
    idx = sorted(int(m.group(1) or 0) for n in names if (m := pat.match(n)))
    if bad or (idx and idx != list(range(len(idx)))) or (idx and 1 in idx and 0 not in idx):
        f.append(finding("error", "external-data-location", f"external data must be bare names {path.name}_data, "
                         f"{path.name}_data_1, … (Transformers.js fetches exactly those); found {_short(names, 3)}",
                         RESAVE_FIX))
    big = [e["name"] for e in report["external_data"] if (e["bytes"] or 0) > CHUNK_LIMIT]
    if big:
        f.append(finding("warning", "external-data-size", f"data file(s) over 2 GB (browsers read each file into one "
                         f"ArrayBuffer): {_short(big)}", RESAVE_FIX))
    missing = [e["name"] for e in report["external_data"] if e["bytes"] is None]
    if missing:
        f.append(finding("error", "external-data-missing", f"external data file(s) missing: {_short(missing)}",
                         RESAVE_FIX))
    return f


def _human(dtype: str | None) -> str:
    return "float32" if dtype == "float" else str(dtype)


def _kv_dtype(ins: dict[str, dict]) -> str | None:
    kinds = {e["dtype"] for e in kv_inputs(ins)}
    return kinds.pop() if len(kinds) == 1 else None


def _dtype_findings(report: dict, path: Path, ins: dict[str, dict]) -> list[dict[str, str]]:
    base, want = split_file_name(path.name)
    f = []
    if base != "model":
        f.append(finding("warning", "file-name", f"{path.name}: a decoder-only model loads onnx/model{{suffix}}.onnx; "
                         f"this file loads only with model_file_name='{base}'",
                         f"rename to onnx/model{DTYPE_SUFFIX[want]}.onnx"))
    q = report["quantization"]
    nbits = set(q["quantized"].get("MatMulNBits", {}).get("bits", []))
    want_bits = {"q4": 4, "q4f16": 4, "q2": 2, "q2f16": 2, "q1": 1, "q1f16": 1}.get(want)
    want_f16 = want.endswith("f16") or want == "fp16"
    problems, fixes = [], []
    if want_bits and want_bits not in nbits:
        problems.append(f"no {want_bits}-bit MatMulNBits")
        fixes.append(f"matmul-nbits(bits={want_bits})")
    if want in ("q8", "int8", "uint8") and 8 not in q["bits"]:
        problems.append("no 8-bit quantization (MatMulNBits bits=8, MatMulInteger, QDQ int8)")
        fixes.append("matmul-int8")
    if want == "bnb4" and "MatMulBnb4" not in q["quantized"]:
        problems.append("no MatMulBnb4")
    if want in ("fp32", "fp16") and q["quantized"]:
        problems.append(f"quantized ({', '.join(q['quantized'])}) but the name promises unquantized {want}")
    if want_f16 and report["float_weights"] not in (None, "float16"):
        problems.append(f"float weights are {_human(report['float_weights'])}, not float16")
        fixes.append("fp16")
    if not want_f16 and report["float_weights"] == "float16":
        problems.append("float weights are float16 but the name promises float32")
    got = report["detected_dtype"]
    if problems:
        rename = f"rename to onnx/model{DTYPE_SUFFIX[got]}.onnx (content looks like {got})"
        f.append(finding("error", "dtype-mismatch", f"{path.name} (dtype {want}): {'; '.join(problems)}",
                         " or ".join(["run " + ",".join(fixes)] if fixes else []) + (" or " if fixes else "") + rename))
    kv = _kv_dtype(ins)
    if want_f16 and kv and kv != "float16":
        f.append(finding("warning", "dtype-kv", f"{path.name} (dtype {want}): past/present are {_human(kv)}, the "
                         "name promises float16 KV (works; twice the KV memory)", "fp16(keep_io_types=false)"))
    return f


def _config_findings(config: dict, ins: dict[str, dict]) -> list[dict[str, str]]:
    f = []
    layers = {int(m.group(1)) for n in ins if (m := PAST_RE.match(n))}
    n_layers = config.get("num_hidden_layers")
    if layers and n_layers is not None and len(layers) != n_layers:
        f.append(finding("error", "config-layers", f"graph has KV for {len(layers)} layers, config.json says "
                         f"num_hidden_layers={n_layers}", "fix config.json or re-export"))
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // config["num_attention_heads"]
                                          if config.get("num_attention_heads") else None)
    shapes = {tuple(e["shape"][1::2]) for n, e in ins.items()
              if PAST_RE.match(n) and e["shape"] and len(e["shape"]) == 4}
    if heads and head_dim and shapes and shapes != {(heads, head_dim)}:
        f.append(finding("error", "config-kv-shape", f"past KV dims {sorted(shapes)} (heads, head_dim) differ from "
                         f"config.json ({heads}, {head_dim}); Transformers.js 3.x–4.1 builds the empty past from "
                         "config",
                         "fix config.json num_key_value_heads/head_dim or re-export"))
    return f


def model_findings(report: dict, path: Path, config: dict | None = None) -> list[dict[str, str]]:
    ins = {e["name"]: e for e in report["inputs"]}
    outs = {e["name"]: e for e in report["outputs"]}
    f = _io_findings(ins, outs) + _dim_findings(ins, outs) + _external_findings(report, path)
    if path.parent.name == "onnx":
        f += _dtype_findings(report, path, ins)
    if config:
        f += _config_findings(config, ins)
    return f


# ------------------------------------------------------------------------------------------ folder

FOLDER_FILES = {"config.json": True, "tokenizer.json": True, "tokenizer_config.json": True,
                "generation_config.json": False, "chat_template.jinja": False}


def _has_chat_tokens(folder: Path) -> bool:
    try:
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return "<|im_start|>" in text or "<|start_header_id|>" in text


def _read_json(path: Path, findings: list) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (ValueError, UnicodeDecodeError) as exc:
        findings.append(finding("error", "bad-json", f"{path.name} is not valid JSON ({exc})", f"fix {path.name}"))
        return {}


def _external_chunks_declared(tjs: dict, file_name: str) -> Any:
    value = tjs.get(USE_EXTERNAL_DATA)
    if isinstance(value, dict):
        return value.get(file_name, value.get(split_file_name(file_name)[0]))
    return value


def inspect_folder(folder: str | Path) -> dict[str, Any]:
    """A Transformers.js model folder: the files it needs and every onnx/*.onnx in it."""
    folder = Path(folder)
    findings: list[dict[str, str]] = []
    files = {name: (folder / name).is_file() for name in FOLDER_FILES}
    for name, required in FOLDER_FILES.items():
        if required and not files[name]:
            findings.append(finding("error", "missing-file", f"{name} is missing (Transformers.js needs it)",
                                    f"`graphkit convert` writes it, or copy {name} from the source model"))
    config = _read_json(folder / "config.json", findings)
    tok_cfg = _read_json(folder / "tokenizer_config.json", findings)
    if tok_cfg is not None and not tok_cfg.get("chat_template"):
        if files["chat_template.jinja"]:
            findings.append(finding("error", "chat-template", "chat_template is only in chat_template.jinja; the "
                                    "Transformers.js tokenizer reads it only from tokenizer_config.json",
                                    "`graphkit convert` (embeds it in tokenizer_config.json)"))
        else:
            chat = _has_chat_tokens(folder)  # a chat model without its template: prompts are built differently
            findings.append(finding("error" if chat else "warning", "chat-template",
                                    "no chat_template in tokenizer_config.json: apply_chat_template fails in "
                                    "Transformers.js" + (" (the tokenizer has chat tokens such as <|im_start|>)"
                                                         if chat else ""),
                                    "add the model's chat_template to tokenizer_config.json"))
    from graphkit.diagnose import folder_diagnoses
    findings += folder_diagnoses(folder, config, tok_cfg)
    models = sorted((folder / "onnx").glob("*.onnx")) if (folder / "onnx").is_dir() else []
    # graphkit's w4 (passes/matmul_w4.py): its int8 weights are made on the client from the .w4bin, so its
    # external data file is absent by design; it is no Transformers.js dtype file (graphkit verify checks it)
    w4 = [p for p in models if p.with_suffix(".w4bin").exists()]
    models = [p for p in models if p not in w4]
    for p in w4:
        findings.append(finding("info", "w4", f"{p.name}: graphkit's 4-bit download ({p.with_suffix('.w4bin').name}), "
                                "expanded by w4.mjs on the client; not inspected here",
                                "load it as docs/w4.md shows; `graphkit verify` runs it"))
    if not models:
        loose = sorted(p.name for p in folder.glob("*.onnx"))
        findings.append(finding("error", "no-model", "no onnx/*.onnx" + (f" ({_short(loose)} must move into onnx/)"
                                                                          if loose else ""),
                                f"`graphkit convert {folder} -o OUT` (starts from this export)" if loose else
                                "put the model at onnx/model{suffix}.onnx (`graphkit convert` does)"))
        models = sorted(folder.glob("*.onnx"))  # an optimum export: still diagnose what is there
    reports = [inspect_model(p, config) for p in models]
    tjs = (config or {}).get(TJS_CONFIG) or {}
    for r in reports:
        name, chunks = Path(r["path"]).name, len(r["external_data"])
        declared = _external_chunks_declared(tjs, name)
        n = 1 if declared is True else (declared if isinstance(declared, int) and declared is not False else 0)
        if chunks and n != chunks:
            findings.append(finding("error", "external-data-config", f"{name} has {chunks} external data file(s) but "
                                    "config.json transformers.js_config.use_external_data_format "
                                    + ("is not set" if declared is None else f"gives {declared!r}"),
                                    f'set "use_external_data_format": {{"{name}": {chunks}}} (`graphkit convert` '
                                    "writes it)"))
    every = findings + [x for r in reports for x in r["findings"]]
    result = {"kind": "folder", "path": str(folder), "files": files,
            "dtypes": {split_file_name(n)[1]: n for n in (Path(r["path"]).name for r in reports)
                       if split_file_name(n)[0] == "model"},
            "findings": findings, "models": reports,
            "errors": sum(x["level"] == "error" for x in every), "warnings": sum(x["level"] == "warning" for x in every)}
    from graphkit.diagnose import verdict
    result["verdict"] = verdict(result)
    return result


def inspect_path(path: str | Path) -> dict[str, Any]:
    """`graphkit inspect` entry: a folder or one .onnx (with its folder's config.json when it is in onnx/)."""
    path = Path(path)
    if path.is_dir():
        return inspect_folder(path)
    config = None
    for cfg in ((path.parent.parent / "config.json") if path.parent.name == "onnx" else None,
                path.parent / "config.json"):  # a Transformers.js folder's onnx/, or an optimum export beside it
        if cfg is not None and cfg.is_file():
            config = _read_json(cfg, [])
            break
    report = inspect_model(path, config)
    report["errors"] = sum(x["level"] == "error" for x in report["findings"])
    report["warnings"] = sum(x["level"] == "warning" for x in report["findings"])
    from graphkit.diagnose import verdict
    report["verdict"] = verdict(report)
    return report


# ----------------------------------------------------------------------------------------- render

def shape_str(shape: list | None) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _grouped_io(entries: list[dict]) -> list[tuple[str, str, str]]:
    """Collapse per-layer KV rows: past_key_values.{i}.{key,value} ×56."""
    rows: dict[tuple[str, str, str], int] = {}
    for e in entries:
        name = re.sub(r"\.(\d+)\.(key|value)$", ".{i}.{key,value}", e["name"])
        key = (name, e["dtype"], shape_str(e["shape"]))
        rows[key] = rows.get(key, 0) + 1
    return [(n + (f" ×{c}" if c > 1 else ""), d, s) for (n, d, s), c in rows.items()]


def render_findings(findings: list[dict], console, title: str = "Transformers.js compatibility") -> None:
    from rich.table import Table
    if not findings:
        console.print(f"[green]✓ {escape(title)}: no problems found[/]")
        return
    t = Table(title=escape(title), title_justify="left", show_lines=False)
    for col in ("level", "check", "problem", "fix"):
        t.add_column(col, overflow="fold")
    for f in sorted(findings, key=lambda x: x["level"] != "error"):
        style = "bold red" if f["level"] == "error" else "yellow"
        t.add_row(f"[{style}]{f['level']}[/]", f["code"], escape(f["message"]), f"[cyan]{escape(f['fix'])}[/]")
    console.print(t)


def _render_quant(q: dict, console) -> None:
    from rich.table import Table
    from graphkit.console import fmt_bytes
    t = Table(title="MatMul weights", title_justify="left")
    for col in ("kind", "nodes", "weight bytes", "details"):
        t.add_column(col, justify="right" if col in ("nodes", "weight bytes") else "left")
    for kind, k in q["quantized"].items():
        det = "bits " + ", ".join(f"{b} ×{c}" for b, c in k["nodes_by_bits"].items())
        det += f", block {k['block_sizes']}" if k["block_sizes"] else ""
        det += f", accuracy_level {k['accuracy_levels']}" if k["accuracy_levels"] else ""
        t.add_row(f"[green]{kind}[/]", str(k["count"]), fmt_bytes(k["bytes"]), escape(det))
    why = {"tied_head": "float: tied head (the embedding table, transposed)",
           "non_constant_b": "float: non-constant B (attention)", "other": "float: constant weight not quantized"}
    for reason, r in q["float"].items():
        if r["count"]:
            t.add_row(f"[yellow]{why[reason]}[/]", str(r["count"]), fmt_bytes(r["bytes"]), escape(_short(r["nodes"], 2)))
    for g in q["gather_tables"]:
        t.add_row(escape(f"Gather table {g['name']}"), "1", fmt_bytes(g["bytes"]),
                  escape(f"{g['op']} {g['dtype']} {g['shape']}" + (" (quantized)" if g["quantized"] else "")))
    share = q["quantized_param_share"]
    console.print(t)
    if share is not None:
        console.print(f"quantized: {share:.1%} of constant MatMul weights (by parameters), "
                      f"{q['quantized_byte_share']:.1%} by bytes")


def render_model(r: dict, console) -> None:
    from rich.table import Table
    from graphkit.console import fmt_bytes
    opsets = ", ".join(f"{d} {v}" for d, v in r["opsets"].items())
    console.print(f"[bold]{escape(r['path'])}[/]  {fmt_bytes(r['total_bytes'])}  ·  IR {r['ir_version']}"
                  f"  ·  opsets {opsets}"
                  f"  ·  {r['nodes']} nodes  ·  looks like [bold]{r['detected_dtype']}[/]"
                  + (f"  ·  producer {escape(r['producer'])}" if r["producer"] else ""))
    io = Table(title="Inputs / outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for side, entries in (("in", r["inputs"]), ("out", r["outputs"])):
        for name, dtype, shape in _grouped_io(entries):
            io.add_row(side, escape(name), dtype, escape(shape))
    console.print(io)
    ops = Table(title="Ops", title_justify="left")
    for col, j in (("domain", "left"), ("op", "left"), ("count", "right")):
        ops.add_column(col, justify=j)
    rows = [(d, op, c) for d, counts in r["ops"].items() for op, c in counts.items()]
    rows.sort(key=lambda x: -x[2])
    for d, op, c in rows[:15]:
        ops.add_row(d, op, str(c))
    if len(rows) > 15:
        ops.add_row("", f"… {len(rows) - 15} more op types", str(sum(c for *_, c in rows[15:])))
    console.print(ops)
    init = Table(title="Initializers", title_justify="left")
    for col in ("dtype", "tensors", "bytes"):
        init.add_column(col, justify="left" if col == "dtype" else "right")
    for d, v in r["initializers"]["by_dtype"].items():
        init.add_row(d, str(v["count"]), fmt_bytes(v["bytes"]))
    console.print(init)
    if r["external_data"]:
        ext = Table(title="External data", title_justify="left")
        for col in ("file", "tensors", "size"):
            ext.add_column(col, justify="left" if col == "file" else "right")
        for e in r["external_data"]:
            ext.add_row(escape(e["name"]), str(e["tensors"]), "missing" if e["bytes"] is None else fmt_bytes(e["bytes"]))
        console.print(ext)
    _render_quant(r["quantization"], console)
    render_findings(r["findings"], console, f"Transformers.js compatibility ({Path(r['path']).name})")
    render_runtimes(r.get("runtimes") or [], console)


def render_runtimes(rows: list[dict], console) -> None:
    """One line per Transformers.js runtime: loads and runs right, or what goes wrong there (codes above)."""
    for row in rows:
        made = " [dim](made for it)[/]" if row["made_for"] else ""
        if not row["problems"]:
            console.print(f"  [green]✓[/] {escape(row['versions'])}{made}: no known problem")
        else:
            probs = ", ".join(f"{p['code']} ({p['effect']})" for p in row["problems"])
            console.print(f"  [{'red' if row['made_for'] else 'yellow'}]✗[/] {escape(row['versions'])}{made}: "
                          f"{escape(probs)}")


def render_inspect(report: dict, console) -> None:
    from graphkit.diagnose import render_verdict
    render_verdict(report, console)  # the answer first; the tables after it
    console.print()
    if report["kind"] == "model":
        render_model(report, console)
    else:
        files = "  ".join(f"{'[green]✓' if ok else '[red]✗'}[/] {n}" for n, ok in report["files"].items())
        console.print(f"[bold]{escape(report['path'])}[/]  {files}")
        console.print("dtypes: " + escape(", ".join(f"{d} ({n})" for d, n in report["dtypes"].items()) or "none"))
        render_findings(report["findings"], console, "Transformers.js folder check")
        for r in report["models"]:
            console.print()
            render_model(r, console)
    console.print(f"\n{report['errors']} error(s), {report['warnings']} warning(s)")
