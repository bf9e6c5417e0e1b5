"""matmul-w4: a 4-bit download that runs as int8 (``MatMulInteger``) in onnxruntime-web's wasm backend.

Why not ``MatMulNBits`` (the q4 file): onnxruntime's fast 4-bit GEMM has no wasm build, so in the browser
``MatMulNBits`` dequantizes its weight on every call (Qwen2.5-0.5B shape, Chromium wasm: q4 1,564 ms/token,
q8 80 ms/token). Why not a graph that unpacks the 4-bit weight with standard ops for onnxruntime to fold at
session creation: it folds, but its constant folding keeps every intermediate tensor of every weight until
the pass ends (``Graph::Resolve`` drops them; measured 31 bytes per parameter of peak memory at creation,
onnxruntime 1.32 and onnxruntime-web 1.31-dev alike, docs/w4.md), ~15 GB for 0.5B against wasm32's 4 GB.

So the file carries the int8 graph of ``matmul-int8`` (per-token activations, int8 weights per output
column, int8 embedding table per row shared with the tied lm_head: decode runs exactly as fast as the q8
file) and the **download** carries its weights at 4 bits: ``model_w4.onnx`` names its int8 weights as
external data in ``model_w4.onnx_data``, which is never shipped; ``model_w4.w4bin`` holds the 4-bit codes,
block scales and zero points, and a ~100-line client step (``graphkit/js/w4.mjs``, copied into the folder)
expands them into that data once, before the session is created: in the browser handed to Transformers.js
as ``session_options.externalData`` (memory: the int8 bytes, the same as the q8 file's), in Node written
beside the file (:func:`materialize`).

The numbers: each weight (MatMul B ``[K, N]``; the embedding table as ``table.T`` ``[H, V]``, i.e. blocks
along the hidden axis of each token's row) is quantized to 4 bits by :func:`passes._quant.quantize_blockwise`
(``block_size``, ``symmetric``; with ``scales=float16``, the default, from the weight's float16 value, as the
q4f16 file does, so the download stores float16 block scales), dequantized to ``W4`` in float32
(``(q - zp) * float32(scale)``), then requantized to int8 per column by :func:`passes.matmul_int8.quantize_weight`
(``s8 = max|W4[:, n]| / 127``, ``q8 = clip(rint(W4 * (1 / s8)), -127, 127)``). The expansion recomputes
exactly these float32 operations (JavaScript: products of float32 values are exact in double, then
``Math.fround``; ties to even), so its bytes equal the int8 weights of the graph this pass returns
(tested byte for byte).

Tolerance: per weight element ``|q8 * s8 - W| <= |W4 - W| + s8 / 2`` with ``|W4 - W|`` the 4-bit bound of
passes/_quant.py (half a block step; with float16 scales plus ``|W - float16(W)|`` and the float16 rounding of
the scale, at most ``15 * 2^-11`` steps) and ``s8 / 2 = max|W4[:, n]| / 254`` the int8 step of the q8 file
(whose own bound is ``max|W[:, n]| / 254``); activations are quantized exactly as in the q8 file.
End to end: the 4-bit error plus at most the q8's own.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from graphkit import tensors
from graphkit.errors import GraphkitError
from graphkit.passbase import PassResult, Tolerance, option
from passes import _quant
from passes.matmul_int8 import MatMulInt8Pass, quantize_weight

META_KEY = "graphkit.w4"      # metadata_props entry listing the weights stored at 4 bits
PART_SEP = "::w4_"            # initializers carrying the 4-bit parts until save_w4 moves them to the blob
MAGIC = b"GKW4"
VERSION = 1
ALIGN = 64


CHUNK_BYTES = 64 * 2**20  # float32 bytes of weight columns quantized at a time


@dataclass
class MatMulW4Options(MatMulInt8Pass.Options):
    quantize_embedding_gather: bool = option(True, "store the embedding Gather table (and the tied lm_head that reads it) at 4 bits too")
    block_size: int = option(32, "4-bit block along K (the hidden axis for the embedding table): a power of two, 16..256")
    symmetric: bool = option(False, "4-bit blocks: false = min/max with zero points (passes/_quant.py), true = signed scale")
    scales: Literal["float16", "float32"] = option("float16", "block scales in the download: float16 (the weight is "
                                                              "quantized from its float16 value, as q4f16 does) or float32")


class MatMulW4Pass(MatMulInt8Pass):
    name = "matmul-w4"
    Options = MatMulW4Options
    tolerance = Tolerance("top1", 0.90, "the fp32 graph",
                          "4-bit weights run as int8: per weight element |q8*s8 - W| <= |W4 - W| + s8/2, |W4 - W| <= "
                          "half a 4-bit block step (passes/_quant.py; scales=float16: + |W - float16(W)| + 15*2^-11 "
                          "steps), s8 = max|W4[:,n]|/127 (the q8 file's int8 step); activations as matmul-int8 "
                          "(per-token). The expanded int8 bytes equal the graph's")

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        if o.scales not in ("float16", "float32"):
            raise GraphkitError(f"matmul-w4: scales must be float16 or float32, got {o.scales!r}")
        bs = o.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or not 16 <= bs <= 256 or bs & (bs - 1):
            raise GraphkitError(f"matmul-w4: block_size must be a power of two from 16 to 256, got {bs!r}")
        if not o.per_channel:
            raise GraphkitError("matmul-w4: per_channel=false is not supported (the int8 form is per output column)")

    # ---------------------------------------------------------------- 4-bit first, then matmul-int8's int8
    def _four_bit(self, w_KN: np.ndarray, name: str):
        o = self.options
        w = np.asarray(w_KN, np.float16 if o.scales == "float16" else np.float32)
        packed, scales, zp = _quant.quantize_blockwise(w, 4, o.block_size, o.symmetric, name=name)
        return dequantize(packed, scales, zp, o.block_size, w.shape[0]), (packed, scales, zp)

    def _four_bit_int8(self, w_KN: np.ndarray, name: str):
        """The 4-bit parts and the int8 weight of ``w_KN`` [K, N], ``CHUNK_BYTES`` of columns at a time: every
        block and every int8 scale belongs to one output column, so the chunks' results concatenate to exactly the
        whole weight's, while the float temporaries stay one chunk big (the 1.5B tied table whole: ~5 GB of them)."""
        K, N = w_KN.shape
        step = max(1, CHUNK_BYTES // (4 * K))
        qs, ss, parts = [], [], []
        for a in range(0, N, step):
            w4, chunk_parts = self._four_bit(w_KN[:, a:a + step], name)
            q, sc = quantize_weight(w4, True, name=name)
            qs.append(q); ss.append(sc); parts.append(chunk_parts)
            del w4
        joined = tuple(None if parts[0][i] is None else np.concatenate([c[i] for c in parts], 0) for i in range(3))
        return np.concatenate(qs, 1), np.concatenate(ss, 0), joined

    def _record(self, q_name: str, kind: str, K: int, N: int, parts) -> None:
        # each part becomes its tensor at once (spilled to disk inside convert's spill_to): holding every weight's
        # 4-bit parts as arrays until the pass ends cost ~0.9 GB at the 1.5B shape
        stored = {part: tensors.new_tensor(np.ascontiguousarray(arr), q_name + PART_SEP + part)
                    for part, arr in zip(("packed", "scales", "zp"), parts) if arr is not None}
        self._w4[q_name] = {"kind": kind, "K": K, "N": N, "parts": stored}

    def _quantize_weight(self, w_KN, per_channel, name, q_name):
        q, s, parts = self._four_bit_int8(w_KN, name)
        self._record(q_name, "matmul", q.shape[0], q.shape[1], parts)
        return q, s

    def _quantize_rows(self, table, name, q_name):
        q, s, parts = self._four_bit_int8(np.asarray(table).T, name)  # [H, V]: blocks along each token's row
        self._record(q_name, "table", q.shape[0], q.shape[1], parts)
        return np.ascontiguousarray(q.T), s

    def call(self, model: onnx.ModelProto) -> PassResult:
        self._w4: dict[str, dict] = {}
        res = super().call(model)
        out = res.model
        inits = {t.name: t for t in out.graph.initializer}
        entries = []
        for q_name, rec in self._w4.items():
            if q_name not in inits:  # quantized but not used (cannot happen today; never point at nothing)
                continue
            names = {}
            for part, t in rec["parts"].items():
                out.graph.initializer.append(t)
                names[part] = t.name
            entries.append({"name": q_name, "kind": rec["kind"], "K": rec["K"], "N": rec["N"],
                            "block_size": self.options.block_size, "symmetric": self.options.symmetric,
                            "parts": names})
        _set_meta(out, {"version": VERSION, "tensors": entries})
        self._w4 = {}
        res.details["w4"] = {"weights": len(entries), "block_size": self.options.block_size,
                             "symmetric": self.options.symmetric}
        res.summary = res.summary.replace("MatMulInteger (int8", "MatMulInteger (4-bit download expanded to int8", 1)
        return res


def dequantize(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, block_size: int, K: int) -> np.ndarray:
    """W4 ``[K, N]`` float32 = ``(q - zp) * float32(scale)``, one float32 rounding (no float16 rounding of the
    product, unlike _quant.dequantize_blockwise for float16 scales): what the client step computes."""
    return _quant.dequantize_blockwise(packed, np.asarray(scales).astype(np.float32), zp, 4, block_size, K)


def _set_meta(model: onnx.ModelProto, value: dict) -> None:
    for p in model.metadata_props:
        if p.key == META_KEY:
            p.value = json.dumps(value)
            return
    model.metadata_props.add(key=META_KEY, value=json.dumps(value))


def w4_meta(model: onnx.ModelProto) -> dict | None:
    """The record :class:`MatMulW4Pass` leaves in the model (None: not a matmul-w4 result)."""
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return None


# -------------------------------------------------------------------------------------- the download format
#
# model_w4.w4bin: b"GKW4", uint32 version, uint32 header length, header (UTF-8 JSON), then sections aligned
# to 64 bytes. Header: {"data_file": "model_w4.onnx_data", "data_bytes": n, "tensors": [{"name", "kind"
# ("matmul": int8 [K, N] row-major; "table": int8 [N, K] = [V, H] row-major), "K", "N", "block_size",
# "offset" (in the data file), "packed": [off, len] (uint8 [N, kb, block/2], low nibble first),
# "scales": [off, len] ([N, kb] in "scales_dtype": float16 or float32), "zp": [off, len] or null (uint8 [N, ceil(kb/2)], packed like
# the codes; null = 8), "s8": [off, len] (float32 [N])}]}. Offsets of sections are from the start of the file.

def data_file_name(onnx_name: str) -> str:
    return onnx_name + "_data"


def blob_file_name(onnx_name: str) -> str:
    return onnx_name.removesuffix(".onnx") + ".w4bin"


def save_w4(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write ``path`` (the int8 graph, its int8 weights as external data in a file that is not written) and
    its ``.w4bin`` (the 4-bit download). Both atomically (temp names, then renamed). Returns the files."""
    path = Path(path)
    meta = w4_meta(model)
    if meta is None:
        raise GraphkitError(f"{path.name}: not a matmul-w4 result (no {META_KEY} metadata)")
    inits = {t.name: t for t in model.graph.initializer}
    virtual = {e["name"] for e in meta["tensors"]}
    parts = {pn for e in meta["tensors"] for pn in e["parts"].values()}
    data_name = data_file_name(path.name)

    # 1. the blob. Section sizes come from the tensors' metadata; each section is read (and s8 recomputed) only
    #    when it is written, so the 4-bit parts are never all in memory at once (~0.9 GB at the 1.5B shape)
    header_tensors, sections, pos_data = [], [], 0
    for e in meta["tensors"]:
        q = inits[e["name"]]
        item = {k: e[k] for k in ("name", "kind", "K", "N", "block_size")}
        item["offset"], item["length"] = pos_data, tensors.nbytes(q)
        pos_data += item["length"]
        if not e["symmetric"] and "zp" not in e["parts"]:
            raise GraphkitError(f"{e['name']}: asymmetric 4-bit weight without zero points")
        for key in ("packed", "scales", "zp", "s8"):
            if key == "s8":
                sections.append((item, key, e, 4 * int(e["N"])))  # one float32 per output column
                continue
            if key not in e["parts"]:
                item[key] = None
                continue
            t = inits[e["parts"][key]]
            if key == "scales":
                item["scales_dtype"] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).name
            elif t.data_type != TensorProto.UINT8:
                raise GraphkitError(f"{t.name}: {key} must be uint8")
            sections.append((item, key, t, tensors.nbytes(t)))
        header_tensors.append(item)
    header = {"version": VERSION, "data_file": data_name, "data_bytes": pos_data, "tensors": header_tensors}
    # offsets depend on the header length, which depends on the offsets: reserve room, then fill in
    for item, key, _, length in sections:
        item[key] = [0, length]
    head_len = len(json.dumps(header).encode()) + 16 * len(sections) + 64
    pos = _align(12 + head_len)
    for item, key, _, length in sections:
        item[key] = [pos, length]
        pos = _align(pos + length)
    head = json.dumps(header).encode()
    assert len(head) <= head_len
    head = head.ljust(head_len, b" ")
    blob_path = path.with_name(blob_file_name(path.name))
    tmp_blob = blob_path.with_name(f".{blob_path.name}.tmp-{os.getpid()}")
    with open(tmp_blob, "wb") as fh:
        fh.write(MAGIC + struct.pack("<II", VERSION, head_len) + head)
        for item, key, source, length in sections:
            if key == "s8":
                raw = _scale_for(model, source, inits).astype(np.float32).reshape(-1).tobytes()
            else:
                raw = tensors.read_bytes(source)
            if len(raw) != length:
                raise GraphkitError(f"{item['name']}: {key} is {len(raw)} bytes, its header says {length}")
            fh.seek(item[key][0])
            fh.write(raw)
        fh.truncate(pos)

    # 2. the graph: every other initializer inline (they are small: norms, biases, scales), the int8
    #    weights as external data in the file the client step writes
    out = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, f, getattr(model, f))
    out.opset_import.extend(model.opset_import)
    for p in model.metadata_props:
        if p.key != META_KEY:
            out.metadata_props.add(key=p.key, value=p.value)
    for f in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(out.graph, f).extend(getattr(model.graph, f))
    out.graph.name = model.graph.name
    for t in model.graph.initializer:
        if t.name in parts:
            continue
        nt = out.graph.initializer.add()
        if t.name in virtual:
            item = next(i for i in header_tensors if i["name"] == t.name)
            nt.name, nt.data_type = t.name, t.data_type
            nt.dims.extend(t.dims)
            nt.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(item["offset"])), ("length", str(item["length"]))):
                nt.external_data.add(key=k, value=v)
        else:
            nt.name, nt.data_type = t.name, t.data_type
            nt.dims.extend(t.dims)
            nt.raw_data = tensors.read_bytes(t)
    tmp_onnx = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp_onnx, "wb") as fh:
            fh.write(out.SerializeToString())
        os.replace(tmp_blob, blob_path)
        os.replace(tmp_onnx, path)
    finally:
        for t in (tmp_blob, tmp_onnx):
            t.unlink(missing_ok=True)
    return [path, blob_path]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _scale_for(model: onnx.ModelProto, entry: dict, inits: dict) -> np.ndarray:
    """s8 of a stored weight, recomputed from its 4-bit values exactly as the pass did."""
    e = entry
    packed = tensors.array(inits[e["parts"]["packed"]])
    scales = tensors.array(inits[e["parts"]["scales"]])
    zp = tensors.array(inits[e["parts"]["zp"]]) if "zp" in e["parts"] else None
    return quantize_weight_scale(dequantize(packed, scales, zp, e["block_size"], e["K"]))


def quantize_weight_scale(w4: np.ndarray) -> np.ndarray:
    from passes.matmul_int8 import weight_scales
    return weight_scales(w4, True)


# -------------------------------------------------------------------------------------- the expansion
def read_blob(blob: bytes) -> dict:
    if blob[:4] != MAGIC:
        raise GraphkitError("not a graphkit 4-bit weight file (.w4bin): bad magic")
    version, head_len = struct.unpack_from("<II", blob, 4)
    if version != VERSION:
        raise GraphkitError(f".w4bin version {version}; this graphkit reads version {VERSION}")
    return json.loads(blob[12:12 + head_len].decode())


def expand(blob: bytes) -> bytes:
    """The int8 data file from a ``.w4bin`` (the reference of graphkit/js/w4.mjs; numpy float32)."""
    header = read_blob(blob)
    out = np.zeros(header["data_bytes"], np.int8)
    view = memoryview(blob)
    for t in header["tensors"]:
        K, N, bs = t["K"], t["N"], t["block_size"]
        kb = _quant.k_blocks(K, bs)

        def sec(key, dtype, shape):
            off, length = t[key]
            return np.frombuffer(view[off:off + length], dtype=dtype).reshape(shape)
        packed = sec("packed", np.uint8, (N, kb, bs // 2))
        scales = sec("scales", np.dtype(t.get("scales_dtype", "float32")), (N, kb))
        zp = sec("zp", np.uint8, (N, -(-kb // 2))) if t.get("zp") else None
        s8 = sec("s8", np.float32, (N,))
        w4 = dequantize(packed, scales, zp, bs, K)  # [K, N]
        with np.errstate(divide="ignore"):
            inv = np.where(s8 > 0, np.float32(1) / np.where(s8 > 0, s8, 1), np.float32(0)).astype(np.float32)
        q = np.clip(np.rint(w4 * inv), -127, 127).astype(np.int8)
        if t["kind"] == "table":
            q = q.T
        out[t["offset"]:t["offset"] + t["length"]] = np.ascontiguousarray(q).reshape(-1)
    return out.tobytes()


def materialize(onnx_path: str | os.PathLike) -> Path:
    """Write the int8 data file beside ``onnx_path`` from its ``.w4bin`` (what Node / Python onnxruntime
    read from disk; the browser gets the same bytes from graphkit/js/w4.mjs instead). Atomic."""
    onnx_path = Path(onnx_path)
    blob_path = onnx_path.with_name(blob_file_name(onnx_path.name))
    if not blob_path.exists():
        raise GraphkitError(f"{blob_path}: missing; the 4-bit weights of {onnx_path.name} are stored there")
    data = expand(blob_path.read_bytes())
    target = onnx_path.with_name(data_file_name(onnx_path.name))
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target
