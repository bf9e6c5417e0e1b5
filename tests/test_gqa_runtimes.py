"""GroupQueryAttention as fuse-gqa emits it, one node at a time, in every runtime Transformers.js uses.

Each case is a single ``com.microsoft.GroupQueryAttention`` node (separate q/k/v, ``do_rotary=0``, BNSH past,
optional ``attention_bias``) fed random tensors; its output must equal a numpy reference of causal GQA
attention (and ``present`` = past ++ new) in onnxruntime-node, onnxruntime-web wasm and onnxruntime-web
WebGPU (headless Chromium, via ``graphkit.tjs.run_model``).

Known onnxruntime-web bug, pinned here: its WebGPU flash-attention prefill shader
(``contrib_ops/webgpu/bert/flash_attention.wgsl.template``) computes 8 keys per step when the subgroup
size is <= 8 but loads and steps by ``min(sg_size, 16)`` keys, so on an adapter whose subgroup size is 4
(SwiftShader, Chrome's software adapter, the one this machine has) keys 4..7 of every step are stale:
every query row after the 4th attends to garbage. It runs for prompts of 32 tokens or more (shorter
chunks and single-token decode take the split-reduce path, which is right). Real GPUs report subgroup
sizes of 8 to 128; on this adapter the long-prefill case is an xfail that turns into a failure once a
Transformers.js update fixes it.

Measured on Mesa lavapipe (``webgpu:lavapipe``, subgroup size 8, 2026-12-03): this separate-q/k/v node is wrong
there too for prefills of 32+ tokens (every query row after the 8th; max error 0.16-0.23 at 32-64 tokens, also
with the ``subgroups`` feature hidden), so the subgroup-size explanation above is incomplete. The packed form
that ``--fuse`` writes (``pack-gqa``: packed q/k/v, ``do_rotary=1``) is exact on lavapipe: all five dtypes of the
``--fuse`` folder equal Python onnxruntime on 68-70-token prompts and ``verify --browser --devices
webgpu:lavapipe`` passes (test_tjs.py), while the same checks fail on SwiftShader (subgroup size 4).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphkit.tjs import run_model

pytestmark = pytest.mark.js

N, KV, H = 4, 2, 32          # the shipped model's attention: 4 query heads, 2 KV heads, head_dim 32
TOL = 1e-5
# (name, new tokens S, past P, with attention_bias)
SHORT = [("prefill25", 25, 0, False), ("prefill25_bias", 25, 0, True), ("decode", 1, 42, True),
         ("chunk", 5, 40, False)]
LONG = [("prefill43", 43, 0, True)]


def _model(cases):
    nodes, inputs, outputs = [], [], []
    for name, _s, _p, bias in cases:
        def vi(n, dt, shape):
            inputs.append(helper.make_tensor_value_info(f"{name}.{n}", dt, shape))
            return f"{name}.{n}"
        ins = [vi("q", TensorProto.FLOAT, [1, "S", N * H]), vi("k", TensorProto.FLOAT, [1, "S", KV * H]),
               vi("v", TensorProto.FLOAT, [1, "S", KV * H]), vi("past_k", TensorProto.FLOAT, [1, KV, "P", H]),
               vi("past_v", TensorProto.FLOAT, [1, KV, "P", H]), vi("seqlens_k", TensorProto.INT32, [1]),
               vi("total", TensorProto.INT32, [])]
        if bias:
            ins += ["", "", "", vi("bias", TensorProto.FLOAT, [1, 1, "S", "T"])]
        outs = [f"{name}.out", f"{name}.present_k", f"{name}.present_v"]
        nodes.append(helper.make_node("GroupQueryAttention", ins, outs, name=name, domain="com.microsoft",
                                      num_heads=N, kv_num_heads=KV, scale=H ** -0.5, do_rotary=0,
                                      local_window_size=-1))
        outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
    graph = helper.make_graph(nodes, "gqa_cases", inputs, outputs)
    # IR 9: onnxruntime-web 1.31 reads IR <= 13 only; opset 17 like our exports.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=9)


def _feeds(cases):
    feeds = {}
    for name, s, p, bias in cases:
        rng = np.random.default_rng(s * 100 + p)
        f = {"q": rng.normal(0, 1, (1, s, N * H)), "k": rng.normal(0, 1, (1, s, KV * H)),
             "v": rng.normal(0, 1, (1, s, KV * H)), "past_k": rng.normal(0, 1, (1, KV, p, H)),
             "past_v": rng.normal(0, 1, (1, KV, p, H))}
        f = {k: v.astype(np.float32) for k, v in f.items()}
        f["seqlens_k"] = np.array([p + s - 1], np.int32)
        f["total"] = np.array(p + s, np.int32)
        if bias:
            f["bias"] = np.zeros((1, 1, s, p + s), np.float32)
        feeds.update({f"{name}.{k}": v for k, v in f.items()})
    return feeds


def _reference(feeds, name):
    q = feeds[f"{name}.q"][0].reshape(-1, N, H).transpose(1, 0, 2)
    s = q.shape[1]
    k = np.concatenate([feeds[f"{name}.past_k"][0], feeds[f"{name}.k"][0].reshape(s, KV, H).transpose(1, 0, 2)], 1)
    v = np.concatenate([feeds[f"{name}.past_v"][0], feeds[f"{name}.v"][0].reshape(s, KV, H).transpose(1, 0, 2)], 1)
    t = k.shape[1]
    scores = q.astype(np.float64) @ np.repeat(k, N // KV, 0).transpose(0, 2, 1) * H ** -0.5
    scores = np.where(np.arange(t)[None] > np.arange(t - s, t)[:, None], -np.inf, scores)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = (w @ np.repeat(v, N // KV, 0)).transpose(1, 0, 2).reshape(1, s, N * H)
    return out, k[None], v[None]


def _errors(outs, feeds, cases):
    errs = {}
    for name, *_ in cases:
        out, pk, pv = _reference(feeds, name)
        errs[name] = max(float(np.abs(outs[f"{name}.out"] - out).max()),
                         float(np.abs(outs[f"{name}.present_k"] - pk).max()),
                         float(np.abs(outs[f"{name}.present_v"] - pv).max()))
    return errs


@pytest.fixture(scope="module")
def gqa_file(tmp_path_factory):
    import onnx
    path = tmp_path_factory.mktemp("gqa") / "gqa_cases.onnx"
    onnx.save(_model(SHORT + LONG), str(path))
    return path


def test_reference_matches_python_onnxruntime(gqa_file):
    """The numpy reference itself, held to onnxruntime CPU (where GQA is known good)."""
    import onnxruntime as ort
    feeds = _feeds(SHORT + LONG)
    sess = ort.InferenceSession(str(gqa_file), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    errs = _errors(outs, feeds, SHORT + LONG)
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("device", ["node", "wasm", "webgpu", "webgpu:lavapipe"])
def test_gqa_node_matches_reference(gqa_file, device):
    """``webgpu:lavapipe`` (Mesa lavapipe, subgroup size 8, scripts/setup.sh): the long prefill must be exact there,
    which is the evidence that the bug below is specific to subgroup-4 adapters."""
    if device == "webgpu:lavapipe" and os.environ.get("GRAPHKIT_SKIP_LAVAPIPE") == "1":
        pytest.skip("GRAPHKIT_SKIP_LAVAPIPE=1: the lavapipe WebGPU route was opted out of (scripts/setup.sh)")
    feeds = _feeds(SHORT + LONG)
    device, _, adapter = device.partition(":")
    res = run_model(gqa_file, feeds, device, adapter=adapter or "default")
    errs = _errors(res["outputs"], feeds, SHORT + LONG)
    print(f"{device}: adapter {res.get('adapter')}; max error per case {errs}")
    short = {k: v for k, v in errs.items() if k in {c[0] for c in SHORT}}
    assert max(short.values()) < TOL, short
    long_err = errs["prefill43"]
    adapter = res.get("adapter") or {}
    subgroup = adapter.get("subgroup_min_size")
    if device == "webgpu" and subgroup is not None and subgroup < 8:
        # Pinned upstream bug (module docstring). Once it is fixed this assertion fails: drop the caveat
        # from passes/fuse_gqa.py and docs, and the xfail in test_tjs.py.
        assert long_err > 0.1, f"onnxruntime-web fixed the subgroup-size-4 prefill bug ({long_err:.2g}): update the caveat"
        pytest.xfail(f"onnxruntime-web WebGPU flash-attention prefill on a subgroup-size-{subgroup} adapter "
                     f"({adapter.get('vendor')}): prefill43 off by {long_err:.2g} (known upstream bug)")
    if device == "webgpu" and subgroup == 8:
        # Measured (module docstring): wrong on lavapipe too, in this separate-q/k/v form only.
        assert long_err > 0.05, f"onnxruntime-web's separate-q/k/v prefill is now right on subgroup 8 ({long_err:.2g}): update the docstring"
        pytest.xfail(f"onnxruntime-web WebGPU GroupQueryAttention (separate q/k/v) prefill43 off by {long_err:.2g} on "
                     "the lavapipe adapter (subgroup size 8); the packed form "
                     "--fuse writes is exact there (test_tjs.py lavapipe tests)")
    assert long_err < TOL, errs
