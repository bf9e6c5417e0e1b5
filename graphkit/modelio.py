"""Loading and saving ONNX models safely.

Loading checks every external-data reference before reading it: the ``location`` must be a plain
relative name that stays inside the model's folder (no absolute path, no ``..``, no symlink out),
the file must exist, and it must be long enough for the tensor's offset and length.

Saving is atomic: everything is written into a temporary folder next to the destination and moved
into place at the end, so a failure (exception, Ctrl-C, full disk) leaves either the previous
output or nothing, never a partial ``.onnx``/``.onnx_data`` pair. Large models are written with
external data in chunks named ``<file>.onnx_data``, ``<file>.onnx_data_1``, … each under
``max_chunk_bytes`` (Transformers.js's naming), with bare file names as ``location``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from graphkit.errors import GraphkitError
from graphkit.tensors import (clear_typed_data, expected_nbytes, external_info, external_span, is_external,  # noqa: F401
                              iter_tensors, make_lazy, nbytes, read_bytes, restore_external, set_external)
from graphkit.tjs_contract import external_data_name

PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to external data when a model is saved with external data.
EXTERNAL_MIN_BYTES = 1024
DEFAULT_CHUNK_BYTES = 2_000_000_000  # < 2 GB: browsers and ORT-web read each chunk into one buffer
_ALIGN = 64


def check_external_locations(model: onnx.ModelProto, base_dir: Path, model_path: Path) -> list[str]:
    """Validate every external reference; return the data files used. Raises GraphkitError."""
    base = base_dir.resolve()
    files: dict[str, int] = {}
    for tensor in iter_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = external_info(tensor)
        loc = info.get("location", "")
        where = f"{model_path}: tensor '{tensor.name}'"
        if not loc:
            raise GraphkitError(f"{where} has external data without a location")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in Path(loc).parts:
            raise GraphkitError(
                f"{where} points outside the model folder (location {loc!r}); refusing to read it. "
                "External data must be a file beside the .onnx")
        target = (base / loc)
        try:
            resolved = target.resolve(strict=True)
        except FileNotFoundError:
            raise GraphkitError(f"{where}: external data file {loc!r} is missing next to {model_path.name}") from None
        if base not in resolved.parents and resolved != base:
            raise GraphkitError(f"{where}: external data {loc!r} is a link that leaves the model folder; refusing it")
        size = files.setdefault(loc, resolved.stat().st_size)
        offset = int(info.get("offset", 0) or 0)
        expected = expected_nbytes(tensor)
        length = int(info["length"]) if "length" in info else expected
        if expected is not None and length is not None and length != expected:
            raise GraphkitError(
                f"{where}: external data length {length} does not match its shape/dtype ({expected} bytes)")
        if length is not None and offset + length > size:
            raise GraphkitError(
                f"{where}: external data file {loc!r} is truncated ({size} bytes, tensor needs "
                f"offset {offset} + {length}); re-export or re-download it")
    return sorted(files)


def _non_utf8_string(msg, where: str = "model") -> str | None:
    """The first text (protobuf ``string``) field that is not valid UTF-8, or None.

    ONNX is proto2, so protobuf does not validate UTF-8 when parsing: a flipped byte in a node or tensor
    name comes back as ``bytes`` instead of ``str`` and breaks every later use of the name. Only
    ``string`` fields are read (``bytes`` fields such as ``raw_data`` are never touched, so nothing big
    is copied).
    """
    from google.protobuf.descriptor import FieldDescriptor
    for field in msg.DESCRIPTOR.fields:
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            values = getattr(msg, field.name) if repeated else [getattr(msg, field.name)]
            if any(not isinstance(v, str) for v in values):
                return f"{where}.{field.name}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                items = getattr(msg, field.name)
                for i, item in enumerate(items):
                    bad = _non_utf8_string(item, f"{where}.{field.name}[{i}]")
                    if bad:
                        return bad
            elif msg.HasField(field.name):
                bad = _non_utf8_string(getattr(msg, field.name), f"{where}.{field.name}")
                if bad:
                    return bad
    return None


def load_model(path: str | os.PathLike, load_external: bool | str = True) -> onnx.ModelProto:
    """Load an ONNX model, refusing unsafe or broken external data with a one-line error.

    ``load_external``: True reads external data into memory; False leaves the references as they are
    (for graph-only tools); ``"lazy"`` leaves the bytes on disk but makes every reference absolute so
    passes read each tensor on demand (``graphkit.tensors.array``) and ``save_model`` copies untouched
    tensors file to file: the memory-frugal mode ``convert`` and ``apply`` use."""
    path = Path(path)
    if not path.exists():
        raise GraphkitError(f"{path}: no such file")
    if path.is_dir():
        raise GraphkitError(f"{path} is a folder; give the path of a .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise GraphkitError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]}); "
                            "the file may be truncated or not ONNX") from None
    if not model.graph.node and not model.graph.output:
        raise GraphkitError(f"{path}: not a readable ONNX model (empty graph); the file may be truncated or not ONNX")
    bad = _non_utf8_string(model)
    if bad:
        raise GraphkitError(f"{path}: not a readable ONNX model ({bad} is not valid UTF-8 text); the file is corrupt")
    check_external_locations(model, path.parent, path)
    if load_external == "lazy":
        make_lazy(model, path.parent)
    elif load_external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise GraphkitError(f"{path}: failed to read external data ({exc})") from None
    for tensor in iter_tensors(model):
        problem = _tensor_size_problem(tensor)
        if problem:
            raise GraphkitError(f"{path}: tensor '{tensor.name}' {problem}; the file is corrupt")
    return model


# Typed-data field of each element type whose values are stored one per element.
_TYPED_FIELD = {TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data", TensorProto.INT64: "int64_data",
                TensorProto.UINT32: "uint64_data", TensorProto.UINT64: "uint64_data", TensorProto.STRING: "string_data",
                **{t: "int32_data" for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
                                             TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16,
                                             TensorProto.BFLOAT16)}}


def _tensor_size_problem(tensor: TensorProto) -> str | None:
    """Why the tensor's inline data does not fit its shape and type (None when it does, or when the
    data is external and not loaded: check_external_locations checks those lengths)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return None
    if any(d < 0 for d in tensor.dims):
        return f"has a negative dimension {list(tensor.dims)}"
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    shape = list(tensor.dims)
    if tensor.HasField("raw_data"):
        expected = expected_nbytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            return f"has {len(tensor.raw_data)} bytes of data but its shape {shape} needs {expected}"
        return None
    field = _TYPED_FIELD.get(tensor.data_type)
    if field is None:
        return None  # rare packed types: leave them to onnx / onnxruntime
    have = len(getattr(tensor, field))
    if have != count:
        return f"has {have} values but its shape {shape} needs {count}"
    return None


def model_nbytes(model: onnx.ModelProto, include_external: bool = True) -> int:
    """Serialized size estimate: proto size plus tensor bytes (works above 2 GB). With
    ``include_external`` (the default) tensors still on disk count too: the size the model has once
    saved; without, only what the in-memory proto holds."""
    total = 0
    for t in iter_tensors(model):
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        elif include_external and is_external(t):
            total += nbytes(t)
    return total + sum(len(n.SerializeToString()) for n in model.graph.node if n.op_type != "Constant")


def tensor_bytes(t: TensorProto) -> bytes:
    return read_bytes(t)


@contextlib.contextmanager
def atomic_output_dir(final_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``final_dir`` (created if needed) removed on exit."""
    final_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".graphkit-tmp-", dir=final_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
               max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Path]:
    """Save atomically; return the files written (the .onnx first, then data chunks).

    ``external_data=None`` picks external data only when the model would not fit in one protobuf.
    The in-memory model is left as it was.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise GraphkitError(f"{parent} is not a folder; cannot write {path.name} there")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphkitError(f"cannot create output folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise GraphkitError(f"{parent}: folder is not writable; choose another --output")
    if external_data is None:
        external_data = model_nbytes(model) > PROTOBUF_LIMIT - 64 * 2**20
    try:
        with atomic_output_dir(parent) as tmp:
            return move_into_place(_write(model, tmp / path.name, external_data, max_chunk_bytes), path)
    except OSError as exc:
        raise GraphkitError(f"writing {path} failed: {exc.strerror or exc}; nothing was left at the output path") from None


def move_into_place(written: list[Path], path: Path) -> list[Path]:
    """Move a finished ``.onnx`` (``written[0]``) and its data chunks (the rest) from a temporary folder on the
    same disk to ``path``, replacing an old output and its stale chunks; returns the final paths."""
    parent = path.parent
    stale = [p for p in parent.glob(path.name + "_data*") if p.is_file()]
    if len(written) == 1:
        os.replace(written[0], path)  # atomic: the old file or the new one, never half
        for old in stale:
            old.unlink()
        return [path]
    # With data files there is no single atomic rename: drop the old .onnx first so a crash
    # in between leaves no .onnx at all (never one pointing at the wrong data), move the
    # data, and move the .onnx last.
    path.unlink(missing_ok=True)
    for old in stale:
        old.unlink()
    moved: list[Path] = []
    try:
        for f in written[1:]:
            os.replace(f, parent / f.name)
            moved.append(parent / f.name)
        os.replace(written[0], path)
    except BaseException:  # incl. Ctrl-C: no data files without their .onnx
        for f in moved:
            f.unlink(missing_ok=True)
        raise
    return [path] + moved


def _write(model: onnx.ModelProto, path: Path, external: bool, max_chunk_bytes: int) -> list[Path]:
    if not external:
        _write_single_file(model, path)
        return [path]
    writer = ExternalDataWriter(path, max_chunk_bytes)
    moved: list[tuple[TensorProto, bytes | None, list]] = []
    try:
        for tensor in iter_tensors(model):
            if is_external(tensor):
                entries = list(tensor.external_data)
                location, offset, length = writer.copy_external(tensor)
                moved.append((tensor, None, entries))
                set_external(tensor, location, offset, length)
                continue
            raw = tensor_bytes(tensor)
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            location, offset, length = writer.write(raw)
            moved.append((tensor, raw, []))
            set_external(tensor, location, offset, length)
        writer.close()
        with open(path, "wb") as out:
            out.write(model.SerializeToString())
            out.flush(); os.fsync(out.fileno())
    finally:
        writer.close()
        for tensor, raw, entries in moved:  # restore the caller's in-memory model
            if raw is None:
                restore_external(tensor, entries)
                continue
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            clear_typed_data(tensor)
            tensor.raw_data = raw
    return [path] + writer.files


def _write_single_file(model: onnx.ModelProto, path: Path) -> None:
    """One protobuf file, written one initializer at a time.

    Protobuf merges repeated occurrences of an embedded message: the bytes of ``ModelProto{graph:
    G}`` followed by those of ``ModelProto{graph: {initializer: [t]}}`` parse as G with t appended.
    So the graph is written without its initializers, then each initializer as such a fragment (a
    lazy one read from disk just for its fragment): memory holds one tensor, not the whole model
    twice as ``SerializeToString`` would."""
    skeleton = _without_initializers(model)
    with open(path, "wb") as fh:
        fh.write(skeleton.SerializeToString())
        for t in model.graph.initializer:
            fragment = onnx.ModelProto()
            item = fragment.graph.initializer.add()
            if is_external(t):
                _copy_fields(t, item, skip=("external_data", "data_location", "raw_data"))
                item.raw_data = read_bytes(t)
            else:
                item.CopyFrom(t)
            fh.write(fragment.SerializeToString())
            del fragment, item
        fh.flush()
        os.fsync(fh.fileno())


class ExternalDataWriter:
    """Appends tensor bytes to ``<file>.onnx_data``, ``<file>.onnx_data_1``, … (64-byte aligned, each
    chunk under ``max_chunk_bytes``) and says where each tensor went. Used by ``save_model`` and by
    the streaming export, which writes weights one at a time as it computes them."""

    COPY_BLOCK = 64 * 2**20

    def __init__(self, onnx_path: Path, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.onnx_path = Path(onnx_path)
        self.max_chunk_bytes = max_chunk_bytes
        self.files: list[Path] = []
        self._fh = None
        self._offset = 0

    def _reserve(self, length: int) -> tuple[str, int]:
        if self._fh is None or (self._offset and self._offset + length > self.max_chunk_bytes):
            self._open_chunk()
        pad = (-self._offset) % _ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._offset += pad
        return self.files[-1].name, self._offset

    def _open_chunk(self) -> None:
        self._close_chunk()
        index = len(self.files)
        name = external_data_name(self.onnx_path.name, index)
        self.files.append(self.onnx_path.parent / name)
        self._fh = open(self.files[-1], "wb")
        self._offset = 0

    def _close_chunk(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def write(self, data) -> tuple[str, int, int]:
        """Append bytes (or a numpy array's bytes); returns (location, offset, length)."""
        view = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        location, offset = self._reserve(len(view))
        self._fh.write(view)
        self._offset += len(view)
        return location, offset, len(view)

    def copy_external(self, tensor: TensorProto) -> tuple[str, int, int]:
        """Copy a lazy tensor's bytes from its file in blocks, never holding the whole tensor."""
        src, src_offset, length = external_span(tensor)
        location, offset = self._reserve(length)
        with open(src, "rb") as fh:
            fh.seek(src_offset)
            left = length
            while left:
                block = fh.read(min(left, self.COPY_BLOCK))
                if not block:
                    raise GraphkitError(f"{src}: external data for '{tensor.name}' is truncated")
                self._fh.write(block)
                left -= len(block)
        self._offset += length
        return location, offset, length

    def close(self) -> None:
        self._close_chunk()


SKELETON_MIN_BYTES = 2**16


def _copy_fields(src, dst, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose top-level graph has no initializers (nothing large is copied)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",))
    out.graph.SetInParent()
    return out


def graph_skeleton(model: onnx.ModelProto, min_bytes: int = SKELETON_MIN_BYTES,
                   keep: Callable[[TensorProto], bool] | None = None) -> onnx.ModelProto:
    """A copy of the model without its large weights: each initializer of at least ``min_bytes``
    (in memory or on disk) becomes a graph input of the same name, type and shape.

    onnx.checker and shape inference see every node exactly as before (a weight's values never
    decide a shape), but nothing large is copied or serialized, the 2 GB protobuf limit does not
    apply, and lazy external references (absolute paths, which the checker refuses) stay out of it.
    ``keep``: which in-memory initializers stay (default: those under ``min_bytes``); external ones never do.
    The one weight-free copy: checker, shape inference (``passes._graph.infer_shapes``) and diagnose use it.
    """
    skel = _without_initializers(model)
    g, sg = model.graph, skel.graph
    declared = {i.name for i in g.input}  # an overridable initializer is declared already: no second input
    for t in g.initializer:
        if is_external(t) or (not keep(t) if keep is not None else nbytes(t) >= min_bytes):
            if t.name not in declared:
                sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            sg.initializer.append(t)
    return skel


# onnxruntime contrib ops that it registers in the default ONNX domain; onnx.checker does not know
# them, so they are checked as if they lived in a custom domain (which the checker skips).
ORT_DEFAULT_DOMAIN_CONTRIB_OPS = {"SimplifiedLayerNormalization"}


def _all_nodes(g: onnx.GraphProto):
    """The graph's nodes and those of its If/Loop/Scan bodies, at any depth."""
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _all_nodes(sub)


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """onnx.checker on the graph (weights stand aside, see graph_skeleton), naming the problem."""
    contrib = [n for n in _all_nodes(model.graph)
               if n.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS and n.domain in ("", "ai.onnx")]
    if contrib:
        for n in contrib:
            n.domain = "com.microsoft"
        try:
            _check(model, path)
        finally:
            for n in contrib:
                n.domain = ""
        return
    _check(model, path)


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    try:
        onnx.checker.check_model(graph_skeleton(model))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise GraphkitError(f"{path or 'model'}: fails onnx.checker: {first}") from None
