"""Input statistics of every quantizable MatMul, collected by running the fp32 export on calibration data.

For each MatMul whose B is a constant weight, the activation it reads (input A, ``[..., K]``) is accumulated
over the calibration sequences (batch 1, no padding):

* ``diag``: ``sum_t x_tk^2 / T`` per input channel (what the weighted scale search uses);
* ``H``: ``sum_t x_t x_t^T / T`` (``[K, K]``), what GPTQ compensation needs — only for ``K <= full_max_k``:
  at the 1.5B shape the 28 down_proj inputs (K 8960) would need 9 GB together. Each sequence's products
  are one float32 ``x^T x`` (at most its length in terms; relative error ~1e-6, below the float32 the file
  stores), summed over sequences in float64.

Layer by layer (:func:`plan_segments`): the graph is cut into segments of about ``SEGMENT_BYTES`` of weights
(one to three decoder layers at the 1.5B shape), each its own onnxruntime session holding only its own weights;
every sequence runs through a segment before the next one starts, and only the tensors later
segments read (the residual stream, rotary tables, mask: ~3 MB per 512 tokens at 1.5B) are kept between
them. So at most one segment's weights are resident instead of the whole fp32 model (6.2 GB at 1.5B), the
lm_head MatMul is never run (only its input is needed), and each segment's statistics are written to the
``.npz`` (``stats.npz``, keyed by the activation's name) as soon as it finishes, plus ``__meta__``: JSON with
the [weight initializer, activation] pairs, so a pass looks its weight up without re-deriving the graph.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, TypeProto, helper

from graphkit.errors import GraphkitError
from passes._calib_stats import META_KEY, Stats  # noqa: F401  (Stats: the reader of what collect_stats writes)

FULL_MAX_K = 4096
# Weight bytes a segment accumulates before it looks for a cut (graphkit/calibration.py's docstring): at the
# 1.5B shape a decoder layer holds 187 MB, so segments are one to three layers and at most ~2x this is mapped.
SEGMENT_BYTES = 256 << 20


def _matmul_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """weight root initializer -> the activation its MatMul reads (every MatMul with a constant 2-D weight,
    tied heads included), using matmul-nbits' own weight matching."""
    from passes.matmul_nbits import MatMulNBitsPass
    plan = MatMulNBitsPass(lm_head="8")._plan(model)[0]
    return {job.weight.root: job.node.input[0] for job in plan}


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node reads, those its subgraphs read from the outer scope included (a superset is harmless)."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names += _node_inputs(n)
    return names


def _tensor_bytes(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def plan_segments(graph: onnx.GraphProto, wanted: list[str], budget: int = SEGMENT_BYTES) -> list[list[int]]:
    """Split the nodes that ``wanted`` depends on (graph order, which ONNX requires to be topological) into
    consecutive segments of about ``budget`` to ``2 * budget`` weight bytes, each cut where the fewest
    tensors cross it (in a decoder: between layers, where only the residual stream, the rotary tables and the
    mask are live). Nodes nothing wanted depends on (the lm_head MatMul, the present KV outputs) are dropped."""
    nodes = list(graph.node)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    need = [False] * len(nodes)
    stack = [producer[w] for w in wanted if w in producer]
    while stack:
        i = stack.pop()
        if need[i]:
            continue
        need[i] = True
        stack.extend(producer[x] for x in _node_inputs(nodes[i]) if x in producer and not need[producer[x]])
    order = [i for i in range(len(nodes)) if need[i]]
    if not order:
        return []
    pos = {i: p for p, i in enumerate(order)}
    # live[p]: tensors (not weights) made before position p and read at or after it
    defined = {o: pos[producer[o]] for o in producer if producer[o] in pos}
    last: dict[str, int] = {}
    cost = [0] * len(order)
    seen: set[str] = set()
    for p, i in enumerate(order):
        for x in _node_inputs(nodes[i]):
            if x in inits:
                if x not in seen:
                    seen.add(x)
                    cost[p] += _tensor_bytes(inits[x])
            else:
                last[x] = p
    delta = [0] * (len(order) + 1)
    for x, u in last.items():
        d = defined.get(x, -1)
        if d < u:
            delta[d + 1] += 1
            delta[u + 1] -= 1
    live, run = [], 0
    for p in range(len(order)):
        run += delta[p]
        live.append(run)
    cum = [0]
    for c in cost:
        cum.append(cum[-1] + c)
    segments, s = [], 0
    while s < len(order):
        a = next((p for p in range(s + 1, len(order)) if cum[p] - cum[s] >= budget), None)
        if a is None:
            segments.append(order[s:])
            break
        b = a
        while b + 1 < len(order) and cum[b + 1] - cum[s] <= 2 * budget:
            b += 1
        c = min(range(a, b + 1), key=lambda p: (live[p], p))
        segments.append(order[s:c])
        s = c
    return segments


def _value_types(model: onnx.ModelProto) -> dict[str, TypeProto]:
    """Element types of every tensor (onnx shape inference on the graph without its weights)."""
    from graphkit.modelio import graph_skeleton
    try:
        inferred = onnx.shape_inference.infer_shapes(graph_skeleton(model))
    except Exception:  # types are a help for onnxruntime, not a requirement (it infers outputs itself)
        inferred = model
    g = inferred.graph
    return {v.name: v.type for v in list(g.value_info) + list(g.input) + list(g.output)}


def _empty_feeds(graph: onnx.GraphProto, seq: list[int]) -> dict[str, np.ndarray]:
    """The feeds of one batch-1 prefill without past: ids, an all-ones mask, positions, empty KV inputs
    (the batch dimension 1, every other symbolic dimension 0), as graphkit/ortrun.py feeds a decoder."""
    ids = np.array([seq], np.int64)
    feeds: dict[str, np.ndarray] = {}
    for inp in graph.input:
        t = inp.type.tensor_type
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(ids)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        else:
            shape = [d.dim_value if d.HasField("dim_value") else (1 if k == 0 else 0) for k, d in enumerate(t.shape.dim)]
            feeds[inp.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def _npz_writer(path: Path):
    """An .npz written one array at a time (np.load reads it like np.savez's): statistics go to disk as each
    segment finishes instead of all being held until the end."""
    import zipfile
    zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)

    def put(name: str, arr: np.ndarray) -> None:
        with zf.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return zf, put


def collect_stats(model_path: Path, sequences: list[list[int]], out: Path, full_max_k: int = FULL_MAX_K,
                  progress: Callable[[str], None] | None = None, segment_bytes: int = SEGMENT_BYTES) -> dict:
    """Run ``model_path`` (an fp32 export with the KV-cache interface) on each sequence; write ``out``.

    Layer by layer: the graph is cut into segments (:func:`plan_segments`); each segment is its own
    onnxruntime session (only its own weights loaded) that runs every sequence, keeps
    the tensors later segments read, and writes its MatMul inputs' statistics before the next one starts."""
    from graphkit.ortrun import make_session
    step = progress or (lambda m: None)
    model_path = Path(model_path)
    if not sequences:
        raise GraphkitError("calibration: no sequences to calibrate on")
    model = onnx.load(str(model_path), load_external_data=False)
    pairs = _matmul_inputs(model)
    acts = sorted(set(pairs.values()))
    g = model.graph
    inits = {t.name for t in g.initializer}
    segments = plan_segments(g, acts, segment_bytes)
    types = _value_types(model)
    graph_inputs = {i.name for i in g.input}
    last_seg: dict[str, int] = {}
    for k, seg in enumerate(segments):
        for i in seg:
            for x in _node_inputs(g.node[i]):
                if x not in inits:
                    last_seg[x] = k
    count = sum(len(s) for s in sequences)
    feeds = [_empty_feeds(g, s) for s in sequences]
    # values[name][j]: tensor ``name`` of sequence j, kept while a later segment still reads it
    values: dict[str, list[np.ndarray]] = {n: [f[n] for f in feeds] for n in graph_inputs if n in last_seg}
    del feeds
    out = Path(out)
    tmp_out = out.with_name(out.name + ".tmp.npz")
    zf, put = _npz_writer(tmp_out)
    written: set[str] = set()
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    try:
        for k, seg in enumerate(segments):
            nodes = [g.node[i] for i in seg]
            made = {o for n in nodes for o in n.output if o}
            reads = sorted({x for n in nodes for x in _node_inputs(n) if x not in made and x not in inits and x in values})
            keep = sorted(x for x in made if last_seg.get(x, -1) > k)
            mine = sorted(x for x in made if x in acts)
            outputs = keep + [a for a in mine if a not in keep]

            def vi(name: str) -> onnx.ValueInfoProto:
                v = onnx.ValueInfoProto(name=name)
                if name in types:
                    v.type.CopyFrom(types[name])
                    v.type.tensor_type.ClearField("shape")  # a dimension the sequence length makes
                return v
            used = {x for n in nodes for x in _node_inputs(n)}
            sub = helper.make_graph(nodes, f"calib-{k}", [vi(x) for x in reads], [vi(x) for x in outputs],
                                    initializer=[t for t in g.initializer if t.name in used])
            sm = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
            # beside the original, so its relative external-data paths still resolve
            onnx.save(sm, tmp)
            del sm, sub
            # prepacked: ~20 % less CPU per segment at the 1.5B shape (measured), and only this segment's weights
            sess = make_session(tmp)
            sums: dict[str, np.ndarray] = {}
            kept: dict[str, list[np.ndarray]] = {x: [] for x in keep}
            for j in range(len(sequences)):
                res = sess.run(outputs, {x: values[x][j] for x in reads})
                for name, v in zip(outputs, res):
                    if name in kept:
                        kept[name].append(v)
                    if name in mine:
                        x = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
                        # float32 products of one sequence (<= its length in terms), summed in float64
                        acc = (x.T @ x) if x.shape[1] <= full_max_k else np.einsum("tk,tk->k", x, x)
                        if name in sums:
                            sums[name] += acc
                        else:
                            sums[name] = acc.astype(np.float64)
                del res
            del sess
            for name, acc in sums.items():
                put(name, (acc / count).astype(np.float32))
                written.add(name)
            del sums
            values.update(kept)
            for x in [x for x in values if last_seg.get(x, -1) <= k]:
                del values[x]
            step(f"calibration: layer segment {k + 1}/{len(segments)}, {len(sequences)} sequences, "
                 f"{count} tokens, {time.perf_counter() - t0:.0f} s")
        meta = {"map": sorted(pairs.items()), "tokens": count, "sequences": len(sequences)}
        put(META_KEY, np.frombuffer(json.dumps(meta).encode(), np.uint8))
        zf.close()
        os.replace(tmp_out, out)
    finally:
        zf.close()
        Path(tmp).unlink(missing_ok=True)
        tmp_out.unlink(missing_ok=True)
    return meta


# weight-only 8-bit, block 32, float activations (accuracy_level 4 = int8 per 32-element block of each row): the
# sampler's own error stays far below the q8 dtype's, whose per-token activation quantization measurably changed
# what the 4-bit files learnt from the samples (held-out answers = fp32 on the example: 16, 16, 22 of 24 over three
# seeds sampled via q8's form, vs 23, 21, 22 from fp32 and 23, 22, 19 from this form)
SAMPLER_PIPELINE = ("logits-to-keep,tied-embedding(bits=8,block_size=32,accuracy_level=4),"
                    "matmul-nbits(bits=8,block_size=32,accuracy_level=4)")


def build_sampler(model_path: Path, dest: Path) -> Path:
    """An 8-bit copy of the fp32 export to sample calibration sequences from (``SAMPLER_PIPELINE``: weight-only
    8-bit, logits for the last position only). Why not the fp32 model itself: token-by-token generation needs
    every layer per token, so its session holds all the float weights at once (1.5B: 8.56 GB peak RSS, over the
    6.2 GB the calibrated conversion is held to; docs/memory.md); the 8-bit copy holds about a quarter of the
    bytes. Weights are read lazily and new ones spill to disk beside ``dest``, as in every convert step."""
    from graphkit import tensors
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tensors.spill_to(dest.parent / ".sampler-spill", f"building the calibration sampler {dest}"):
        model, _ = run_passes(load_model(model_path, load_external="lazy"), parse_spec(SAMPLER_PIPELINE))
        save_model(model, dest)
        del model
    return dest


def self_generated_sequences(model_path: Path, prefix: list[int], n: int = 32, length: int = 96, seed: int = 0,
                             temperature: float = 1.0, batch: int = 16, sampler: bool = True) -> list[list[int]]:
    """Calibration without data: ``n`` sequences sampled from the model itself after ``prefix`` (the chat
    template's opening of a user turn), so the statistics follow the model's own distribution and no evaluation
    prompt is seen. ``sampler`` (default): from an 8-bit copy of the fp32 export (``build_sampler``, built in a
    temporary folder beside ``model_path`` and removed), which keeps the step's memory near a 4-bit dtype's;
    False samples ``model_path`` as it is (prepacking off: float weights stay in onnxruntime's memory map).
    Batched (all rows share the prefix: no padding); deterministic per seed."""
    model_path = Path(model_path)
    if sampler:
        with tempfile.TemporaryDirectory(prefix=".sampler-", dir=model_path.parent) as tmp:
            return _sample(build_sampler(model_path, Path(tmp) / "sampler.onnx"), prefix, n, length, seed,
                           temperature, batch, prepack=True)
    return _sample(model_path, prefix, n, length, seed, temperature, batch, prepack=False)


def _sample(model_path: Path, prefix: list[int], n: int, length: int, seed: int, temperature: float, batch: int,
            prepack: bool) -> list[list[int]]:
    from graphkit.ortrun import DecoderRunner, log_softmax
    # prepacking: MatMulNBits' fast kernel needs its packed layout, and onnxruntime frees what it packed
    runner = DecoderRunner.from_file(model_path, prepack=prepack)
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    while len(out) < n:
        b = min(batch, n - len(out))
        ids = np.array([prefix] * b, np.int64)
        mask = np.ones_like(ids)
        res = runner.step(ids, mask, runner.empty_past(b), logits_to_keep=1)
        seqs = [list(prefix) for _ in range(b)]
        for _ in range(length):
            logp = log_softmax(res.logits[:, -1] / temperature)
            p = np.exp(logp)
            cum = np.cumsum(p, axis=-1)
            u = rng.random((b, 1)) * cum[:, -1:]
            nxt = np.minimum((cum < u).sum(axis=-1), p.shape[-1] - 1)
            for row, t in zip(seqs, nxt):
                row.append(int(t))
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            res = runner.step(nxt[:, None].astype(np.int64), mask, res.present, logits_to_keep=1)
        out.extend(seqs)
    return out


def chat_prefix(tokenizer_dir: Path) -> list[int]:
    """The token ids that open a user turn in the folder's chat template (system prompt included), or the
    BOS token when there is no template: where self-generated calibration starts. Uses `tokenizers` and the
    template as transformers renders it (graphkit.prompts), never transformers itself: convert from an ONNX
    export must not import torch."""
    from graphkit.prompts import load_tokenizer_files, render_chat
    tok, cfg = load_tokenizer_files(Path(tokenizer_dir))
    marker = "\u2063calibration\u2063"
    if cfg.get("chat_template"):
        text = render_chat(cfg, [{"role": "user", "content": marker}])
        if marker in text:
            return list(tok.encode(text.split(marker)[0], add_special_tokens=False).ids)
    for key in ("bos_token", "eos_token"):
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value and tok.token_to_id(value) is not None:
            return [int(tok.token_to_id(value))]
    return [0]
