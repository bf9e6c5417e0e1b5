"""Which Transformers.js runtimes load and run which graph forms: the one list the rest of graphkit reads.

Transformers.js bundles its own onnxruntime builds, so "works in Transformers.js" depends on the version a user
pins (many apps still pin 3.x). ``RUNTIMES`` names each runtime we test and what it bundles; ``KNOWN`` lists the
graph forms one of them refuses to load or runs wrongly, each with the option that fixes it. Every entry was
**observed** in the real runtime (``observed_by`` names the test that reproduces it: tests/test_runtimes.py runs
each unconditional entry's form in the real client and fails if the runtime stops failing); an entry nobody has
seen fail does not belong here. A ``condition`` marks a problem that appears only on some devices (e.g. a WebGPU
adapter): a caveat inspect reports as a warning and convert does not refuse.

Readers: ``graphkit inspect`` reports the problems per runtime (:func:`check_model`), ``graphkit convert --target``
chooses forms that avoid them for the runtimes it targets (``TARGET_RUNTIMES``) and refuses to write a file that
breaks one, and ``verify --browser`` names a known problem when the browser run fails. Adding a runtime fact =
adding an entry here with its detector and its test.

This module reads graph structure only (no weights, no onnxruntime, no torch): inspect must start fast.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto

from graphkit.tjs_contract import KV_CACHE_DTYPE, PAST_PREFIX, TJS_CONFIG


@dataclass(frozen=True)
class Runtime:
    key: str                      # what `convert --target` takes, e.g. "transformers.js@3"
    label: str                    # e.g. "Transformers.js 3.x"
    tested: tuple[str, ...]       # the Transformers.js versions the tests run (tests/js*/package-lock.json)
    onnxruntime_node: str         # bundled builds (npm view @huggingface/transformers@V dependencies)
    onnxruntime_web: str
    clients: tuple[str, ...]      # folders under tests/ that install `tested` (setup.sh installs them)

    def describe(self) -> str:
        return (f"{self.label} ({', '.join(self.tested)}: onnxruntime-node {self.onnxruntime_node}, "
                f"onnxruntime-web {self.onnxruntime_web})")


RUNTIMES: dict[str, Runtime] = {r.key: r for r in (
    Runtime("transformers.js@3", "Transformers.js 3.x", ("3.8.1",), "1.21.0", "1.22.0-dev.20250409-89f8206ba4",
            ("js-tjs3",)),
    Runtime("transformers.js@4", "Transformers.js 4.x", ("4.3.1", "4.3.2"), "1.30.0", "1.31.0-dev.20260914-8d85527a0",
            ("js", "js-tjs4-latest")),
)}
DEFAULT_TARGET = "transformers.js@4"
# `convert --target T` writes files for these runtimes (T and every newer one we test).
TARGET_RUNTIMES: dict[str, tuple[str, ...]] = {
    "transformers.js@3": ("transformers.js@3", "transformers.js@4"),
    "transformers.js@4": ("transformers.js@4",),
}


def runtime_of_version(version: str | None) -> str | None:
    """'3.8.1' → 'transformers.js@3' (None if unknown)."""
    key = f"transformers.js@{str(version or '').split('.')[0]}"
    return key if key in RUNTIMES else None


@dataclass(frozen=True)
class Problem:
    """One graph form a runtime refuses to load or runs wrongly (observed), and the option that fixes it."""
    code: str
    runtime: str                  # a RUNTIMES key
    backends: tuple[str, ...]     # where it was observed: "node" (onnxruntime-node), "wasm" (onnxruntime-web)
    effect: str                   # "does not load" | "wrong output"
    form: str                     # the offending form
    observed: str                 # what the runtime did, as observed
    fix: str                      # the option that avoids the form
    observed_by: str              # the test that reproduces it
    detect: Callable[["_Facts"], list[str]]  # → the offending nodes / inputs / outputs (empty: not present)
    condition: str = ""           # only under this run-time condition (device, adapter, prompt): a caveat that
                                  # convert does not refuse and inspect reports as a warning


class _Facts:
    """What the detectors look at: the graph's nodes, I/O and initializer dtypes, plus the folder's config."""

    def __init__(self, model: onnx.ModelProto, config: dict | None, dtype: str | None) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.init_dtype = {t.name: t.data_type for t in g.initializer}
        types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
        self.types = types
        self.inputs = [v.name for v in g.input if v.name not in self.init_dtype]
        self.outputs = {v.name: v.type.tensor_type.elem_type for v in g.output}
        self.config = config
        self.dtype = dtype

    def attr(self, node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def float16_node(self, node: onnx.NodeProto) -> bool:
        """A MatMulNBits computing in float16: its scales (input 2) or its input A are float16."""
        for name in node.input[2:3] + node.input[:1]:
            dt = self.init_dtype.get(name, self.types.get(name))
            if dt:
                return dt == TensorProto.FLOAT16
        return False


def _nbits_not_4(f: _Facts) -> list[str]:
    return [f"{n.name or n.output[0]} (bits={f.attr(n, 'bits', 4)})" for n in f.nodes
            if n.op_type == "MatMulNBits" and f.attr(n, "bits", 4) != 4]


def _nbits_f16_level4(f: _Facts) -> list[str]:
    return [n.name or n.output[0] for n in f.nodes
            if n.op_type == "MatMulNBits" and f.attr(n, "accuracy_level", 0) == 4 and f.float16_node(n)]


def _gqa_over_9_inputs(f: _Facts) -> list[str]:
    out = []
    for n in f.nodes:
        if n.op_type == "GroupQueryAttention":
            used = len(n.input)
            while used and not n.input[used - 1]:
                used -= 1
            if used > 9:
                out.append(f"{n.name or n.output[0]} ({used} inputs)")
    return out


def _gqa_any(f: _Facts) -> list[str]:
    return [n.name or n.output[0] for n in f.nodes if n.op_type == "GroupQueryAttention"]


def _num_logits_to_keep(f: _Facts) -> list[str]:
    return [i for i in f.inputs if i == "num_logits_to_keep"]


def _fp16_logits(f: _Facts) -> list[str]:
    return ["logits"] if f.outputs.get("logits") == TensorProto.FLOAT16 else []


def _fp16_kv_without_config(f: _Facts) -> list[str]:
    if f.config is None or f.dtype is None:
        return []  # a file outside a folder: the config that would fix it is not there to check
    kv = [i for i in f.inputs if i.startswith(PAST_PREFIX) and f.types.get(i) == TensorProto.FLOAT16]
    if not kv:
        return []
    want = (f.config.get(TJS_CONFIG) or {}).get(KV_CACHE_DTYPE)
    want = want.get(f.dtype) if isinstance(want, dict) else want
    return [] if want == "float16" else [f"{kv[0]} (+{len(kv) - 1} more)" if len(kv) > 1 else kv[0]]


TJS3 = "transformers.js@3"
KNOWN: tuple[Problem, ...] = (
    Problem("matmulnbits-bits", TJS3, ("node", "wasm"), "does not load",
            "MatMulNBits with bits other than 4 (e.g. the 8-bit tied lm_head of the default q4)",
            "onnxruntime-node 1.21: 'Only 4b quantization is supported for MatMulNBits op, additional bits support "
            "is planned'; onnxruntime-web 1.22-dev (wasm): session creation throws",
            "`convert --target transformers.js@3` (q4's head becomes int8 MatMulInteger: "
            "matmul-int8(lm_head=only,quantize_embedding_gather=true) before matmul-nbits), or bits=4",
            "tests/test_runtimes.py::test_known_problems_observed[matmulnbits-bits]", _nbits_not_4),
    Problem("matmulnbits-f16-level4", TJS3, ("node",), "wrong output",
            "float16 MatMulNBits with accuracy_level=4 (the default q4f16)",
            "onnxruntime-node 1.21 CPU: wrong values (zeros/NaN) wherever the neighbouring float16 ops run through "
            "Casts the CPU provider inserts (no float16 kernel): q4f16 generates token 0 over and over; exact with "
            "accuracy_level 0-3, and in onnxruntime-web 1.22-dev wasm",
            "`convert --target transformers.js@3` (q4f16 with accuracy_level=0), or "
            "matmul-nbits(accuracy_level=0) / tied-embedding(accuracy_level=0) before fp16",
            "tests/test_runtimes.py::test_known_problems_observed[matmulnbits-f16-level4]", _nbits_f16_level4),
    Problem("gqa-inputs", TJS3, ("node",), "does not load",
            "GroupQueryAttention with more than 9 inputs (attention_bias from fuse-gqa(padding=bias), i.e. --fuse)",
            "onnxruntime-node 1.21: 'has input size 11 not in range [min=7, max=9]' (onnxruntime-web 1.22-dev wasm "
            "loads it)",
            "convert without --fuse (`--target transformers.js@3` refuses --fuse)",
            "tests/test_runtimes.py::test_known_problems_observed[gqa-inputs]", _gqa_over_9_inputs),
    Problem("num-logits-to-keep", TJS3, ("node",), "does not load",
            "input num_logits_to_keep (Transformers.js 4.x feeds it; 3.x never does)",
            "Transformers.js 3.8.1: 'Missing the following inputs: num_logits_to_keep'",
            "re-export without it (no `--logits-to-keep`; `graphkit export` never adds it)",
            "tests/test_runtimes.py::test_known_problems_observed[num-logits-to-keep]", _num_logits_to_keep),
    Problem("fp16-logits", TJS3, ("node",), "wrong output",
            "float16 logits output",
            "Transformers.js 3.8.1 generates other tokens than onnxruntime's argmax (4.x casts them to float32)",
            "fp16(keep_logits_fp32=true)",
            "tests/test_runtimes.py::test_known_problems_observed[fp16-logits]", _fp16_logits),
    Problem("kv-cache-dtype", TJS3, ("node",), "does not load",
            "float16 KV cache without transformers.js_config.kv_cache_dtype for that dtype in config.json",
            "Transformers.js 3.8.1 feeds a float32 empty past: 'Unexpected input data type. Actual: (tensor(float)) , "
            "expected: (tensor(float16))' (4.2+ builds it from the graph)",
            'add "kv_cache_dtype": {"<dtype>": "float16"} to transformers.js_config (`graphkit convert` writes it)',
            "tests/test_runtimes.py::test_known_problems_observed[kv-cache-dtype]", _fp16_kv_without_config),
)
KNOWN += (
    Problem("webgpu-gqa-subgroup", "transformers.js@4", ("webgpu",), "wrong output",
            "GroupQueryAttention (--fuse) prefilling 32+ tokens on WebGPU",
            "onnxruntime-web 1.31-dev's flash-attention prefill is wrong on both WebGPU adapters measured: SwiftShader "
            "(Chrome's software adapter, subgroup size 4: the shader steps by min(subgroup size, 16) keys but computes 8, "
            "so every query row after the 4th attends to stale keys) and Mesa lavapipe (subgroup size 8: the single node "
            "is off by 0.16-0.23 after the 8th row, and an fp32 --fuse folder diverges at token 5 on verify's prompts); "
            "not checked on a hardware GPU",
            "convert without --fuse (the default fusions leave GroupQueryAttention out), or check on your GPU with "
            "graphkit verify --browser",
            "tests/test_gqa_runtimes.py::test_gqa_node_matches_reference", _gqa_any,
            condition="WebGPU (every adapter measured: subgroup sizes 4 and 8) and a prompt of 32+ tokens"),
)
PROBLEMS: dict[str, Problem] = {p.code: p for p in KNOWN}


def check_model(model: onnx.ModelProto, config: dict | None = None, dtype: str | None = None,
                runtimes: tuple[str, ...] | None = None, conditional: bool = True) -> list[dict[str, Any]]:
    """Every known problem ``model`` has, as ``{code, runtime, runtime_label, effect, backends, condition,
    message, fix, where}`` dicts (JSON-ready). ``config``/``dtype``: the folder's config.json and the file's
    Transformers.js dtype, for the checks that need them. ``runtimes``: only these (default: all).
    ``conditional=False`` leaves out the problems that appear only under a run-time condition."""
    facts = _Facts(model, config, dtype)
    found = []
    for p in KNOWN:
        if (runtimes is not None and p.runtime not in runtimes) or (p.condition and not conditional):
            continue
        where = p.detect(facts)
        if not where:
            continue
        rt = RUNTIMES[p.runtime]
        shown = ", ".join(where[:3]) + (f" (+{len(where) - 3} more)" if len(where) > 3 else "")
        cond = f", when {p.condition}" if p.condition else ""
        found.append({"code": p.code, "runtime": p.runtime, "runtime_label": rt.describe(), "effect": p.effect,
                      "backends": list(p.backends), "condition": p.condition, "where": where,
                      "message": f"{rt.label} {p.effect} ({'/'.join(p.backends)}{cond}): {p.form}: {shown}. "
                                 f"Observed: {p.observed}",
                      "fix": p.fix})
    return found


def check_file(path, config: dict | None = None, dtype: str | None = None,
               runtimes: tuple[str, ...] | None = None, conditional: bool = True) -> list[dict[str, Any]]:
    """:func:`check_model` on a file (graph only, weights not read)."""
    return check_model(onnx.load(str(path), load_external_data=False), config, dtype, runtimes, conditional)


def folder_runtimes(config: dict | None) -> tuple[str, ...]:
    """The runtimes a folder's config.json says it was made for (``graphkit.runtimes``; empty if not recorded)."""
    rec = (config or {}).get("graphkit") or {}
    return tuple(r for r in rec.get("runtimes", []) if r in RUNTIMES)


def config_record(target: str) -> dict[str, Any]:
    """What `convert` writes under config.json's "graphkit" key: the target and the runtimes it covers."""
    rts = TARGET_RUNTIMES[target]
    return {"target": target, "runtimes": list(rts),
            "tested": {k: {"transformers.js": list(RUNTIMES[k].tested), "onnxruntime-node": RUNTIMES[k].onnxruntime_node,
                           "onnxruntime-web": RUNTIMES[k].onnxruntime_web} for k in rts}}


def parse_target(text: str) -> str:
    """`--target` value → a TARGET_RUNTIMES key; accepts 'transformers.js@3', 'tjs3', '3', '3.8.1'."""
    from graphkit.errors import GraphkitError
    t = text.strip().lower()
    for prefix in ("transformers.js@", "transformers.js", "tjs@", "tjs"):
        if t.startswith(prefix):
            t = t[len(prefix):]
            break
    key = f"transformers.js@{t.split('.')[0]}" if t else ""
    if key not in TARGET_RUNTIMES:
        raise GraphkitError(f"--target {text!r}: choose one of {', '.join(TARGET_RUNTIMES)} (default {DEFAULT_TARGET})")
    return key
