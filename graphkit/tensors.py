"""Initializer data access that works whether a tensor's bytes are in memory or still on disk.

A model loaded *lazily* (``modelio.load_model(path, load_external="lazy")``) keeps every external
tensor as a reference: its ``location`` is made absolute so the tensor can be read on its own, at
any time, without the model's folder. Passes read weights with :func:`array`, one tensor at a
time, so converting a model never needs all of its weights in memory at once; tensors a pass does
not touch are copied from file to file by ``modelio.save_model`` without being decoded.

Never use ``onnx.numpy_helper.to_array`` on an initializer in a pass: it loads external data *into*
the proto (keeping it in memory for good) and reads relative locations from the working folder.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from graphkit.errors import GraphkitError

_RAW_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
               TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
               TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32, TensorProto.INT64: np.int64,
               TensorProto.UINT32: np.uint32, TensorProto.UINT64: np.uint64, TensorProto.BOOL: np.bool_}


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def nbytes(t: TensorProto) -> int:
    """Bytes of the tensor's data, without reading it."""
    if is_external(t):
        info = external_info(t)
        if "length" in info:
            return int(info["length"])
        return _shape_nbytes(t)
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return _shape_nbytes(t)


def _shape_nbytes(t: TensorProto) -> int:
    return expected_nbytes(t) or 0


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto in the model: initializers, Constant attributes, subgraphs."""
    def walk(graph: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)
    yield from walk(model.graph)


# Sub-byte element types stored packed: elements per byte. Other sub-byte types (float6) have no
# fixed byte size we check.
_PACKED = {getattr(TensorProto, n): per for n, per in (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2),
                                                       ("INT2", 4), ("UINT2", 4)) if hasattr(TensorProto, n)}
_UNSIZED = {TensorProto.UNDEFINED, TensorProto.STRING} | {
    getattr(TensorProto, n) for n in ("FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, n)}


def expected_nbytes(tensor: TensorProto) -> int | None:
    if tensor.data_type in _UNSIZED:
        return None
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_type in _PACKED:
        per = _PACKED[tensor.data_type]
        return (count + per - 1) // per
    return count * np.dtype(np_dtype).itemsize


def restore_external(t: TensorProto, entries: list) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for e in entries:
        new = t.external_data.add()
        new.key, new.value = e.key, e.value


def clear_typed_data(t: TensorProto) -> None:
    for fld in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(fld)


def set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    clear_typed_data(tensor)
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def read_bytes(t: TensorProto) -> bytes:
    """The tensor's raw little-endian bytes (read from disk for a lazy external tensor)."""
    if is_external(t):
        path, offset, length = external_span(t)
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise GraphkitError(f"{path}: external data for '{t.name}' is truncated (wanted {length} bytes at {offset})")
        return data
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def array(t: TensorProto) -> np.ndarray:
    """The tensor as a numpy array. Lazy external tensors are read from their file (the proto is not
    changed); in-memory raw data is returned without a copy (read-only)."""
    if is_external(t):
        dtype = _RAW_DTYPES.get(t.data_type)
        if dtype is None:
            loaded = TensorProto()
            loaded.CopyFrom(t)
            del loaded.external_data[:]
            loaded.data_location = TensorProto.DEFAULT
            loaded.raw_data = read_bytes(t)
            return numpy_helper.to_array(loaded)
        path, offset, length = external_span(t)
        count = length // np.dtype(dtype).itemsize
        arr = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if arr.size != count:
            raise GraphkitError(f"{path}: external data for '{t.name}' is truncated (wanted {length} bytes at {offset})")
        return arr.reshape(tuple(t.dims))
    dtype = _RAW_DTYPES.get(t.data_type)
    if dtype is not None and t.HasField("raw_data"):
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def external_span(t: TensorProto) -> tuple[str, int, int]:
    info = external_info(t)
    location = info.get("location", "")
    if not os.path.isabs(location):
        raise GraphkitError(f"tensor '{t.name}' refers to external data {location!r} relative to an unknown folder; "
                            "load the model with graphkit.modelio.load_model")
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else _shape_nbytes(t)
    return location, offset, length


def make_lazy(model: onnx.ModelProto, base_dir: Path) -> None:
    """Make every external location absolute so tensors can be read without knowing the folder."""
    base = Path(base_dir).resolve()
    for t in iter_tensors(model):
        if is_external(t):
            for e in t.external_data:
                if e.key == "location" and not os.path.isabs(e.value):
                    e.value = str(base / e.value)


# --- spilling new tensors to disk --------------------------------------------------------------------
# A pass that makes a new large tensor (fp16 weights, quantized blocks) calls `new_tensor`. Inside
# `spill_to(folder)` the bytes go straight to a scratch file and the proto only refers to them, so a
# pipeline's output never accumulates in memory (convert and apply use it); outside, the tensor is an
# ordinary in-memory one.
SPILL_MIN_BYTES = 1 << 20
_spill_stack: list["_SpillFile"] = []


class _SpillFile:
    def __init__(self, folder: Path, label: str) -> None:
        import tempfile
        self.label = label
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="spill-", suffix=".bin", dir=folder)
        except OSError as exc:
            raise GraphkitError(f"cannot create scratch space in {folder}: {exc.strerror or exc}") from None
        self.path = Path(name).resolve()
        self.fh = os.fdopen(fd, "wb")
        self.offset = 0

    def write(self, arr: np.ndarray) -> tuple[int, int]:
        pad = (-self.offset) % 64
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        view = memoryview(np.ascontiguousarray(arr)).cast("B")
        start = self.offset
        try:
            self.fh.write(view)
            self.fh.flush()  # readers open the file by name
        except OSError as exc:
            raise GraphkitError(f"{self.label}: staging new weights in {self.path.parent} failed: {exc.strerror or exc}; "
                                "free some disk space there (they are staged beside the output); nothing was left at the output path") from None
        self.offset += len(view)
        return start, len(view)

    def close(self) -> None:
        self.fh.close()


class spill_to:
    """Context manager: large tensors made by passes go to a scratch file in ``folder`` (removed by
    the caller with the folder, after the model has been saved)."""

    def __init__(self, folder: str | os.PathLike, label: str = "writing the model") -> None:
        self.folder = Path(folder)
        self.label = label

    def __enter__(self) -> "spill_to":
        self.file = _SpillFile(self.folder, self.label)
        _spill_stack.append(self.file)
        return self

    def __exit__(self, *exc) -> None:
        _spill_stack.remove(self.file)
        self.file.close()


def new_tensor(arr: np.ndarray, name: str) -> TensorProto:
    """A TensorProto holding ``arr``: spilled to disk as a lazy external tensor inside ``spill_to``
    (when at least SPILL_MIN_BYTES), in memory otherwise."""
    arr = np.asarray(arr)
    if not _spill_stack or arr.nbytes < SPILL_MIN_BYTES or arr.dtype not in _NP_TO_ONNX:
        return numpy_helper.from_array(arr, name)
    spill = _spill_stack[-1]
    offset, length = spill.write(arr)
    t = TensorProto(name=name, data_type=_NP_TO_ONNX[arr.dtype], dims=list(arr.shape))
    set_external(t, str(spill.path), offset, length)
    return t


_NP_TO_ONNX = {np.dtype(v): k for k, v in _RAW_DTYPES.items()}
