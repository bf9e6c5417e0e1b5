"""Model-free helpers shared by the pass tests: run a graph in onnxruntime, copy it, count its ops, and the
smallest hand-built decoder attention block (``attn_graph``, what fuse-gqa / pack-gqa start from). Graphs are
built with tests/tiny_decoder.py's one builder."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from tiny_decoder import make_model, vi

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops


def session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_graph(model, feeds):
    s = session(model)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def copy_model(model):
    return onnx.ModelProto.FromString(model.SerializeToString())


def op_counts(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def rel_err(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(1e-12, float(np.abs(want).max())))


def attn_graph(N=4, KV=2, H=8, hidden=16, mask="causal", scale_split=True):
    """One decoder attention block the way the exporters write it after fuse-rotary: projections,
    head split, RotaryEmbedding, past concat (present.* outputs), repeat_kv, scaled QK^T + mask bias
    (from attention_mask), softmax, PV, head merge."""
    rep = N // KV
    rng = np.random.default_rng(5)
    L = 64
    inv = (1.0 / (10000.0 ** (np.arange(0, H, 2, dtype=np.float32) / H))).astype(np.float32)
    ang = np.arange(L, dtype=np.float32)[:, None] * inv[None]
    c = {
        "Wq": (0.3 * rng.standard_normal((hidden, N * H))).astype(np.float32),
        "Wk": (0.3 * rng.standard_normal((hidden, KV * H))).astype(np.float32),
        "Wv": (0.3 * rng.standard_normal((hidden, KV * H))).astype(np.float32),
        "cos_cache": np.cos(ang).astype(np.float32), "sin_cache": np.sin(ang).astype(np.float32),
        "shape_q": np.array([0, 0, N, H], np.int64), "shape_kv": np.array([0, 0, KV, H], np.int64),
        "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": np.array([0], np.int64),
        "ax1": np.array([1], np.int64), "ax2": np.array([2], np.int64), "ax12": np.array([1, 2], np.int64),
        "sq": np.array(H ** -0.25, np.float32), "zero": np.array(0.0, np.float32),
        "neg": np.array(np.finfo(np.float32).min, np.float32), "win": np.array(2, np.int64),
        "rep_c": np.array([rep], np.int64), "kvh": np.array([KV], np.int64), "nh": np.array([N], np.int64),
        "hd": np.array([H], np.int64), "merge": np.array([0, 0, N * H], np.int64),
    }
    nd = helper.make_node
    nodes = [
        nd("MatMul", ["x", "Wq"], ["q_lin"]), nd("MatMul", ["x", "Wk"], ["k_lin"]),
        nd("MatMul", ["x", "Wv"], ["v_lin"]),
        nd("Reshape", ["q_lin", "shape_q"], ["q4"]), nd("Transpose", ["q4"], ["q_t"], perm=[0, 2, 1, 3]),
        nd("Reshape", ["k_lin", "shape_kv"], ["k4"]), nd("Transpose", ["k4"], ["k_t"], perm=[0, 2, 1, 3]),
        nd("Reshape", ["v_lin", "shape_kv"], ["v4"]), nd("Transpose", ["v4"], ["v_t"], perm=[0, 2, 1, 3]),
        nd("RotaryEmbedding", ["q_t", "position_ids", "cos_cache", "sin_cache"], ["q_rot"], domain=MS_DOMAIN),
        nd("RotaryEmbedding", ["k_t", "position_ids", "cos_cache", "sin_cache"], ["k_rot"], domain=MS_DOMAIN),
        nd("Concat", ["past_key_values.0.key", "k_rot"], ["present.0.key"], axis=-2),
        nd("Concat", ["past_key_values.0.value", "v_t"], ["present.0.value"], axis=-2),
    ]
    # repeat_kv: [B, KV, T, H] -> [B, KV, rep, T, H] -> [B, N, T, H]
    for w in ("key", "value"):
        src = f"present.0.{w}"
        nodes += [nd("Shape", [src], [f"{w}_shp"]),
                  nd("Slice", [f"{w}_shp", "ax0", "ax1", "ax0"], [f"{w}_b"]),
                  nd("Gather", [f"{w}_shp", "ax2"], [f"{w}_t"], axis=0),
                  nd("Unsqueeze", [src, "ax2"], [f"{w}_u"]),
                  nd("Concat", [f"{w}_b", "kvh", "rep_c", f"{w}_t", "hd"], [f"{w}_tgt"], axis=0),
                  nd("Expand", [f"{w}_u", f"{w}_tgt"], [f"{w}_e"]),
                  nd("Concat", [f"{w}_b", "nh", f"{w}_t", "hd"], [f"{w}_shape_rep"], axis=0),
                  nd("Reshape", [f"{w}_e", f"{w}_shape_rep"], [f"{w}_rep"])]
    nodes += [nd("Transpose", ["key_rep"], ["kT"], perm=[0, 1, 3, 2])]
    if scale_split:
        nodes += [nd("Mul", ["q_rot", "sq"], ["qs"]), nd("Mul", ["kT", "sq"], ["ks"]),
                  nd("MatMul", ["qs", "ks"], ["scores"])]
    else:
        c["scale"] = np.array(H ** -0.5, np.float32)
        nodes += [nd("MatMul", ["q_rot", "kT"], ["raw"]), nd("Mul", ["raw", "scale"], ["scores"])]
    # mask: causal (key j <= past + i) and attention_mask[b, j]
    nodes += [
        nd("Shape", ["attention_mask"], ["m_shape"]), nd("Gather", ["m_shape", "i1"], ["T"], axis=0),
        nd("Shape", ["x"], ["x_shape"]), nd("Gather", ["x_shape", "i1"], ["S"], axis=0),
        nd("Sub", ["T", "S"], ["P"]),
        nd("Range", ["i0", "S", "i1"], ["rows0"]), nd("Add", ["rows0", "P"], ["rows1"]),
        nd("Unsqueeze", ["rows1", "ax1"], ["rows"]),
        nd("Range", ["i0", "T", "i1"], ["cols0"]), nd("Unsqueeze", ["cols0", "ax0"], ["cols"]),
        nd("LessOrEqual", ["cols", "rows"], ["causal"]),
        nd("Cast", ["attention_mask"], ["mb"], to=TensorProto.BOOL), nd("Unsqueeze", ["mb", "ax12"], ["pad"]),
    ]
    if mask == "causal":
        nodes += [nd("And", ["causal", "pad"], ["allowed"])]
    elif mask == "window":  # sliding window of 2: a look-alike GQA must not take for plain causal
        nodes += [nd("Sub", ["rows", "win"], ["lo"]), nd("Greater", ["cols", "lo"], ["inwin"]),
                  nd("And", ["causal", "inwin"], ["cw"]), nd("And", ["cw", "pad"], ["allowed"])]
    else:  # bidirectional
        nodes += [nd("Identity", ["pad"], ["allowed"])]
    nodes += [
        nd("Where", ["allowed", "zero", "neg"], ["bias"]), nd("Add", ["scores", "bias"], ["masked"]),
        nd("Softmax", ["masked"], ["probs"], axis=-1),
        nd("MatMul", ["probs", "value_rep"], ["ctx"]), nd("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        nd("Reshape", ["ctx_t", "merge"], ["attn_out"]),
    ]
    inputs = [vi("x", F32, ["batch_size", "sequence_length", hidden]),
              vi("attention_mask", I64, ["batch_size", "total_sequence_length"]),
              vi("position_ids", I64, ["batch_size", "sequence_length"]),
              vi("past_key_values.0.key", F32, ["batch_size", KV, "past_sequence_length", H]),
              vi("past_key_values.0.value", F32, ["batch_size", KV, "past_sequence_length", H])]
    outputs = [vi("attn_out", F32, ["batch_size", "sequence_length", N * H]),
               vi("present.0.key", F32, ["batch_size", KV, "total_sequence_length", H]),
               vi("present.0.value", F32, ["batch_size", KV, "total_sequence_length", H])]
    return make_model(nodes, inputs, outputs, c, opset=18, domains={MS_DOMAIN: 1}, ir_version=8, name="attn")


def attn_feeds(b, s, p, pads=(), hidden=16, KV=2, H=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, p + s), np.int64)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    pos = np.cumsum(mask, 1) - 1
    pos[mask == 0] = 1
    return {"x": rng.standard_normal((b, s, hidden)).astype(np.float32), "attention_mask": mask,
            "position_ids": pos[:, -s:], "past_key_values.0.key": rng.standard_normal((b, KV, p, H)).astype(np.float32),
            "past_key_values.0.value": rng.standard_normal((b, KV, p, H)).astype(np.float32)}


def valid_rows(feeds):
    s = feeds["x"].shape[1]
    return feeds["attention_mask"][:, -s:] > 0  # [b, s] query positions that are real tokens

