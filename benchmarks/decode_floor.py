#!/usr/bin/env python3
"""Decode-step GEMM floor: how fast could any q8 graph decode in Transformers.js's wasm backend?

    .venv/bin/python benchmarks/decode_floor.py [--size 0.5b] [--clients wasm,node] [--repeats 3]

A decode step of a q8 model is its int8 GEMMs (every projection and the lm_head at M=1) plus everything
else (attention, norms, activation quantizers, Transformers.js's own work). This script times the GEMMs
alone, so the ``everything else = 0`` ceiling of any q8 graph is measured, not guessed:

* ``step`` models, built from the size's config (``$GK_BENCH_DIR/qwen2.5-<size>/hf/config.json``): per
  layer the fused projection shapes of ``convert --fuse`` (packed q/k/v [H, H + 2·kv·d], o [H, H],
  packed gate/up [H, 2I], down [I, H]) chained by a Slice and a residual Add (a few hundred bytes of
  work per layer), then the tied lm_head [H, vocab]. Random N(0, 0.02) weights, quantized by our
  ``matmul-int8`` pass (per-token activations, the q8 files' form) and by the anchor recipe's
  ``quantize_dynamic`` (DynamicQuantizeLinear per tensor), by ``matmul-int8(activations=per-token-dql)`` (rows
  divided by their max|x|, then the fused DynamicQuantizeLinear form); plus ours without the head and the head alone.
* Each is run straight in onnxruntime-web wasm in headless Chromium (2 threads, cross-origin isolated)
  and in onnxruntime-node, with input A [1, H] (a decode step): 2 untimed runs, then ``--ops-runs``
  timed, median. Each child opens with two untimed warm-up sessions of the full ``ours`` step: a fresh page
  runs onnxruntime-web's wasm in V8's baseline (Liftoff) code until its hot functions are re-compiled
  optimized in the background, 2-3x slower for the first ~5-10 s here (measured: the first session's
  median 104 ms, the next ones 47-48 ms; 46 ms at once with ``--js-flags=--no-liftoff``, whose eager
  compile then takes 87 s).
* The real files' whole graph on one decode step's inputs (past length 144, random keys/values), straight in
  onnxruntime-web / -node (their own child, same warm-up): graph time without Transformers.js.
* In the same alternated rounds, Transformers.js generates with the real files (``ours-fuse q8``,
  ``ours q8``, ``anchor q8`` of benchmarks/browser.py: 128-token prompt, 32 new tokens, after an
  untimed ``--warmup-tokens`` generation, long enough for the tier-up above), so the GEMM-only time and
  the whole step come from the same minutes of this shared machine.

Report: per client, GEMM-only ms per step, Transformers.js decode ms/token, their difference (what the
rest of the step costs), and the ceiling ``anchor q8 ms/token ÷ GEMM-only ms``: the speed-up over the
anchor's q8 that a q8 graph would reach if everything but its GEMMs were free. Writes the RESULTS.md
section ``decode-floor-<size>``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import browser as B  # noqa: E402

STEP_FORMS = (  # (key, label, file) — label as shown in the table
    ("ours", "ours q8 form (per-token MatMulInteger), layers + head", "step-ours-q8.onnx"),
    ("anchor", "anchor q8 form (DynamicQuantizeLinear + MatMulInteger), layers + head", "step-anchor-q8.onnx"),
    ("dql", "per-token-dql form (rows ÷ max|x|, DynamicQuantizeLinear + MatMulInteger), layers + head",
     "step-dql-q8.onnx"),
    ("ours-nohead", "ours q8 form, layers only", "step-ours-q8-nohead.onnx"),
    ("ours-head", "ours q8 form, lm_head only", "step-ours-q8-head.onnx"),
)
TJS_CONTENDERS = ("ours-fuse q8", "ours q8", "anchor q8")
PAST = 144  # the middle of the Transformers.js runs' decode (128-token prompt, 32 new tokens)


def _fp32_step(out: Path, cfg: dict, layers: int, head: bool) -> None:
    """The float step model (external data: the 0.5B shape is ~1.9 GB in float)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    qkv = h + 2 * cfg["num_key_value_heads"] * d
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def weight(name: str, k: int, n: int) -> str:
        return const(name, rng.standard_normal((k, n), dtype=np.float32) * 0.02)

    def node(op: str, ins: list[str], out_name: str, **kw) -> str:
        nodes.append(helper.make_node(op, ins, [out_name], **kw))
        return out_name

    if layers:
        zero, h_end, i_end, axis = (const("zero", [0]), const("h_end", [h]), const("i_end", [inter]),
                                    const("axis", [1]))
    x = "A"
    for i in range(layers):
        attn = node("Slice", [node("MatMul", [x, weight(f"qkv{i}", h, qkv)], f"qkv_out{i}"), zero, h_end, axis],
                    f"attn{i}")
        x = node("Add", [x, node("MatMul", [attn, weight(f"o{i}", h, h)], f"o_out{i}")], f"x_attn{i}")
        gate = node("Slice", [node("MatMul", [x, weight(f"gate_up{i}", h, 2 * inter)], f"gu_out{i}"), zero, i_end,
                              axis], f"gate{i}")
        x = node("Add", [x, node("MatMul", [gate, weight(f"down{i}", inter, h)], f"down_out{i}")], f"x{i}")
    if head:
        node("MatMul", [x, weight("lm_head.weight", h, vocab)], "Y", name="lm_head")
    else:
        node("Identity", [x], "Y")
    graph = helper.make_graph(nodes, "decode_step_gemms", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, h])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, vocab if head else h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")


def build(folder: Path, cfg: dict) -> None:
    """The four step files (one self-contained .onnx each: the browser harness fetches a single file)."""
    import onnx
    todo = [(key, file) for key, _, file in STEP_FORMS if not (folder / file).exists()]
    if not todo:
        return
    src = folder / "src"
    for key, file in todo:
        layers = 0 if key == "ours-head" else cfg["num_hidden_layers"]
        fp32 = src / f"{key}.onnx"
        C.log(f"building {file}")
        _fp32_step(fp32, cfg, layers, head=key != "ours-nohead")
        part = folder / f"tmp-{file}"  # renamed when complete
        if key == "anchor":
            C.run_child("_common.py", "anchor_q8", {"src": str(fp32), "out": str(part), "weight_type": "QUInt8"})
            onnx.save(onnx.load(str(part)), str(part))  # quantize_dynamic may leave external data: make it one file
        elif key == "dql":
            B._apply(fp32, part, "matmul-int8(activations=per-token-dql)")
        else:
            B._apply(fp32, part, "matmul-int8")  # graphkit writes one file below 2 GB
        part.replace(folder / file)
        for f in src.iterdir():
            f.unlink()
    src.rmdir()


def decode_feeds(model: Path, past: int = PAST) -> dict:
    """One decode step's inputs for a Transformers.js decoder file, in the harness's JSON tensor form: token 42 at
    position ``past``, an all-ones mask, random N(0, 1) past keys/values of length ``past``, and
    ``num_logits_to_keep`` = 1 where the file has it (what Transformers.js 4.x's generate feeds)."""
    import numpy as np
    import onnx
    from graphkit.tjs import tensors_to_json
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in onnx.load(str(model), load_external_data=False).graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if vi.name == "input_ids":
            feeds[vi.name] = np.array([[42]], np.int64)
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones((1, past + 1), np.int64)
        elif vi.name == "position_ids":
            feeds[vi.name] = np.array([[past]], np.int64)
        elif vi.name == "num_logits_to_keep":
            feeds[vi.name] = np.array(1, np.int64)
        elif vi.name.startswith("past_key_values.") and len(dims) == 4 and dims[1] and dims[3]:
            feeds[vi.name] = rng.standard_normal((1, dims[1], past, dims[3])).astype(np.float32)
        else:
            raise SystemExit(f"{model}: no decode-step value for input {vi.name} {dims}")
    return tensors_to_json(feeds)


def real_files(folder: Path, base: Path, contenders: list[str]) -> list[dict]:
    """The real q8 files, hard-linked into the step folder (the harness serves one folder), with their feeds."""
    out = []
    for name in contenders:
        dst = folder / f"real-{name.replace(' ', '-')}.onnx"
        if not dst.exists():
            C.link_or_copy(B.contender_file(base, name), dst)
        out.append({"name": f"real {name}", "file": dst.name, "feeds": decode_feeds(dst)})
    return out


def ops_child(client: str, folder: Path, a, rnd: int, todo: list[dict]) -> dict:
    """One process: two untimed warm-up sessions of the first model, then the models (order rotated per round),
    each timed at M=1. The GEMM-only forms and the real files run in separate processes: after the step models,
    the real files' session.run measured 61-76 ms in the same page against 53-59 ms in a page of their own."""
    todo = todo[rnd % len(todo):] + todo[:rnd % len(todo)]
    ops = [{**todo[0], "name": "warm-up"}] * 2 + todo
    (folder / "ops.json").write_text(json.dumps(ops))
    ids = folder / "ids.json"
    ids.write_text("[0]")  # M=1 only
    C.wait_quiet()
    r = C.run_tree(["node", str(B.BENCH_JS), *B.CLIENTS[client], "--ops", "--model-dir", str(folder), "--prompt-ids",
                    str(ids), "--runs", str(a.ops_runs), "--threads", str(a.threads), "--timeout-s", str(a.timeout_s)],
                   timeout=a.timeout_s + 60)
    j = C.json_tail(r["stdout"])
    if "ops" not in j:
        raise SystemExit(f"{client} step run failed: {j.get('error')} {r['stderr'][-2000:]}")
    out = {"others_cores": r["others_cores"], "ms": {}}
    for o in j["ops"]:
        if "error" in o:
            raise SystemExit(f"{client} {o['name']}: {o['error']}")
        if o["name"] != "warm-up":
            out["ms"][o["name"]] = o["ms"]["1"]
    C.log(f"  {client}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out["ms"].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--clients", default="wasm,node", help="comma list of wasm, node")
    ap.add_argument("--repeats", type=int, default=3, help="alternated rounds (fresh process per child)")
    ap.add_argument("--ops-runs", type=int, default=9, help="timed runs per step model per child")
    ap.add_argument("--runs", type=int, default=2, help="timed Transformers.js generations per child")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="untimed Transformers.js tokens before the timed runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout-s", type=int, default=900)
    a = ap.parse_args()
    base = C.WORK / f"qwen2.5-{a.size}"
    clients = [c.strip() for c in a.clients.split(",") if c.strip()]
    if bad := [c for c in clients if c not in ("wasm", "node")]:
        raise SystemExit(f"unknown client(s) {bad}; choose from wasm, node")
    if not (base / "hf" / "config.json").exists():
        raise SystemExit(f"no {base / 'hf'}; run benchmarks/conversion.py --size {a.size} first")
    cfg = json.loads((base / "hf" / "config.json").read_text())
    folder = C.WORK / f"decode-floor-{a.size}"
    build(folder, cfg)
    B.anchor_folder(base)
    contenders = [n for n in TJS_CONTENDERS if B.contender_file(base, n).exists()]
    prompt_file = C.WORK / ".browser-prompt-128.json"
    prompt_file.write_text(json.dumps(C.prompt_ids(cfg["vocab_size"], 128)))
    targs = SimpleNamespace(runs=a.runs, slow_runs=1, new_tokens=32, warmup_tokens=a.warmup_tokens, threads=a.threads,
                            timeout_s=a.timeout_s)
    a.cfg = cfg
    a.real = real_files(folder, base, contenders)

    def run_one(key: str, rnd: int) -> dict:
        client, what = key.split("|")
        if what == "step":
            h = cfg["hidden_size"]
            return ops_child(client, folder, a, rnd, [{"name": k, "file": f, "K": h} for k, _, f in STEP_FORMS])
        if what == "graph":
            return ops_child(client, folder, a, rnd, a.real)
        return B.measure(base, client, what, targs, prompt_file)

    keys = [f"{c}|{w}" for c in clients for w in ("step", "graph", *contenders)]
    runs = C.alternate(keys, a.repeats, run_one)

    rows = []
    for client in clients:
        steps = runs[f"{client}|step"]
        gemm = {k: statistics.median(s["ms"][k] for s in steps) for k, _, _ in STEP_FORMS}
        tjs = {n: statistics.median(x["decode_ms_per_token"] for r in runs[f"{client}|{n}"] if "runs" in r
                                    for x in r["runs"]) for n in contenders
               if any("runs" in r for r in runs[f"{client}|{n}"])}
        anchor = tjs.get("anchor q8")
        for key, label, file in STEP_FORMS:
            rows.append([client, f"GEMMs only: {label}", C.mb(C.file_bytes(folder / file)), f"{gemm[key]:.1f}", "—",
                         f"{anchor / gemm[key]:.2f}" if anchor and key in ("ours", "anchor", "dql") else "—"])
        for n in contenders:
            real = statistics.median(g["ms"][f"real {n}"] for g in runs[f"{client}|graph"])
            rows.append([client, f"onnxruntime session.run, {n} file (one decode step, past {PAST})",
                         C.mb(C.file_bytes(B.contender_file(base, n))), f"{real:.1f}", f"{real - gemm['ours']:.1f}",
                         f"{anchor / real:.2f}" if anchor else "—"])
            if n in tjs:
                rows.append([client, f"Transformers.js, {n} (whole step)", C.mb(C.file_bytes(B.contender_file(base, n))),
                             f"{tjs[n]:.1f}", f"{tjs[n] - gemm['ours']:.1f} ({tjs[n] - real:+.1f} over session.run)",
                             f"{anchor / tjs[n]:.2f}" if anchor else "—"])
    others = {c: statistics.median(r["others_cores"] for k, rs in runs.items() if k.startswith(c + "|") for r in rs)
              for c in clients}
    body = f"""## Decode-step GEMM floor: the most any q8 graph can gain in Transformers.js, Qwen2.5-{a.size} shape

{C.machine()}

Command: `.venv/bin/python benchmarks/decode_floor.py {" ".join(sys.argv[1:])}` (the script's docstring says exactly
what is built and timed). {a.repeats} alternated rounds, fresh process per child, {a.threads} threads; medians. Others'
CPU during the children (median cores): {", ".join(f"{c} {v:.2f}" for c, v in others.items())}.

"ms" is per decode step: GEMM-only rows time the step's int8 GEMMs alone (M=1, nothing else in the graph);
session.run rows the real file's whole graph on one decode step's inputs (past length {PAST}), straight in
onnxruntime (a process of their own, same warm-up); Transformers.js rows the whole step as users get it (decode ms/token, 128-token prompt, so past
128-160). "rest" = this row − ours GEMM-only (in brackets for Transformers.js: − that file's session.run, i.e. what
Transformers.js itself adds per token: feeding the KV cache in and out, sampling, its tensors).
"anchor q8 ÷ this" is the anchor's Transformers.js q8 ms/token over this row's ms: for a GEMM-only row, the speed-up
over the anchor's q8 that a graph with those GEMMs would reach if everything else in its step took no time.

{C.table(["client", "what", "file", "ms per step", "rest ms", "anchor q8 ÷ this"], rows)}
"""
    C.write_section(f"decode-floor-{a.size}", body)


if __name__ == "__main__":
    main()
