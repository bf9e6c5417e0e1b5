"""Input statistics of every quantizable MatMul, collected by running the fp32 export on calibration data.

For each MatMul whose B is a constant weight, the activation it reads (input A, ``[..., K]``) is exposed as
an extra graph output and accumulated over the calibration sequences (one onnxruntime run per sequence,
batch 1, no padding):

* ``diag``: ``sum_t x_tk^2 / T`` per input channel (what the weighted scale search uses);
* ``H``: ``sum_t x_t x_t^T / T`` (``[K, K]``, float64 accumulation), what GPTQ compensation needs — only
  for ``K <= full_max_k``: at the 1.5B shape the 28 down_proj inputs (K 8960) would need 9 GB together.

Written to an ``.npz`` (``stats.npz``) keyed by the activation's name, plus ``__map__``: a JSON list of
[weight initializer, activation] pairs, so a pass looks its weight up without re-deriving the graph.
Memory: one sequence's activations at a time (the 1.5B shape, 512 tokens: ~0.6 GB) plus the sums.
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
from onnx import TensorProto, helper

from graphkit.errors import GraphkitError
from passes._calib_stats import META_KEY, Stats  # noqa: F401  (Stats: the reader of what collect_stats writes)

FULL_MAX_K = 4096


def _matmul_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """weight root initializer -> the activation its MatMul reads (every MatMul with a constant 2-D weight,
    tied heads included), using matmul-nbits' own weight matching."""
    from passes.matmul_nbits import MatMulNBitsPass
    plan = MatMulNBitsPass(lm_head="8")._plan(model)[0]
    return {job.weight.root: job.node.input[0] for job in plan}


def collect_stats(model_path: Path, sequences: list[list[int]], out: Path, full_max_k: int = FULL_MAX_K,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Run ``model_path`` (an fp32 export with the KV-cache interface) on each sequence; write ``out``."""
    from graphkit.ortrun import DecoderRunner, make_session
    step = progress or (lambda m: None)
    model_path = Path(model_path)
    if not sequences:
        raise GraphkitError("calibration: no sequences to calibrate on")
    model = onnx.load(str(model_path), load_external_data=False)
    pairs = _matmul_inputs(model)
    acts = sorted(set(pairs.values()))
    existing = {o.name for o in model.graph.output}
    for a in acts:
        if a not in existing:
            model.graph.output.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, None))
    # The graph (without weights) goes beside the original, so its relative external-data paths still resolve.
    fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        del model
        runner = DecoderRunner(make_session(tmp, prepack=False))
        sums: dict[str, np.ndarray] = {}
        count = 0
        t0 = time.perf_counter()
        for i, seq in enumerate(sequences):
            ids = np.array([seq], np.int64)
            feeds = {"input_ids": ids}
            if "attention_mask" in runner.inputs:
                feeds["attention_mask"] = np.ones_like(ids)
            if "position_ids" in runner.inputs:
                feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
            feeds.update(runner.empty_past(1))
            values = runner.session.run(acts, feeds)
            for name, v in zip(acts, values):
                x = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
                K = x.shape[1]
                if K <= full_max_k:
                    acc = x.T.astype(np.float64) @ x.astype(np.float64)
                else:
                    acc = (x.astype(np.float64) ** 2).sum(axis=0)
                if name in sums:
                    sums[name] += acc
                else:
                    sums[name] = acc
            count += ids.shape[1]
            del values
            if (i + 1) % 8 == 0 or i + 1 == len(sequences):
                step(f"calibration: {i + 1}/{len(sequences)} sequences, {count} tokens, {time.perf_counter() - t0:.0f} s")
        del runner
    finally:
        Path(tmp).unlink(missing_ok=True)
    arrays = {}
    for name, acc in sums.items():
        arrays[name] = (acc / count).astype(np.float32)
    meta = {"map": sorted(pairs.items()), "tokens": count, "sequences": len(sequences)}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    out = Path(out)
    tmp_out = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp_out, **arrays)
    os.replace(tmp_out, out)
    return meta


def self_generated_sequences(model_path: Path, prefix: list[int], n: int = 32, length: int = 96, seed: int = 0,
                             temperature: float = 1.0, batch: int = 16) -> list[list[int]]:
    """Calibration without data: ``n`` sequences sampled from the fp32 model itself after ``prefix`` (the
    chat template's opening of a user turn), so the statistics follow the model's own distribution and no
    evaluation prompt is seen. Batched (all rows share the prefix: no padding); deterministic per seed."""
    from graphkit.ortrun import DecoderRunner, log_softmax
    runner = DecoderRunner.from_file(model_path, prepack=False)
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    while len(out) < n:
        b = min(batch, n - len(out))
        ids = np.array([prefix] * b, np.int64)
        mask = np.ones_like(ids)
        res = runner.step(ids, mask, runner.empty_past(b))
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
            res = runner.step(nxt[:, None].astype(np.int64), mask, res.present)
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
