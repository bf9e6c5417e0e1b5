"""Run a Transformers.js-style decoder ONNX file with onnxruntime, the way the client does.

The feeds mirror Transformers.js: ``input_ids``, ``attention_mask``, ``position_ids`` (only if the
graph declares it; computed as cumsum(mask)-1 with padding set to 1), and an empty past built from
the graph's input metadata (``batch_size`` → batch, other symbolic dims → 0) in the declared dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphkit.tjs_contract import (ATTENTION_MASK, BATCH, INPUT_IDS, LOGITS, PAST_RE as _PAST, POSITION_IDS,
                                   PRESENT_PREFIX, present_to_past)

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def make_session(path: str | os.PathLike, provider: str = "CPUExecutionProvider", threads: int | None = None,
                 prepack: bool = True):
    """An onnxruntime session. ``prepack=False`` keeps float MatMul weights in onnxruntime's memory map of the
    external data instead of packed anonymous copies: for a reference run of a large fp32 model (1.5B: 6.1 GB
    less anonymous memory, session load 29 s -> 2 s, results equal up to float summation order)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])


@dataclass
class StepOutput:
    logits: np.ndarray              # float32 [batch, seq, vocab]
    present: dict[str, np.ndarray]  # past_key_values.{i}.{k} -> array, ready to feed back


class DecoderRunner:
    def __init__(self, session) -> None:
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = sorted((n for n in self.inputs if _PAST.match(n)),
                                 key=lambda n: (int(_PAST.match(n).group(1)), _PAST.match(n).group(2)))
        if INPUT_IDS not in self.inputs or LOGITS not in {o.name for o in session.get_outputs()}:
            raise ValueError("not a Transformers.js decoder: needs input 'input_ids' and output 'logits' "
                             "(run the kv-rename pass first)")

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw) -> "DecoderRunner":
        return cls(make_session(path, **kw))

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        past = {}
        for name in self.past_names:
            meta = self.inputs[name]
            shape = [batch if d == BATCH else (d if isinstance(d, int) else 0) for d in meta.shape]
            past[name] = np.zeros(shape, dtype=_ORT_TYPES[meta.type])
        return past

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]) -> StepOutput:
        feeds = {INPUT_IDS: input_ids.astype(np.int64)}
        if ATTENTION_MASK in self.inputs:
            feeds[ATTENTION_MASK] = attention_mask.astype(np.int64)
        if POSITION_IDS in self.inputs:
            pos = np.cumsum(attention_mask, axis=1) - 1
            pos[attention_mask == 0] = 1
            feeds[POSITION_IDS] = pos[:, -input_ids.shape[1]:].astype(np.int64)
        feeds.update(past)
        out_names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(None, feeds)
        outs = dict(zip(out_names, values))
        present = {present_to_past(n): v for n, v in outs.items() if n.startswith(PRESENT_PREFIX)}
        return StepOutput(outs[LOGITS].astype(np.float32), present)

    def greedy(self, prompt_ids: list[int], new_tokens: int, suppress: tuple[int, ...] = ()) -> tuple[list[int], list[np.ndarray]]:
        """Greedy ids for exactly ``new_tokens`` steps (no EOS stop) and each step's last logits.

        ``suppress`` token ids are never picked: Transformers.js's ``min_new_tokens`` masks the EOS
        ids this way, so pass them to reproduce its output."""
        ids = np.array([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        out = self.step(ids, mask, self.empty_past(1))
        generated, step_logits = [], []
        for _ in range(new_tokens):
            last = out.logits[0, -1]
            step_logits.append(last)
            if suppress:
                last = last.copy()
                last[list(suppress)] = -np.inf
            nxt = int(np.argmax(last))
            generated.append(nxt)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            out = self.step(np.array([[nxt]], np.int64), mask, out.present)
        return generated, step_logits

    def teacher_forced_logits(self, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
        """Next-token logits at each position predicting ``continuation`` (one prefill pass)."""
        ids = np.array([list(prompt_ids) + list(continuation)], dtype=np.int64)
        out = self.step(ids, np.ones_like(ids), self.empty_past(1))
        start = len(prompt_ids) - 1
        return out.logits[0, start:start + len(continuation)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(ref || other) per position, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def default_threads() -> int | None:
    env = os.environ.get("GRAPHKIT_THREADS")
    return int(env) if env else None


def file_size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "_data*"))
