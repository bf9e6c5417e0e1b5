"""``matmul-int8``: dynamic int8 quantization of constant-weight MatMuls (Transformers.js ``q8``).

Every ``MatMul(A, W)`` whose ``W`` is a constant float32 2-D ``[K, N]`` weight (an initializer, a
``Constant`` node, or ``Transpose(perm=[1, 0])`` of one: the tied ``lm_head`` of dynamo exports)
becomes a ``MatMulInteger`` on a uint8 activation and an int8 weight. Two activation forms:

``activations="per-token"`` (default): one symmetric scale per row (token) of ``A``::

    s   = Max(ReduceMax(Abs(A), axes=[-1], keepdims=1) / 127, 1e-30)          float [..., 1]
    A_q = Cast(Round(A / s) + 128, to=uint8)                                     uint8, zero point 128
    MatMulInteger(A_q, W_q int8 [K, N], 128 uint8 scalar, 0 int8 scalar) ──► int32
    Cast(to=float) ──► Mul(·, W_scale) ──► Mul(·, s) ──► original output

``activations="per-token-dql"``: per-token accuracy in the form onnxruntime fuses. Each row is divided by
its own ``max|x|``, so one DynamicQuantizeLinear scale fits every token (a step of at most 2/255 of each row's
range, as per-token's 1/127), and the row scale is multiplied back after the integer product::

    r   = Max(ReduceMax(Abs(A), axes=[-1], keepdims=1), 1e-30)                 float [..., 1]
    A_q, A_scale, A_zp = DynamicQuantizeLinear(A / r)
    MatMulInteger(A_q, W_q, A_zp, 0) ──► Cast ──► Mul(·, Mul(A_scale, W_scale)) ──► Mul(·, r)

onnxruntime folds the middle into ``DynamicQuantizeMatMul`` (one kernel quantizes A and applies the scales in
the GEMM's output stage), so a quantizer costs five nodes instead of per-token's eleven.

``activations="per-tensor"``: the standard q8 form, one scale for the whole tensor::

    A ──DynamicQuantizeLinear──► A_q (uint8), A_scale (float scalar), A_zp (uint8 scalar)
    MatMulInteger(A_q, W_q int8 [K, N], A_zp, 0 int8 scalar) ──► int32
    Cast(to=float) ──► Mul(·, Mul(A_scale, W_scale)) ──► original output

Why per-token is the default (docs/q8.md has the numbers): in a prefill, one token with a massive
activation (SwiGLU outputs at ``down_proj`` inputs reach 30-90x their rms even in the tiny trained
example) sets DynamicQuantizeLinear's single scale for every token of the prompt, leaving the
others a handful of levels. That, not the weights, is what turns dynamic-int8 LLMs into garbage.

* ``W_q = clip(rint(W / W_scale), -127, 127)``, symmetric (zero point 0). With ``per_channel``
  (default) ``W_scale`` is a float ``[N]`` vector, ``max|W[:, n]| / 127`` per output column;
  otherwise one scalar ``max|W| / 127``. Because the zero point is 0 the per-column scale factors
  out of the integer product exactly: ``x @ W ≈ (A_q - A_zp) @ W_q * (s_A * W_scale[n])``, so
  MatMulInteger itself only ever sees scalar zero points (the form every kernel supports: ORT CPU
  and the onnxruntime-web wasm MLAS kernel take u8 A with s8 or u8 B; the WebGPU EP has no
  MatMulInteger and runs these nodes on its CPU fallback).
* One activation quantizer per activation tensor: q/k/v (and gate/up) share it.
* Per-tensor form: the per-MatMul ``Mul(A_scale, W_scale)`` node is deliberately not shared, since
  onnxruntime's ``MatMulIntegerToFloatFusion`` only fires when that node has a single consumer; it
  then folds the chain (and a following bias ``Add`` with the bias as second input, which this
  pass arranges) into ``com.microsoft.MatMulIntegerToFloat``. Per-token form: the weight scale is
  applied before the row scale so that fusion (whose ``a_scale`` must be per tensor) cannot fire.
* ``lm_head="int8"`` (default) also quantizes the vocabulary projection (the MatMul producing
  ``logits``, named ``*lm_head*``, reading the tied embedding table, or with N equal to the
  embedding table's row count); ``"keep"`` leaves it float. Float lm_head costs ~2x its int8 time
  per decode step and, for tied exports, keeps a second float copy of the table.
* ``lm_head="only"`` quantizes the vocabulary projection alone and leaves the other MatMuls to a later pass
  (``matmul-nbits``): the q4 form for Transformers.js 3.x, whose onnxruntime has no 8-bit MatMulNBits for the
  shared table (graphkit/runtimes.py).
* ``quantize_embedding_gather=True`` stores the embedding ``Gather`` table as int8 with one
  symmetric scale per row (token): ``Gather(table_q, ids) → Cast(float) → Mul(Gather(scales, ids))``
  (the gather happens before dequantization, so no step ever dequantizes the whole table). When
  the lm_head is quantized too and its weight is the transpose of that table (tied embeddings),
  it reads the same int8 table through a ``Transpose`` (folded by onnxruntime at load), so the
  file stores the table once, in int8.

Weights with inf/NaN raise :class:`GraphkitError` naming the tensor.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphkit import tensors
from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError, PreconditionError
from passes import _quant
from passes._graph import Graph
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from graphkit.tjs_contract import LOGITS

QMAX = 127  # symmetric int8 weights use [-127, 127]

_QUANTIZER_LABEL = {"per-token": "per-token activation quantizers", "per-tensor": "DynamicQuantizeLinear",
                    "per-token-dql": "row-normalized DynamicQuantizeLinear"}

# Work on at most this many weight elements at a time (float32 temporaries).
_CHUNK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------------------------
# numpy quantization helpers (public: tests and docs use them)
# --------------------------------------------------------------------------------------------

def check_finite(w: np.ndarray, name: str) -> None:
    _quant.check_finite(w, name, "matmul-int8")


def weight_scales(w_KN: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """Symmetric int8 scales: ``max|W[:, n]| / 127`` as float32 ``[N]`` (or a 0-d scalar)."""
    w = np.asarray(w_KN)
    if per_channel:
        amax = np.abs(w).max(axis=0).astype(np.float32)
    else:
        amax = np.float32(np.abs(w).max())
    return (np.asarray(amax, np.float32) / np.float32(QMAX)).astype(np.float32)


def quantize_weight(w_KN: np.ndarray, per_channel: bool = True, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Quantize a float ``[K, N]`` weight to symmetric int8.

    Returns ``(q int8 [K, N], scale float32 [N] or 0-d)``; ``q * scale ≈ W`` with
    ``|q * scale - W| <= scale / 2`` elementwise. All-zero columns get scale 0 and q 0.
    """
    w = np.asarray(w_KN)
    if w.ndim != 2:
        raise GraphkitError(f"weight '{name}' must be 2-D [K, N], got shape {list(w.shape)}")
    check_finite(w, name)
    scale = weight_scales(w, per_channel)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), np.float32(0)).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    K, N = w.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, N))
    for r0 in range(0, K, step):  # row chunks bound the float32 temporaries
        blk = w[r0:r0 + step].astype(np.float32) * inv
        q[r0:r0 + step] = np.clip(np.rint(blk), -QMAX, QMAX).astype(np.int8)
    return q, scale


def quantize_rows(table: np.ndarray, name: str = "table") -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 of a ``[V, H]`` table: ``(q int8 [V, H], scale float32 [V])``."""
    q_t, s = quantize_weight(np.asarray(table).T, per_channel=True, name=name)
    return np.ascontiguousarray(q_t.T), s


def dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """numpy reference of ONNX ``DynamicQuantizeLinear`` (uint8, range includes 0, round-half-even)."""
    x = np.asarray(x, np.float32)
    lo = min(np.float32(0), np.float32(x.min())) if x.size else np.float32(0)
    hi = max(np.float32(0), np.float32(x.max())) if x.size else np.float32(0)
    scale = np.float32((hi - lo) / np.float32(255))
    if scale == 0:
        return np.zeros(x.shape, np.uint8), scale, np.uint8(0)
    zp = np.uint8(np.clip(np.rint(np.float32(0) - lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def per_token_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of the per-token activation quantizer: ``(q uint8, s float32 [..., 1])`` with
    ``s = max(max|x_row| / 127, 1e-30)`` and ``q = rint(x / s) + 128``."""
    x = np.asarray(x, np.float32)
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(QMAX), np.float32(1e-30)).astype(np.float32)
    return (np.rint(x / s) + 128).astype(np.uint8), s


def row_normalized_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8, np.ndarray]:
    """numpy reference of the ``per-token-dql`` quantizer: ``(q uint8, s float32, zp uint8, r float32 [..., 1])``
    with ``r = max(max|x_row|, 1e-30)`` and ``(q, s, zp) = DynamicQuantizeLinear(x / r)``; ``x ≈ (q - zp) * s * r``."""
    x = np.asarray(x, np.float32)
    r = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-30)).astype(np.float32)
    q, s, zp = dynamic_quantize_linear(x / r)
    return q, s, zp, r


def int8_error_bound(x: np.ndarray, w_KN: np.ndarray, per_channel: bool = True,
                     activations: str = "per-tensor") -> np.ndarray:
    """Worst-case ``|y - x @ W|`` of the emitted pattern, elementwise over ``x @ W``'s shape.

    ``sum_k |x_k| * s_w[n] / 2 + |W_kn| * s_x / 2 + s_x * s_w[n] / 4`` with ``s_w`` the weight
    scale and ``s_x`` the activation step: the DynamicQuantizeLinear scale of the whole tensor
    (``per-tensor``), ``max|x_row| / 127`` of each row (``per-token``), or the DynamicQuantizeLinear scale of
    the row-normalized tensor times ``max|x_row|`` (``per-token-dql``: at most ``2 max|x_row| / 255``).
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(w_KN, np.float64)
    s_w = weight_scales(w_KN, per_channel).astype(np.float64)
    if activations == "per-token":
        s_x = np.abs(x).max(axis=-1, keepdims=True) / QMAX
    elif activations == "per-token-dql":
        _, s, _, r = row_normalized_quantize(x)
        s_x = float(s) * r.astype(np.float64)
    else:
        s_x = float(dynamic_quantize_linear(x)[1])
    K = w.shape[0]
    return (np.abs(x) @ np.ones_like(w)) * s_w / 2 + s_x / 2 * np.abs(w).sum(axis=0) + K * s_x * s_w / 4


# --------------------------------------------------------------------------------------------
# graph helpers
# --------------------------------------------------------------------------------------------

@dataclass
class _Weight:
    tensor: TensorProto        # the data, read only when quantized (one weight in memory at a time)
    source: str                # name of the initializer / Constant output holding the data
    via_transpose: str | None  # name of the Transpose node's output (if B = Transpose(source))
    transpose_node: onnx.NodeProto | None

    @property
    def shape(self) -> tuple[int, int]:
        """[K, N] as MatMul's B."""
        d = tuple(self.tensor.dims)
        return d[::-1] if self.via_transpose is not None else d

    def load(self) -> np.ndarray:
        arr = tensors.array(self.tensor)
        return arr.T if self.via_transpose is not None else arr


@dataclass
class _Site:
    node: onnx.NodeProto
    weight: _Weight
    is_lm_head: bool


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


class MatMulInt8Pass(GraphPass):
    name = "matmul-int8"
    tolerance = Tolerance("top1", 0.95, "the fp32 graph",
                          "and mean KL < 0.01 nats end to end with the defaults (docs/q8.md); each rewritten MatMul "
                          "y = x @ W obeys |y - x@W| <= sum_k |x_k|*s_w[n]/2 + |W_kn|*s_x/2 + s_x*s_w[n]/4, with "
                          "s_w[n] = max|W[:,n]|/127 (max|W|/127 if per_channel=false) and s_x = max|x_row|/127 per "
                          "token (activations=per-token), the DynamicQuantizeLinear scale (max(x,0)-min(x,0))/255 of "
                          "the whole tensor (per-tensor) or that scale of x/max|x_row| times max|x_row| (per-token-dql); embedding rows (quantize_embedding_gather) within max|row|/254")
    mutates_input = False

    @dataclass
    class Options:
        per_channel: bool = option(True, "one int8 weight scale per output column (max|W[:,n]|/127); false: one per tensor")
        include: list[str] = option([], "only MatMul nodes whose name matches one of these globs (empty: all)")
        exclude: list[str] = option([], "skip MatMul nodes whose name matches one of these globs")
        lm_head: Literal["keep", "int8", "only"] = option("int8", "the vocabulary projection (the MatMul producing `logits`, or reading the tied embedding table): quantize to int8, keep float, or quantize only it (the body is left to another pass: q4 for Transformers.js 3.x)")
        quantize_embedding_gather: bool = option(False, "store the embedding Gather table as int8 with one scale per row (token)")
        activations: Literal["per-token", "per-token-dql", "per-tensor"] = option("per-token", "activation scale: one symmetric scale per token (row), robust to massive activations; per-token-dql: rows divided by their max|x| then one DynamicQuantizeLinear (per-token accuracy in the form ORT fuses into DynamicQuantizeMatMul); or per-tensor DynamicQuantizeLinear (the standard q8 form, fused by ORT)")
        fold_bias: bool = option(True, "put a following constant bias Add in the form onnxruntime fuses into MatMulIntegerToFloat")

    def validate_options(self) -> None:
        if self.options.activations not in ("per-tensor", "per-token", "per-token-dql"):
            raise GraphkitError("matmul-int8: activations must be 'per-token', 'per-token-dql' or 'per-tensor', "
                                f"got {self.options.activations!r}")
        if self.options.lm_head not in ("keep", "int8", "only"):
            raise GraphkitError(f"matmul-int8: lm_head must be 'keep', 'int8' or 'only', got {self.options.lm_head!r}")
        for key in ("include", "exclude"):
            val = getattr(self.options, key)
            if isinstance(val, str):
                setattr(self.options, key, [p for p in val.split("|") if p])

    # ---------------------------------------------------------------- discovery
    def _constants(self, model: onnx.ModelProto):
        G = Graph(model, with_info=False)
        inits = {name: t for name, t in G.inits.items() if not G.is_overridable(name)}
        consts = {}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        consts[n.output[0]] = a.t
        return inits, consts, G

    def _weight_of(self, name: str, inits, consts, G: Graph, load: bool) -> _Weight | None:
        def tensor(nm):
            return inits.get(nm) if nm in inits else consts.get(nm)

        t = tensor(name)
        if t is not None:
            if t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
                return None
            return _Weight(t, name, None, None)
        node = G.producer(name)
        if node is not None and node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            src = tensor(node.input[0])
            if src is not None and src.data_type == TensorProto.FLOAT and len(src.dims) == 2 and perm in ([], [[1, 0]]):
                return _Weight(src, node.input[0], name, node)
        return None

    def _graph_outputs(self, model):
        return {o.name for o in model.graph.output}

    def _sites(self, model: onnx.ModelProto, load: bool = False) -> tuple[list[_Site], list[str]]:
        inits, consts, G = self._constants(model)
        tables = {n.input[0]: inits[n.input[0]] for n in self._embedding_gathers(model, honour_exclude=False)}
        vocab_sizes = {t.dims[0] for t in tables.values()}
        sites, skipped = [], []
        opt = self.options
        for n in model.graph.node:
            if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
                continue
            w = self._weight_of(n.input[1], inits, consts, G, load)
            if w is None:
                continue
            src = inits[w.source] if w.source in inits else consts[w.source]
            n_out = src.dims[1] if w.via_transpose is None else src.dims[0]  # N of MatMul's [K, N] B
            # the vocabulary projection: produces the `logits` output, is named so, reads the (tied)
            # embedding table, or projects onto exactly the embedding table's row count
            is_lm_head = (n.output[0] == LOGITS or "lm_head" in n.name or w.source in tables or n_out in vocab_sizes)
            if opt.include and not _matches(n.name, opt.include):
                skipped.append(f"{n.name}: not included")
                continue
            if opt.exclude and _matches(n.name, opt.exclude):
                skipped.append(f"{n.name}: excluded")
                continue
            if is_lm_head and opt.lm_head == "keep":
                skipped.append(f"{n.name}: lm_head kept float")
                continue
            if not is_lm_head and opt.lm_head == "only":
                skipped.append(f"{n.name}: not the lm_head (lm_head=only)")
                continue
            sites.append(_Site(n, w, is_lm_head))
        return sites, skipped

    def _embedding_gathers(self, model: onnx.ModelProto, honour_exclude: bool = True) -> list[onnx.NodeProto]:
        G = Graph(model, with_info=False)
        found = []
        for n in model.graph.node:
            if n.op_type != "Gather" or n.domain not in ("", "ai.onnx"):
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            t = G.initializer(n.input[0])
            if t is None or axis != 0 or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
                continue
            if t.dims[1] < 2:  # a quantized table's per-row scales [V, 1] (this pass's own output), not an embedding
                continue
            if n.input[1] in G.inits:  # constant indices: not an embedding lookup
                continue
            if honour_exclude and self.options.exclude and _matches(n.name, self.options.exclude):
                continue
            found.append(n)
        return found

    # ---------------------------------------------------------------- weight quantizers (hooks)
    def _quantize_weight(self, w_KN: np.ndarray, per_channel: bool, name: str, q_name: str) -> tuple[np.ndarray, np.ndarray]:
        """int8 weight and scale for MatMul B; ``q_name`` is the initializer it will be stored as
        (passes/matmul_w4.py overrides this to start from 4-bit values)."""
        return quantize_weight(w_KN, per_channel, name=name)

    def _quantize_rows(self, table: np.ndarray, name: str, q_name: str) -> tuple[np.ndarray, np.ndarray]:
        """int8 embedding table and row scales; see :meth:`_quantize_weight`."""
        return quantize_rows(table, name)

    # ---------------------------------------------------------------- contract
    def requires(self, model: onnx.ModelProto) -> None:
        sites, skipped = self._sites(model)
        gathers = self._embedding_gathers(model) if self.options.quantize_embedding_gather else []
        if not sites and not gathers:
            why = f" ({'; '.join(skipped[:5])})" if skipped else ""
            raise PassNotApplicable(f"no MatMul with a constant float32 2-D weight to quantize{why}")
        if sites and _default_opset(model) < 11:
            raise PreconditionError(
                f"matmul-int8 needs default-domain opset >= 11 (DynamicQuantizeLinear); the graph has "
                f"opset {_default_opset(model)}. Re-export with a newer opset")

    def call(self, model: onnx.ModelProto) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        opt = self.options
        G = Graph(out, with_info=False)
        fresh = lambda base: G.fresh_name(base or "q8")  # noqa: E731
        sites, skipped = self._sites(out, load=True)
        inits = {i.name: i for i in g.initializer}
        new_inits: list[TensorProto] = []
        # int8 tables of quantized embedding Gathers: table name -> (q name, row-scale name, scale [V], float table tensor)
        table_q: dict[str, tuple[str, str, np.ndarray, TensorProto]] = {}
        candidates: set[str] = set()  # initializers that may become unused
        gather_replacements: dict[int, list[onnx.NodeProto]] = {}
        stats = {"matmuls": 0, "gathers": 0, "shared_dql": 0, "bias_fusable": 0, "tied_lm_head_shared": 0}

        # ---- embedding gathers (per-row int8)
        if opt.quantize_embedding_gather:
            for gn in self._embedding_gathers(out):
                tname = gn.input[0]
                if tname not in table_q:
                    arr = tensors.array(inits[tname])
                    qn = fresh(tname + "_int8")
                    sn = fresh(tname + "_row_scale")
                    q, s = self._quantize_rows(arr, tname, qn)
                    new_inits += [tensors.new_tensor(q, qn), tensors.new_tensor(s.reshape(-1, 1), sn)]
                    table_q[tname] = (qn, sn, s, inits[tname])
                    del arr
                    candidates.add(tname)
                qn, sn = table_q[tname][:2]
                base = gn.name or "embedding"
                rows = fresh(base + "_rows_int8")
                rscale = fresh(base + "_rows_scale")
                rf = fresh(base + "_rows_float")
                nodes = [
                    helper.make_node("Gather", [qn, gn.input[1]], [rows], fresh(base + "_q"), axis=0),
                    helper.make_node("Gather", [sn, gn.input[1]], [rscale], fresh(base + "_scale"), axis=0),
                    helper.make_node("Cast", [rows], [rf], fresh(base + "_cast"), to=TensorProto.FLOAT),
                    helper.make_node("Mul", [rf, rscale], [gn.output[0]], fresh(base + "_dequant")),
                ]
                gather_replacements[id(gn)] = nodes
                stats["gathers"] += 1

        # ---- MatMuls
        by_act = defaultdict(list)
        for s in sites:
            by_act[s.node.input[0]].append(s)
        dql_for: dict[str, tuple[str, str, str]] = {}
        dql_node_at: dict[int, list[onnx.NodeProto]] = {}  # id(first MatMul) -> activation-quantize nodes
        per_token = opt.activations == "per-token"
        row_normalized = opt.activations == "per-token-dql"
        row_scale_for: dict[str, str] = {}
        zp_name = fresh("q8_weight_zero_point")
        if sites:
            new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zp_name))
        if sites and (per_token or row_normalized):  # both start from each row's max|x|
            if per_token:  # names and order as before per-token-dql existed: the q8 files' bytes stay the same
                c127, ctiny, a_zp = fresh("q8_127"), fresh("q8_tiny_scale"), fresh("q8_act_zero_point")
                c128 = fresh("q8_128")
            else:
                ctiny = fresh("q8_tiny_scale")
            tiny = numpy_helper.from_array(np.array(1e-30, np.float32), ctiny)
            new_inits += ([numpy_helper.from_array(np.array(QMAX, np.float32), c127), tiny,
                           numpy_helper.from_array(np.array(128, np.float32), c128),
                           numpy_helper.from_array(np.array(128, np.uint8), a_zp)] if per_token else [tiny])
            opset = _default_opset(out)
            if opset >= 18:
                c_axes = fresh("q8_last_axis")
                new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), c_axes))

        def row_absmax(act: str, t: dict[str, str]) -> list[onnx.NodeProto]:
            """``t["absmax"] = ReduceMax(Abs(act), axes=[-1], keepdims=1)`` in the opset's ReduceMax form."""
            reduce = (helper.make_node("ReduceMax", [t["abs"], c_axes], [t["absmax"]], fresh(act + "_ReduceMax"), keepdims=1)
                      if opset >= 18 else
                      helper.make_node("ReduceMax", [t["abs"]], [t["absmax"]], fresh(act + "_ReduceMax"), keepdims=1, axes=[-1]))
            return [helper.make_node("Abs", [act], [t["abs"]], fresh(act + "_Abs")), reduce]
        replacements: dict[int, list[onnx.NodeProto]] = {}
        bias_swaps: list[onnx.NodeProto] = []
        wq_cache: dict[tuple[str, bool], tuple[str, str]] = {}

        for s in sites:
            n, w = s.node, s.weight
            act = n.input[0]
            base = n.name or n.output[0]
            if act not in dql_for:
                aq, asc = fresh(act + "_quantized"), fresh(act + "_scale")
                if per_token:
                    # symmetric per-row (token) scale max|x_row|/127, uint8 with a fixed zero point 128
                    t = {k: fresh(f"{act}_{k}") for k in ("abs", "absmax", "scale0", "div", "round", "shift")}
                    nodes_q = row_absmax(act, t) + [
                        helper.make_node("Div", [t["absmax"], c127], [t["scale0"]], fresh(act + "_scale_div")),
                        helper.make_node("Max", [t["scale0"], ctiny], [asc], fresh(act + "_scale_floor")),
                        helper.make_node("Div", [act, asc], [t["div"]], fresh(act + "_Div")),
                        helper.make_node("Round", [t["div"]], [t["round"]], fresh(act + "_Round")),
                        helper.make_node("Add", [t["round"], c128], [t["shift"]], fresh(act + "_shift")),
                        helper.make_node("Cast", [t["shift"]], [aq], fresh(act + "_to_uint8"), to=TensorProto.UINT8),
                    ]
                    azp = a_zp
                elif row_normalized:
                    # each row divided by its max|x|, so one DynamicQuantizeLinear scale serves every token
                    # (about 2/255 of each row's range, as per-token's 1/127) in the form ORT fuses
                    t = {k: fresh(f"{act}_{k}") for k in ("abs", "absmax", "row_scale", "normalized")}
                    azp = fresh(act + "_zero_point")
                    nodes_q = row_absmax(act, t) + [
                        helper.make_node("Max", [t["absmax"], ctiny], [t["row_scale"]], fresh(act + "_row_scale")),
                        helper.make_node("Div", [act, t["row_scale"]], [t["normalized"]], fresh(act + "_normalize")),
                        helper.make_node("DynamicQuantizeLinear", [t["normalized"]], [aq, asc, azp],
                                         fresh(act + "_DynamicQuantizeLinear")),
                    ]
                    row_scale_for[act] = t["row_scale"]
                else:
                    azp = fresh(act + "_zero_point")
                    nodes_q = [helper.make_node("DynamicQuantizeLinear", [act], [aq, asc, azp],
                                                fresh(act + "_DynamicQuantizeLinear"))]
                dql_for[act] = (aq, asc, azp)
                dql_node_at[id(n)] = nodes_q
                if len(by_act[act]) > 1:
                    stats["shared_dql"] += 1
            aq, asc, azp = dql_for[act]
            pre: list[onnx.NodeProto] = []
            # weight
            candidates.add(w.source)
            tied_to = None
            if s.is_lm_head and opt.per_channel:
                if w.via_transpose is not None and w.source in table_q:
                    tied_to = w.source
                else:  # a separate copy of the table (torchscript exports duplicate the tied weight)
                    tied_to = next((t for t, v in table_q.items()
                                    if tuple(v[3].dims) == w.shape[::-1] and np.array_equal(tensors.array(v[3]).T, w.load())), None)
            if tied_to is not None:
                qn, _, row_scale, _ = table_q[tied_to]
                key = (tied_to + "#T", True)
                if key not in wq_cache:
                    tq = fresh(qn + "_T")
                    pre.append(helper.make_node("Transpose", [qn], [tq], fresh(qn + "_Transpose"), perm=[1, 0]))
                    sn = fresh(tied_to + "_col_scale")
                    new_inits.append(tensors.new_tensor(row_scale.astype(np.float32), sn))
                    wq_cache[key] = (tq, sn)
                stats["tied_lm_head_shared"] += 1
            else:
                key = (w.source + ("#T" if w.via_transpose else ""), opt.per_channel)
                if key not in wq_cache:
                    label = w.source if not w.via_transpose else w.source + "_T"
                    qn = fresh(label + "_int8")
                    sn = fresh(label + "_scale")
                    q, scale = self._quantize_weight(w.load(), opt.per_channel, w.source, qn)
                    new_inits += [tensors.new_tensor(q, qn), tensors.new_tensor(scale, sn)]
                    wq_cache[key] = (qn, sn)
            wqn, wsn = wq_cache[key]
            mmi = fresh(base + "_MatMulInteger_output")
            castn = fresh(base + "_cast_output")
            scl = fresh(base + "_scales")
            nodes = pre + [
                helper.make_node("MatMulInteger", [aq, wqn, azp, zp_name], [mmi], fresh(base + "_quant")),
                helper.make_node("Cast", [mmi], [castn], fresh(base + "_cast"), to=TensorProto.FLOAT),
            ]
            if per_token:
                # weight scale first, then the [.., 1] row scale: this order keeps ORT from fusing the
                # chain into MatMulIntegerToFloat, whose a_scale must be a scalar (or per column of A)
                nodes += [
                    helper.make_node("Mul", [castn, wsn], [scl], fresh(base + "_weight_scale_mul")),
                    helper.make_node("Mul", [scl, asc], [n.output[0]], fresh(base + "_token_scale_mul")),
                ]
            elif row_normalized:
                unrow = fresh(base + "_normalized_output")
                nodes += [
                    helper.make_node("Mul", [asc, wsn], [scl], fresh(base + "_scales_mul")),
                    helper.make_node("Mul", [castn, scl], [unrow], fresh(base + "_output_scale_mul")),
                    helper.make_node("Mul", [unrow, row_scale_for[act]], [n.output[0]], fresh(base + "_row_scale_mul")),
                ]
            else:
                nodes += [
                    helper.make_node("Mul", [asc, wsn], [scl], fresh(base + "_scales_mul")),
                    helper.make_node("Mul", [castn, scl], [n.output[0]], fresh(base + "_output_scale_mul")),
                ]
            replacements[id(n)] = nodes
            stats["matmuls"] += 1
            if opt.fold_bias:
                cons = G.users(n.output[0])
                if (len(cons) == 1 and cons[0].op_type == "Add" and len(cons[0].input) == 2
                        and n.output[0] not in self._graph_outputs(out)):
                    add = cons[0]
                    other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
                    t = inits.get(other)
                    if t is not None and len(t.dims) == 1 and t.dims[0] == w.shape[1] and t.dims[0] > 1:
                        stats["bias_fusable"] += 1
                        if add.input[0] != n.output[0]:
                            bias_swaps.append(add)

        # ---- rebuild the node list
        new_nodes: list[onnx.NodeProto] = []
        for n in g.node:
            if id(n) in dql_node_at:
                new_nodes.extend(dql_node_at[id(n)])
            if id(n) in replacements:
                new_nodes.extend(replacements[id(n)])
            elif id(n) in gather_replacements:
                new_nodes.extend(gather_replacements[id(n)])
            else:
                new_nodes.append(n)
        for add in bias_swaps:  # Add is commutative; ORT's fusion wants the bias second
            a, b = add.input[0], add.input[1]
            add.input[0], add.input[1] = b, a
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(new_inits)
        removed = _remove_dead(out, candidates)

        total = sum(1 for n in g.node if n.op_type == "MatMulInteger")
        summary = (f"{stats['matmuls']} MatMul -> MatMulInteger (int8 {'per-channel' if opt.per_channel else 'per-tensor'} "
                   f"weights, {len(dql_for)} {_QUANTIZER_LABEL[opt.activations]}, "
                   f"{stats['shared_dql']} shared)"
                   + (f", {stats['gathers']} embedding Gather int8 per-row" if stats["gathers"] else "")
                   + (", lm_head reads the int8 embedding table" if stats["tied_lm_head_shared"] else ""))
        details = dict(stats, activation_quantizers=len(dql_for), matmul_integer=total, skipped=skipped,
                       removed_initializers=removed, per_channel=opt.per_channel, lm_head=opt.lm_head,
                       activations=opt.activations)
        return PassResult(out, bool(stats["matmuls"] or stats["gathers"]), summary, details)

    def ensures(self, model: onnx.ModelProto) -> None:
        g = model.graph
        inits = {i.name: i for i in g.initializer}
        available = set(inits) | {i.name for i in g.input} | {""}
        for n in g.node:
            if n.op_type == "Constant":
                available.update(n.output)
        producers = set()
        for n in g.node:
            for i in n.input:
                if i not in available and i not in producers:
                    raise PostconditionError(f"matmul-int8 produced node '{n.name}' whose input '{i}' is not computed before it")
            producers.update(n.output)
        for n in g.node:
            if n.op_type == "MatMulInteger" and n.input[1] in inits:
                if inits[n.input[1]].data_type != TensorProto.INT8:
                    raise PostconditionError(f"MatMulInteger '{n.name}' has a non-int8 weight")
        for o in g.output:
            if o.name not in producers and o.name not in available:
                raise PostconditionError(f"graph output '{o.name}' is no longer produced")


def _remove_dead(model: onnx.ModelProto, candidates: set[str]) -> int:
    """Drop Transpose/Constant nodes nothing reads any more, and the ``candidates`` initializers
    (float weights this pass replaced) that became unused. Returns how many initializers went."""
    g = model.graph
    outs = {o.name for o in g.output}
    changed = True
    while changed:
        changed = False
        used = {i for n in g.node for i in n.input} | outs
        keep = [n for n in g.node if not (n.op_type in ("Transpose", "Constant") and not any(o in used for o in n.output))]
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
            changed = True
    used = {i for n in g.node for i in n.input} | outs
    for n in g.node:  # subgraphs may reference outer initializers
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used.update(i for sn in a.g.node for i in sn.input)
    dead = [t for t in g.initializer if t.name not in used and t.name in candidates]
    for t in dead:
        g.initializer.remove(t)
    return len(dead)
