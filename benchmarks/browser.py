#!/usr/bin/env python3
"""Transformers.js speed: our files vs the anchor recipe's, in Node and in headless Chromium (wasm, WebGPU).

    .venv/bin/python benchmarks/browser.py [--size 0.5b] [--clients node,wasm] [--contenders ...] [--repeats 2]

Every measurement is one child process, ``node tests/js/bench_tjs.mjs`` (Transformers.js 4.3.1 from
tests/js): ``--client node`` = onnxruntime-node (device ``cpu``); ``wasm`` / ``webgpu`` = Debian's
/usr/bin/chromium, headless, driven by playwright-core, onnxruntime-web (the page is cross-origin
isolated and sets ``env.backends.onnx.wasm.numThreads``, so wasm really runs ``--threads`` threads;
``webgpu`` adds ``--enable-unsafe-webgpu``: on a machine without a GPU that is SwiftShader, a software
adapter without shader-f16, a correctness check rather than a speed figure). In each child: load
(timed, files in the page cache, over HTTP from 127.0.0.1 in the browser), one untimed warm-up
generation of ``--warmup-tokens`` tokens on the same prompt, then ``--runs`` timed greedy generations:
the prompt is ``--prompt-tokens`` random ids (numpy ``default_rng(0)``, as graphkit bench) fed as
input_ids + an all-ones attention_mask, then exactly ``--new-tokens`` tokens (``min_new_tokens`` =
``max_new_tokens``, EOS masked, no penalties). prefill = generate() call to the first token (the whole
prompt's forward pass + sampling); decode ms/token = (token N − token 1) / (N − 1); tok/s = 1000 / that.
Contenders × clients alternate round-robin (``--repeats`` rounds, fresh process each); a pair that
fails (load error, timeout) is recorded once and not retried. Medians over all timed runs. "others" =
CPU used during the child by processes alive at its end that are not ours (Chromium's renderer is
reaped by Chromium, so rusage never sees it; a /proc snapshot before and after leaves our whole tree out).

Contenders: ``ours`` = `graphkit convert` (folder ``ours``), ``ours-fuse`` = `graphkit convert --fuse`,
``anchor`` = the anchor recipe's files in a Transformers.js folder ``anchor-tjs`` (config and tokenizer
copied from ``ours``; q4/q4f16 hard-linked from ``anchor/``; q8 = ``quantize_dynamic(per_channel=False,
reduce_range=False, weight_type=QUInt8)`` of the anchor's fp32 export, built here when missing).

Agreement (``--quality``, on by default): one Python child computes PyTorch's greedy ids for the same
prompt (EOS masked), its logits teacher-forced on prompt + those ids, and per contender file (Python
onnxruntime CPU): top-1 agreement and mean KL(PyTorch ‖ file) over the new positions, and the file's own
greedy ids. The tables then show, per client, how many leading Transformers.js tokens equal PyTorch's and
whether they equal Python onnxruntime's on the same file. Random weights make argmax margins tiny, so
greedy prefixes are fragile; the teacher-forced numbers are the steadier quality figure.

Every invocation stores its raw runs as ``browser-runs/<group>.json`` in the model folder (``--group``,
default: the clients joined by '+') with its ``--section``; the RESULTS.md section ``browser-<size>[-<section>]``
shows every stored group of that section, one table each, so slow browser contenders can run in their own locked window. Ratios only compare
runs of the same group.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCH_JS = C.ROOT / "tests" / "js" / "bench_tjs.mjs"
FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "q4": "model_q4.onnx", "q4f16": "model_q4f16.onnx",
         "q8": "model_quantized.onnx", "w4": "model_w4.onnx"}  # w4: passes/matmul_w4.py (+ model_w4.w4bin, w4.mjs)
FOLDERS = {"ours": "ours", "ours-fuse": "ours-fuse", "anchor": "anchor-tjs", "proto": "proto-q4i8"}
CLIENTS = {"node": ["--client", "node"], "wasm": ["--client", "chromium", "--device", "wasm"],
           "webgpu": ["--client", "chromium", "--device", "webgpu"],
           # Mesa lavapipe 25 (shader-f16, subgroup size 8; scripts/webgpu/setup_lavapipe.sh): WebGPU f16 on the CPU
           "webgpu-lavapipe": ["--client", "chromium", "--device", "webgpu", "--adapter", "lavapipe"]}
DEFAULT_CONTENDERS = ("ours q8,ours q4,ours q4f16,ours fp32,ours-fuse q8,ours-fuse q4,ours-fuse q4f16,ours-fuse fp32,"
                      "anchor q8,anchor q4,anchor q4f16")


# ------------------------------------------------------------------------------------ models

def anchor_folder(base: Path) -> Path:
    """``anchor-tjs``: the anchor recipe's files under Transformers.js names (q8 built when missing)."""
    out = base / "anchor-tjs"
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (out / f).exists():
            C.link_or_copy(base / "ours" / f, out / f)
    for dtype in ("q4", "q4f16"):
        src, dst = base / "anchor" / FILES[dtype], out / "onnx" / FILES[dtype]
        if src.exists() and not dst.exists():
            C.link_or_copy(src, dst)
    q8 = out / "onnx" / FILES["q8"]
    if not q8.exists() and (base / "anchor" / "model.onnx").exists():
        C.log("anchor q8: quantize_dynamic(per_channel=False, reduce_range=False, QUInt8) of the anchor's fp32 export")
        C.run_child("_common.py", "anchor_q8", {"src": str(base / "anchor" / "model.onnx"), "out": str(q8),
                                                "weight_type": "QUInt8"}, quiet=False)
    return out


def contender_file(base: Path, name: str) -> Path:
    who, dtype = name.split()
    return base / FOLDERS[who] / "onnx" / FILES[dtype]


def _download_bytes(path: Path) -> int:
    """What a client downloads: the .onnx and its data; for w4 the .onnx and its .w4bin (its int8 data file is
    made on the client, never downloaded)."""
    if path.name == FILES["w4"]:
        return path.stat().st_size + path.with_suffix(".w4bin").stat().st_size
    return C.file_bytes(path)


# ------------------------------------------------------------------------------------ agreement (Python child)

def quality_child(hf: str, prompt: list[int], new_tokens: int, files: dict[str, str], eos: list[int]) -> dict:
    import numpy as np
    import torch
    from graphkit.hfmodel import load_causal_lm
    from graphkit.ortrun import DecoderRunner, kl_divergence
    torch.set_num_threads(2)
    model, _ = load_causal_lm(Path(hf), None)
    ids, past = torch.tensor([prompt]), None
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            logits = out.logits[0, -1].float().clone()
            logits[eos] = -float("inf")
            greedy.append(int(logits.argmax()))
            ids, past = torch.tensor([[greedy[-1]]]), out.past_key_values
        ref = model(input_ids=torch.tensor([prompt + greedy])).logits[0].float().numpy()[len(prompt) - 1:-1]
    del model
    res = {"torch_greedy": greedy, "files": {}}
    for name, path in files.items():
        C.log(f"agreement: {name}")
        try:
            runner = DecoderRunner.from_file(path, threads=2)
            lg = runner.teacher_forced_logits(prompt, greedy)
            gen, _ = runner.greedy(prompt, new_tokens, suppress=tuple(eos))
        except Exception as exc:  # a file onnxruntime cannot run is reported, not fatal
            res["files"][name] = {"error": str(exc)[:300]}
            continue
        res["files"][name] = {"top1": float((lg.argmax(-1) == ref.argmax(-1)).mean()),
                              "kl_mean": float(kl_divergence(ref, lg).mean()),
                              "ort_greedy": [int(x) for x in gen], "nonfinite": int((~np.isfinite(lg)).sum())}
        del runner
    return res


# ------------------------------------------------------------------------------------ measurement

def measure(base: Path, client: str, name: str, a, prompt_file: Path) -> dict:
    who, dtype = name.split()
    slow = client != "node" and dtype in ("q4", "q4f16")
    runs = a.slow_runs if slow else a.runs
    cmd = ["node", str(BENCH_JS), *CLIENTS[client], "--model-dir", str(base / FOLDERS[who]), "--dtype", dtype,
           "--prompt-ids", str(prompt_file), "--new-tokens", str(a.new_tokens), "--runs", str(runs),
           "--warmup-tokens", str(a.warmup_tokens), "--threads", str(a.threads), "--timeout-s", str(a.timeout_s)]
    C.wait_quiet()
    # not run_cmd: its "others" would count Chromium's renderer as someone else, and ru_maxrss never sees it
    r = C.run_tree(cmd, timeout=a.timeout_s + 60)
    res = C.json_tail(r["stdout"])
    out = {k: r[k] for k in ("rc", "wall_s", "peak_rss", "tree_rss", "tree_rss_max1", "others_cores")}
    if r["rc"] != 0 or "error" in res or not res.get("runs"):
        err = res.get("error") or "\n".join(r["stderr"].strip().splitlines()[-5:]) or f"exit {r['rc']}"
        C.log(f"  {client} {name}: FAILED: {err[:300]}")
        return {**out, "error": err[:1000], "record": {k: v for k, v in res.items() if k != "runs"}}
    dec = [x["decode_ms_per_token"] for x in res["runs"]]
    C.log(f"  {client} {name}: load {res['load_ms'] / 1e3:.1f} s, prefill {res['runs'][0]['prefill_ms']:.0f} ms, "
          f"decode {statistics.median(dec):.1f} ms/token")
    return {**out, **{k: v for k, v in res.items()}}


def summarize(rs: list[dict]) -> dict:
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return {"error": rs[0]["error"] if rs else "not run", "record": rs[0].get("record", {}) if rs else {}}
    runs = [x for r in ok for x in r["runs"]]
    ids = [tuple(x["new_ids"]) for x in runs]
    return {"n": len(runs), "load_s": [r["load_ms"] / 1e3 for r in ok], "prefill": [x["prefill_ms"] for x in runs],
            "decode": [x["decode_ms_per_token"] for x in runs], "peak_rss": [r["peak_rss"] for r in ok],
            "tree_rss": [r["tree_rss"] for r in ok if "tree_rss" in r],
            "tree_rss_max1": [r["tree_rss_max1"] for r in ok if "tree_rss_max1" in r],
            "others": [r["others_cores"] for r in ok], "ids": list(ids[0]), "stable": len(set(ids)) == 1,
            "min_margin": min(min(x["margins"]) for x in runs),
            "num_threads": ok[0].get("num_threads"), "adapter": ok[0].get("adapter"),
            "ort_web": ok[0].get("onnxruntime_web_version"), "chromium": ok[0].get("chromium_version")}


# ------------------------------------------------------------------------------------ report

def prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def mem(client: str, s: dict) -> str:
    """Peak RSS: largest single process / sum over the child's process tree (polled every 0.5 s)."""
    if s.get("tree_rss"):
        return f"{C.mb(statistics.median(s['tree_rss_max1']))} / {C.mb(statistics.median(s['tree_rss']))}"
    return C.mb(statistics.median(s["peak_rss"])) if client == "node" else "— (not polled)"


def tok_s(s: dict) -> float | None:
    return 1000 / statistics.median(s["decode"]) if "decode" in s else None


def group_quality(g: dict, groups: list[dict]) -> dict:
    """The group's own agreement data, completed from other groups with the same prompt and token count."""
    same = [x for x in groups if x.get("quality") and (x["prompt_tokens"], x["new_tokens"]) == (g["prompt_tokens"], g["new_tokens"])]
    if not same:
        return {}
    files: dict = {}
    for x in sorted(same, key=lambda x: x is g):  # the group's own results win
        files.update(x["quality"]["files"])
    return {"torch_greedy": same[-1]["quality"]["torch_greedy"], "files": files}


def group_table(g: dict, groups: list[dict]) -> str:
    q = group_quality(g, groups)
    torch_ids = q.get("torch_greedy")
    rows = []
    for client in g["clients"]:
        anchors = {name.split()[1]: tok_s(g["summary"][f"{client}|{name}"])
                   for name in g["contenders"] if name.startswith("anchor ") and f"{client}|{name}" in g["summary"]}
        for name in g["contenders"]:
            if f"{client}|{name}" not in g["summary"]:  # --only: not measured in this group
                continue
            s = g["summary"][f"{client}|{name}"]
            size = C.mb(g["sizes"][name]) if g["sizes"].get(name) else "—"
            if "error" in s:
                rows.append([client, name, size, "—", "—", "—", "—", "—", "—", "—", "fails: " + s["error"][:160].replace("|", "/").replace("\n", " "), "—"])
                continue
            t = tok_s(s)
            same = anchors.get(name.split()[1])
            qf = (q.get("files") or {}).get(name, {})
            agree = "—"
            if torch_ids:
                agree = f"{prefix(s['ids'], torch_ids)}/{len(torch_ids)}"
                if "ort_greedy" in qf:
                    agree += " (= ORT)" if s["ids"] == qf["ort_greedy"] else f" (ORT: {prefix(s['ids'], qf['ort_greedy'])})"
            if not s["stable"]:
                agree += ", ids vary between runs"
            rows.append([client, name, size, C.spread(s["load_s"]), C.spread(s["prefill"], "{:.0f}"),
                         C.spread(s["decode"]), f"{t:.2f}",
                         C.ratio(t, same) if same and name.split()[0] != "anchor" else "—",
                         C.ratio(t, anchors["q8"]) if anchors.get("q8") else "—",
                         mem(client, s), agree,
                         " / ".join(f"{x:.2f}" for x in s["others"])])
    head = ["client", "contender", "file", "load s", "prefill ms", "decode ms/token median [min–max]", "tok/s",
            "tok/s ÷ anchor same dtype", "tok/s ÷ anchor q8", "peak RSS: largest process / whole tree",
            "tokens = PyTorch (leading) / vs Python ORT", "others (cores)"]
    return C.table(head, rows)


def quality_table(groups: list[dict]) -> str:
    main = [g for g in groups if g.get("quality")]
    if not main:
        return ""
    g = max(main, key=lambda g: (g["prompt_tokens"], g["time"]))
    q = group_quality(g, groups)
    rows = []
    for name, f in sorted(q["files"].items()):
        if "error" in f:
            rows.append([name, "—", "—", "—", "fails: " + f["error"][:120]])
        else:
            rows.append([name, f"{f['top1']:.3f}", f"{f['kl_mean']:.4f}",
                         f"{prefix(f['ort_greedy'], q['torch_greedy'])}/{len(q['torch_greedy'])}", str(f["nonfinite"])])
    return C.table(["file", "teacher-forced top-1 vs PyTorch", "KL mean (nats)", "ORT greedy = PyTorch (leading)",
                    "non-finite"], rows)


def side_by_side(groups: list[dict]) -> str:
    """tok/s per contender per client, latest group that measured it (ratios stay within a group above)."""
    cells: dict[str, dict[str, str]] = {}
    clients: list[str] = []
    for g in groups:
        for client in g["clients"]:
            if client not in clients:
                clients.append(client)
            for name in g["contenders"]:
                if f"{client}|{name}" not in g["summary"]:
                    continue
                s = g["summary"][f"{client}|{name}"]
                cells.setdefault(name, {})[client] = "fails" if "error" in s else f"{tok_s(s):.2f} ({g['group']})"
    clients = [c for c in CLIENTS if c in clients]
    rows = [[name] + [cells[name].get(c, "—") for c in clients] for name in sorted(cells)]
    return C.table(["contender"] + [f"{c} tok/s (group)" for c in clients], rows)


def limits_table(base: Path) -> str:
    """What each file of ``ours`` breaks (graphkit.browser_limits, the warnings `convert` prints at write time)."""
    sys.path.insert(0, str(C.ROOT))
    from graphkit import browser_limits
    from graphkit.modelio import load_model
    rows = []
    for dtype, fname in FILES.items():
        path = base / "ours" / "onnx" / fname
        if path.exists():
            problems = browser_limits.check(load_model(path, load_external="lazy"), dtype)
            rows.append([dtype, fname, C.mb(C.file_bytes(path)), "<br>".join(problems) or "none"])
    return C.table(["dtype", "file", "size", "browser limits it breaks (convert's warning)"], rows)


def render(base: Path, size: str, limits: bool = False, section: str = "") -> str:
    """The RESULTS.md section of the groups stored with this ``--section`` suffix (each measurement in one section)."""
    groups = [g for p in sorted((base / "browser-runs").glob("*.json"))
              if (g := json.loads(p.read_text())).get("section", "") == section]
    groups.sort(key=lambda g: g["time"])
    parts = [f"## Transformers.js speed: Node vs Chromium (wasm, WebGPU), random-weight Qwen2.5-{size} shape\n",
             groups[-1]["machine"] if groups else "",
             "\nScript: `benchmarks/browser.py` (its docstring says exactly what is measured). Transformers.js 4.3.1 "
             "(onnxruntime-node 1.30.0; onnxruntime-web "
             f"{next((s.get('ort_web') for g in groups for s in g['summary'].values() if s.get('ort_web')), '?')}), "
             f"{next((s.get('chromium') for g in groups for s in g['summary'].values() if s.get('chromium')), 'Chromium')}. "
             "Ratios compare contenders of the same group (same run, alternated round-robin); "
             "\"tok/s ÷ anchor\" above 1 = ours faster. 'tokens = PyTorch' = leading greedy tokens equal to PyTorch fp32's "
             "on the same prompt; '(= ORT)' = the whole 32 equal Python onnxruntime's on the same file.\n",
             "### Decode tok/s side by side\n", side_by_side(groups), ""]
    if limits:
        parts += ["### Browser limits per file\n",
                  "wasm32 memory (4 GiB: every weight is copied into it for device 'wasm'); onnxruntime-web reads "
                  "each external-data chunk into one buffer (convert keeps chunks < 2 GB). `graphkit convert` prints "
                  "these at write time (graphkit/browser_limits.py). Not a limit here: lavapipe's 128 MiB "
                  "maxStorageBufferBindingSize — q4's 223 MiB 8-bit table loads and runs on it (table above).\n",
                  limits_table(base), ""]
    for g in groups:
        parts += [f"### Group `{g['group']}` ({g['date']})\n",
                  f"Command: `{g['command']}`. Prompt {g['prompt_tokens']} tokens, {g['new_tokens']} new tokens, "
                  f"{g['threads']} threads, warm-up {g['warmup_tokens']} tokens, {g['repeats']} round(s) × "
                  f"{g['runs']} timed run(s) per child ({g['slow_runs']} for browser q4/q4f16).\n",
                  group_table(g, groups), ""]
    qt = quality_table(groups)
    if qt:
        parts += ["### Agreement with PyTorch (Python onnxruntime CPU, same files, same prompt as the 128-token groups)\n",
                  "Teacher-forced on PyTorch's own greedy continuation (EOS masked); random weights give tiny argmax "
                  "margins, so 4-bit files disagree with PyTorch's argmax almost everywhere while KL stays small.\n", qt, ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ prototype: 4-bit at rest, int8 at run time

def _expand_int4_rows(x, name: str, block: int = 32, transpose: bool = False):
    """Nodes + initializers that rebuild an int8 [R, C] tensor (requantized per row) from x [R, C] float quantized
    to symmetric int4 in blocks of ``block`` along C; all constant, so onnxruntime folds them at session creation.
    Returns (nodes, initializers, per-row int8 scale). With ``transpose`` the output is the [C, R] transpose."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    r, c = x.shape
    xb = x.reshape(r, c // block, block)
    bscale = np.maximum(np.abs(xb).max(axis=2, keepdims=True) / 7, 1e-12).astype(np.float16)
    q = np.clip(np.rint(xb / bscale.astype(np.float32)), -8, 7).astype(np.int8)
    deq = (q * bscale.astype(np.float32)).reshape(r, c)
    s8 = np.maximum(np.abs(deq).max(axis=1) / 127, 1e-12).astype(np.float32)  # [R]
    u = (q.reshape(r, c) + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)  # [R, C/2]: low nibble = even column
    p = f"{name}_i4"
    inits = [numpy_helper.from_array(packed, f"{p}_packed"), numpy_helper.from_array(bscale, f"{p}_bscale16"),
             numpy_helper.from_array(s8.reshape(r, 1), f"{p}_rowscale"),
             numpy_helper.from_array(np.array([r, c // block, block], np.int64), f"{p}_shape_blk"),
             numpy_helper.from_array(np.array([r, c], np.int64), f"{p}_shape_rc")]
    shared = ["i4_c15", "i4_c4", "i4_c8", "i4_ax2", "i4_lo", "i4_hi"]
    N = helper.make_node
    nodes = [N("BitwiseAnd", [f"{p}_packed", shared[0]], [f"{p}_lo"]),
             N("BitShift", [f"{p}_packed", shared[1]], [f"{p}_hi"], direction="RIGHT"),
             N("Unsqueeze", [f"{p}_lo", shared[3]], [f"{p}_lo3"]), N("Unsqueeze", [f"{p}_hi", shared[3]], [f"{p}_hi3"]),
             N("Concat", [f"{p}_lo3", f"{p}_hi3"], [f"{p}_lh"], axis=2),
             N("Reshape", [f"{p}_lh", f"{p}_shape_blk"], [f"{p}_u4"]),
             N("Cast", [f"{p}_u4"], [f"{p}_u4f"], to=TensorProto.FLOAT), N("Sub", [f"{p}_u4f", shared[2]], [f"{p}_q"]),
             N("Cast", [f"{p}_bscale16"], [f"{p}_bscale"], to=TensorProto.FLOAT),
             N("Mul", [f"{p}_q", f"{p}_bscale"], [f"{p}_deqb"]), N("Reshape", [f"{p}_deqb", f"{p}_shape_rc"], [f"{p}_deq"]),
             N("Div", [f"{p}_deq", f"{p}_rowscale"], [f"{p}_r"]), N("Round", [f"{p}_r"], [f"{p}_rr"]),
             N("Clip", [f"{p}_rr", shared[4], shared[5]], [f"{p}_rc"]),
             N("Cast", [f"{p}_rc"], [f"{p}_i8" if transpose else name], to=TensorProto.INT8)]
    if transpose:
        nodes.append(N("Transpose", [f"{p}_i8"], [name], perm=[1, 0]))
    return nodes, inits, s8


def proto_folder(base: Path, block: int = 32) -> Path:
    """Prototype ``proto-q4i8``: our q8 graph (per-token MatMulInteger) with every layer weight stored as symmetric
    int4 (blocks of ``block`` along K, float16 block scales) and rebuilt as int8 at session creation by constant
    standard ops; the tied int8 table stays int8 (as our q4 keeps an 8-bit head). Written as onnx/model_q4.onnx."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    out = base / "proto-q4i8"
    dst = out / "onnx" / FILES["q4"]
    if dst.exists():
        return out
    C.log(f"prototype: 4-bit at rest / int8 at load from {base / 'ours' / 'onnx' / FILES['q8']}")
    m = onnx.load(str(base / "ours" / "onnx" / FILES["q8"]))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    new_nodes, new_inits, drop = [], [], set()
    for n in list(g.node):
        if n.op_type != "MatMulInteger" or n.input[1] not in inits or len(consumers[n.input[1]]) != 1:
            continue
        cast = consumers[n.output[0]][0]
        mul = consumers[cast.output[0]][0]
        sname = next(i for i in mul.input if i in inits)
        w8 = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)  # [K, N]
        sc = numpy_helper.to_array(inits[sname]).astype(np.float32)
        if w8.shape[0] % block or sc.shape != (w8.shape[1],):
            continue
        w = w8 * sc  # the float weight as our q8 file holds it
        nodes, ins, s8 = _expand_int4_rows(w.T.copy(), n.input[1], block, transpose=True)
        new_nodes += nodes
        new_inits += ins
        drop.add(n.input[1])
        new_s = f"{sname}_i4req"
        new_inits.append(numpy_helper.from_array(s8, new_s))
        mul.input[list(mul.input).index(sname)] = new_s
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    new_inits += [c("i4_c15", np.uint8(15)), c("i4_c4", np.uint8(4)), c("i4_c8", np.float32(8)),
                  c("i4_ax2", np.array([2], np.int64)), c("i4_lo", np.float32(-127)), c("i4_hi", np.float32(127))]
    kept = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in m.opset_import):
        raise RuntimeError("prototype needs opset >= 18 (BitwiseAnd)")
    C.log(f"prototype: {len(drop)} weights now int4 at rest")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        C.link_or_copy(base / "ours" / f, out / f)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    _ = (TensorProto, helper)
    return out


# ------------------------------------------------------------------------------------ --ops: one-layer diagnostics

OPS_LAYER = (896, 4864)    # gate/up_proj of the 0.5B shape
OPS_HEAD = (896, 151936)   # the tied lm_head


def _one_matmul(path: Path, w, opset: int = 18) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="lm_head" if n > 100000 else "proj")],
                          "layer", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                          [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10), str(path))


def _int4_blocks(w, block: int = 32):
    """Symmetric int4 per block of ``block`` rows (along K): q in [-8, 7], scale = max|block| / 7."""
    import numpy as np
    k, n = w.shape
    wb = w.reshape(k // block, block, n)
    scale = np.maximum(np.abs(wb).max(axis=1, keepdims=True) / 7, 1e-12).astype(np.float32)
    q = np.clip(np.rint(wb / scale), -8, 7).astype(np.int8)
    return q.reshape(k, n), scale  # scale: [K/block, 1, N]


def _int4_to_int8_at_load(path: Path, w, block: int = 32) -> None:
    """4-bit at rest, int8 at run time: packed nibbles + block scales, expanded by constant-only standard ops
    (BitwiseAnd, BitShift, Concat, Cast, Sub, Mul, Div, Round, Clip) that onnxruntime folds at session creation
    into one int8 [K, N] initializer (requantized per output column), then the per-token MatMulInteger form."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    k, n = w.shape
    q, scale = _int4_blocks(w, block)
    u = (q + 8).astype(np.uint8)
    packed = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)  # [K/2, N]: low nibble = even k
    deq = (q.reshape(k // block, block, n) * scale).reshape(k, n)
    s8 = np.maximum(np.abs(deq).max(axis=0) / 127, 1e-12).astype(np.float32)  # [N]
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)  # noqa: E731
    inits = [c("P", packed), c("c15", np.uint8(15)), c("c4", np.uint8(4)), c("c8", np.float32(8)),
             c("sh_blk", np.array([k // block, block, n], np.int64)), c("sh_kn", np.array([k, n], np.int64)),
             c("bscale", scale), c("s8", s8), c("lo127", np.float32(-127)), c("hi127", np.float32(127)),
             c("ax", np.array([-1], np.int64)), c("e127", np.float32(127)), c("tiny", np.float32(1e-30)),
             c("z128f", np.float32(128)), c("azp", np.uint8(128)), c("bzp", np.int8(0)),
             c("ax1", np.array([1], np.int64))]
    N = helper.make_node
    nodes = [N("BitwiseAnd", ["P", "c15"], ["lo"]), N("BitShift", ["P", "c4"], ["hi"], direction="RIGHT"),
             N("Unsqueeze", ["lo", "ax1"], ["lo3"]), N("Unsqueeze", ["hi", "ax1"], ["hi3"]),
             N("Concat", ["lo3", "hi3"], ["lh"], axis=1), N("Reshape", ["lh", "sh_blk"], ["u4"]),
             N("Cast", ["u4"], ["u4f"], to=TensorProto.FLOAT), N("Sub", ["u4f", "c8"], ["q4f"]),
             N("Mul", ["q4f", "bscale"], ["deqb"]), N("Reshape", ["deqb", "sh_kn"], ["deq"]),
             N("Div", ["deq", "s8"], ["wr"]), N("Round", ["wr"], ["wrr"]), N("Clip", ["wrr", "lo127", "hi127"], ["wc"]),
             N("Cast", ["wc"], ["W8"], to=TensorProto.INT8),
             # per-token activation quantizer (as matmul-int8's default form)
             N("Abs", ["A"], ["aa"]), N("ReduceMax", ["aa", "ax"], ["am"], keepdims=1), N("Div", ["am", "e127"], ["as0"]),
             N("Max", ["as0", "tiny"], ["as"]), N("Div", ["A", "as"], ["ad"]), N("Round", ["ad"], ["ar"]),
             N("Add", ["ar", "z128f"], ["ar128"]), N("Cast", ["ar128"], ["Aq"], to=TensorProto.UINT8),
             N("MatMulInteger", ["Aq", "W8", "azp", "bzp"], ["Yi"]), N("Cast", ["Yi"], ["Yf"], to=TensorProto.FLOAT),
             N("Mul", ["Yf", "s8"], ["Yw"]), N("Mul", ["Yw", "as"], ["Y"])]
    g = helper.make_graph(nodes, "int4_to_int8", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _dq_int4_matmul(path: Path, w, block: int = 32) -> None:
    """Standard-op 4-bit: DequantizeLinear(int4 [K, N], scales [K/block, N], axis=0, block_size) → MatMul (opset 21)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    k, n = w.shape
    q, scale = _int4_blocks(w, block)
    wq = helper.make_tensor("Wq", TensorProto.INT4, [k, n], q.flatten().tolist())
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "S"], ["W"], axis=0, block_size=block),
             helper.make_node("MatMul", ["A", "W"], ["Y"])]
    g = helper.make_graph(nodes, "dq_int4", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                          [wq, numpy_helper.from_array(scale.reshape(k // block, n).astype(np.float32), "S")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))


def _set_accuracy_level(path: Path, level: int) -> None:
    import onnx
    m = onnx.load(str(path))
    for nd in m.graph.node:
        if nd.op_type == "MatMulNBits":
            for at in [at for at in nd.attribute if at.name == "accuracy_level"]:
                nd.attribute.remove(at)
            nd.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    onnx.save(m, str(path))


def _apply(src: Path, out: Path, passes: str) -> None:
    r = C.run_cmd([C.PY, "-m", "graphkit", "apply", str(src), "-o", str(out), "--passes", passes], quiet=False)
    if r["rc"] != 0:
        raise RuntimeError(f"graphkit apply {passes} failed: {r['stderr'][-1500:]}")


def build_ops(folder: Path) -> list[dict]:
    """One-layer models, one per graph form, for the layer shape and (fewer forms) the lm_head shape."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    out: list[dict] = []
    for tag, (k, n), forms in (("layer", OPS_LAYER, "all"), ("head", OPS_HEAD, "head")):
        w = (np.random.default_rng(1).standard_normal((k, n)) * 0.02).astype(np.float32)
        f32 = folder / f"{tag}-fp32.onnx"
        if not f32.exists():
            _one_matmul(f32, w)

        def add(name: str, file: str, make) -> None:
            p = folder / file
            if not p.exists():
                C.log(f"ops: building {file}")
                make(p)
            out.append({"name": f"{tag} {name}", "file": file, "K": k})

        if forms == "all":
            out.append({"name": f"{tag} fp32 MatMul", "file": f32.name, "K": k})
            for bits, bs, lvl in ((4, 32, 0), (4, 32, 4), (4, 128, 0), (4, 128, 4), (8, 32, 0), (8, 32, 4)):
                add(f"MatMulNBits bits={bits} block={bs} acc={lvl}", f"{tag}-nbits{bits}-b{bs}-acc{lvl}.onnx",
                    lambda p, bits=bits, bs=bs, lvl=lvl: (_apply(f32, p, f"matmul-nbits(bits={bits},block_size={bs})"),
                                                          _set_accuracy_level(p, lvl)))
            add("DequantizeLinear(int4, block 32) + MatMul", f"{tag}-dq-int4.onnx", lambda p: _dq_int4_matmul(p, w))
            add("anchor q8: DynamicQuantizeLinear + MatMulInteger (quantize_dynamic)", f"{tag}-q8-anchor.onnx",
                lambda p: C.anchor_q8(str(f32), str(p)))
        add("ours q8: per-token MatMulInteger (matmul-int8)", f"{tag}-q8-ours.onnx",
            lambda p: _apply(f32, p, "matmul-int8"))
        add("int4 at rest → int8 at load (folded) + per-token MatMulInteger", f"{tag}-int4to8.onnx",
            lambda p: _int4_to_int8_at_load(p, w))
        if forms == "head":
            for lvl in (0, 4):
                add(f"MatMulNBits bits=8 block=32 acc={lvl} (our q4 head)", f"{tag}-nbits8-b32-acc{lvl}.onnx",
                    lambda p, lvl=lvl: (_apply(f32, p, "matmul-nbits(bits=8,block_size=32)"), _set_accuracy_level(p, lvl)))
    (folder / "ops.json").write_text(json.dumps(out, indent=1))
    return out


def run_ops(a) -> None:
    folder = C.WORK / "browser-ops"
    models = build_ops(folder)
    prompt_file = C.WORK / f".browser-ops-m{a.prompt_tokens}.json"
    prompt_file.write_text(json.dumps(list(range(a.prompt_tokens))))
    clients = [c.strip() for c in a.clients.split(",") if c.strip() and c.strip() != "webgpu"]
    res = {}
    for client in clients:
        C.log(f"ops: {client}")
        C.wait_quiet()
        before = C.proc_cpu_snapshot()
        r = C.run_cmd(["node", str(BENCH_JS), *CLIENTS[client], "--ops", "--model-dir", str(folder), "--prompt-ids",
                       str(prompt_file), "--runs", str(a.ops_runs), "--threads", str(a.threads),
                       "--timeout-s", str(a.timeout_s)], timeout=a.timeout_s + 60, quiet=False)
        r["others_cores"] = C.others_cores_between(before, C.proc_cpu_snapshot(), r["wall_s"])
        j = C.json_tail(r["stdout"])
        if "ops" not in j:
            raise SystemExit(f"ops run failed on {client}: {j.get('error')} {r['stderr'][-2000:]}")
        res[client] = {"ops": {o["name"]: o for o in j["ops"]}, "others": r["others_cores"], "threads": j.get("num_threads", a.threads)}
    M = a.prompt_tokens
    rows = []
    for m in models:
        row = [m["name"], C.mb(C.file_bytes(folder / m["file"]))]
        for client in clients:
            o = res[client]["ops"][m["name"]]
            if "error" in o:
                row += ["fails: " + o["error"][:100].replace("|", "/"), "—", "—"]
            else:
                row += [f"{o['session_ms']:.0f}", f"{o['ms']['1']:.2f}", f"{o['ms'][str(M)]:.1f}"]
        rows.append(row)
    head = ["layer form", "file"] + [h for c in clients for h in (f"{c}: session ms", f"{c}: M=1 ms", f"{c}: M={M} ms")]
    body = f"""## One-layer forms: which quantized graph is fast where (diagnostics for the browser table)

{C.machine()}

Command: `.venv/bin/python benchmarks/browser.py --ops --clients {a.clients} --prompt-tokens {M}`. Each row is a
one-node-chain model (input A [M, K] float32): a `layer` = {OPS_LAYER[0]}×{OPS_LAYER[1]} projection (gate/up_proj of the
0.5B shape) or the `head` = {OPS_HEAD[0]}×{OPS_HEAD[1]} lm_head, random N(0, 0.02) weights, in one graph form each
(MatMulNBits files from `graphkit apply --passes matmul-nbits(...)` with accuracy_level patched; q8 from `matmul-int8` /
the anchor's quantize_dynamic; the two hand-built forms are in the script). Run straight in onnxruntime-node
(node) and onnxruntime-web wasm in headless Chromium (wasm, {a.threads} threads, cross-origin isolated) — the
runtimes Transformers.js uses; session ms = InferenceSession.create (includes constant folding and prepacking);
M=1 is a decode step, M={M} a prefill; median of {a.ops_runs} runs after 2 untimed. Others' CPU during the runs:
{', '.join(f"{c} {res[c]['others']:.2f} cores" for c in clients)}. Caveat: a 4 MB layer weight stays in the CPU
caches across repeated runs, so `layer` rows show kernel cost, not the memory-bound cost of a whole decode step;
the `head` rows (137-153 MB) do stream from memory. Forms run one after another in one process, not alternated.

{C.table(head, rows)}
"""
    C.write_section("browser-ops", body)


# ------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--clients", default="node,wasm", help="comma list of node, wasm, webgpu")
    ap.add_argument("--contenders", default=DEFAULT_CONTENDERS, help="comma list of 'WHO DTYPE' (WHO: ours, ours-fuse, anchor)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds (fresh process per contender per round)")
    ap.add_argument("--runs", type=int, default=2, help="timed generations per child")
    ap.add_argument("--slow-runs", type=int, default=1, help="timed generations per child for browser q4/q4f16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup-tokens", type=int, default=16,
                    help="untimed tokens first: Chromium runs wasm in baseline code for its first seconds (decode_floor.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout-s", type=int, default=900, help="per child")
    ap.add_argument("--folder", action="append", default=[], metavar="WHO=SUBDIR",
                    help="one more contender folder under the model folder (a `graphkit convert` output), e.g. "
                         "b1st=ours-browser-q8; then 'b1st q8' is a contender")
    ap.add_argument("--section", default="", help="RESULTS.md section suffix (browser-SIZE-SUFFIX); default: browser-SIZE")
    ap.add_argument("--group", default=None, help="name of this run's stored group (default: the clients)")
    ap.add_argument("--no-quality", action="store_true", help="skip the PyTorch / Python onnxruntime agreement child")
    ap.add_argument("--only", default="", help="comma list of 'CLIENT|WHO DTYPE' pairs: measure just these of the "
                    "clients × contenders matrix (e.g. 'wasm|ours q8,webgpu-lavapipe|ours q4f16')")
    ap.add_argument("--limits", action="store_true", help="add a table of the browser limits each file of `ours` "
                    "breaks (graphkit.browser_limits) to the section")
    ap.add_argument("--render-only", action="store_true", help="rewrite the RESULTS.md section from stored groups")
    ap.add_argument("--ops", action="store_true", help="diagnostics instead: one-layer graph forms (MatMulNBits bits/"
                    "block/accuracy_level, DequantizeLinear int4, q8 forms, int4-at-rest→int8) timed in node and wasm; "
                    "writes the section browser-ops")
    ap.add_argument("--ops-runs", type=int, default=5)
    a = ap.parse_args()
    if a.ops:
        run_ops(a)
        return
    base = C.WORK / f"qwen2.5-{a.size}"
    # The section shows the groups stored in this model folder with the same --section; a fresh machine has only
    # its own, so a later session names its own section rather than replacing the earlier sessions' tables.
    section = f"browser-{a.size}" + (f"-{a.section}" if a.section else "")
    for item in a.folder:
        who, sep, sub = item.partition("=")
        if not sep or not who.strip() or not sub.strip() or " " in who.strip():
            raise SystemExit(f"--folder {item!r}: expected WHO=SUBDIR")
        FOLDERS[who.strip()] = sub.strip()
    if a.render_only:
        C.write_section(section, render(base, a.size, a.limits, a.section))
        return
    clients = [c.strip() for c in a.clients.split(",") if c.strip()]
    if bad := [c for c in clients if c not in CLIENTS]:
        raise SystemExit(f"unknown client(s) {bad}; choose from {list(CLIENTS)}")
    if not (base / "ours" / "onnx").is_dir():
        raise SystemExit(f"no converted models in {base}; run benchmarks/conversion.py --size {a.size} first")
    anchor_folder(base)
    if any(c.strip().startswith("proto ") for c in a.contenders.split(",")):
        proto_folder(base)
    contenders = []
    for name in (c.strip() for c in a.contenders.split(",") if c.strip()):
        if len(name.split()) != 2 or name.split()[0] not in FOLDERS or name.split()[1] not in FILES:
            raise SystemExit(f"bad contender '{name}'; use 'WHO DTYPE', WHO in {list(FOLDERS)}, DTYPE in {list(FILES)}")
        if contender_file(base, name).exists():
            contenders.append(name)
        else:
            C.log(f"skipping {name}: {contender_file(base, name)} is missing")
    cfg = json.loads((base / "ours" / "config.json").read_text())
    prompt = C.prompt_ids(cfg["vocab_size"], a.prompt_tokens)
    prompt_file = C.WORK / f".browser-prompt-{a.prompt_tokens}.json"
    prompt_file.write_text(json.dumps(prompt))
    gen = json.loads((base / "ours" / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]

    for name in contenders:  # page cache, untimed
        C.log(f"page cache: {name}")
        with open(contender_file(base, name), "rb") as fh:
            while fh.read(1 << 24):
                pass
    failed: dict[str, dict] = {}

    def run_one(key: str, _r: int) -> dict:
        if key in failed:
            return failed[key]
        client, name = key.split("|")
        r = measure(base, client, name, a, prompt_file)
        if "error" in r:
            failed[key] = r
        return r

    keys = [f"{c}|{n}" for c in clients for n in contenders]
    if a.only:
        only = [k.strip() for k in a.only.split(",") if k.strip()]
        if bad := [k for k in only if k not in keys]:
            raise SystemExit(f"--only {bad}: not in the clients × contenders matrix {keys}")
        keys = only
    runs = C.alternate(keys, a.repeats, run_one)
    quality = None
    group = a.group or "+".join(clients)

    def store(quality: dict | None) -> None:
        record = {"group": group, "section": a.section, "time": time.time(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": C.machine(),
                  "command": "benchmarks/browser.py " + " ".join(sys.argv[1:]), "clients": clients,
                  "contenders": contenders, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                  "threads": a.threads, "warmup_tokens": a.warmup_tokens, "repeats": a.repeats, "runs": a.runs,
                  "slow_runs": a.slow_runs, "sizes": {n: _download_bytes(contender_file(base, n)) for n in contenders},
                  "summary": {k: summarize(rs) for k, rs in runs.items()}, "quality": quality,
                  "raw": {k: [{kk: vv for kk, vv in r.items() if kk not in ("stdout", "stderr")} for r in rs]
                          for k, rs in runs.items()}}
        (base / "browser-runs").mkdir(exist_ok=True)
        (base / "browser-runs" / f"{group}.json").write_text(json.dumps(record, indent=1))
        C.write_section(section, render(base, a.size, a.limits, a.section))

    store(None)  # the timings are kept even if the agreement child below is stopped
    if not a.no_quality:
        C.log("agreement child (PyTorch + Python onnxruntime)")
        quality = C.run_child("browser.py", "quality", {
            "hf": str(base / "hf"), "prompt": prompt, "new_tokens": a.new_tokens, "eos": eos,
            "files": {n: str(contender_file(base, n)) for n in contenders}}, quiet=False)
        quality = {k: quality[k] for k in ("torch_greedy", "files")}
        store(quality)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        C.child_main({"quality": quality_child})
    else:
        main()
