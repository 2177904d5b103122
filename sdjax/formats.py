r"""The one reader of weight files: safetensors and PyTorch zip checkpoints, without ever running pickled code.

The format is decided by the file's bytes, never by its name:

| first bytes                                 | format                     | read as                              |
|---------------------------------------------|----------------------------|--------------------------------------|
| 8-byte little-endian n, then a JSON object  | safetensors                | memory-mapped views, header checked  |
| `PK\x03\x04`, a zip with `<dir>/data.pkl`   | PyTorch zip (`torch.save`) | allowlisted unpickler, lazy storages |
| `\x80\x02\x8a\x0a` + the torch magic number | legacy (pre-1.6) torch     | refused: a raw pickle stream         |
| `\x80` + protocol 2-5                       | a Python pickle            | refused: pickles can run code        |
| anything else                               | -                          | refused, naming what it is           |

A PyTorch zip holds `data.pkl`, a pickle whose tensors point at storage records `data/<key>`. It is unpickled by
`_SafeUnpickler`, whose `find_class` knows only `ALLOWED_GLOBALS` (tensor and storage rebuilders, `OrderedDict`,
`torch.Size`, numpy scalars, inert stand-ins for Lightning's `ModelCheckpoint`); any other global (`os.system`,
`builtins.eval`, `functools.partial`, `pickle.loads`, ...) is refused by name before it is imported. The allowed
names never resolve to torch or numpy code: each maps to a small function here that checks its arguments. The
objects that carry those checks (tensors, storages, the allowed functions) refuse the BUILD opcode, so a pickle
cannot rewrite them; stand-ins only record what BUILD gives them. Tensors come out as `TensorRef`s (storage,
offset, shape, stride) checked to stay inside their record; the data is read from a memory map only when a
tensor is used.

Every refusal is a `CheckpointFormatError` (a `ValueError`), or its subclass `UnsafeCheckpointError` for code that
would have run, with a one-line message that starts with the file's path.
"""
from __future__ import annotations

import collections
import copyreg
import io
import json
import math
import mmap
import os
import pickle
import re
import reprlib
import types
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes
import numpy as np


class CheckpointFormatError(ValueError):
    """A weight file that is not a well-formed safetensors file or PyTorch zip checkpoint."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A weight file that would run code if loaded the usual way (a pickle, or a global off the allowlist)."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_PICKLE_BYTES = 1 << 29  # data.pkl of a full SD checkpoint with optimizer state is a few MB
MAX_TREE_NODES = 1_000_000  # shared containers in a pickle could make flattening exponential
MAX_TREE_DEPTH = 100
_MAX_DIM = 1 << 62

_PICKLE_REFUSED = "(refused: pickles can run code)"
# A pre-1.6 torch file starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2, LONG1 of 10 bytes).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------------------------
# Telling formats apart by their bytes


def _sniff(head: bytes, size: int) -> str:
    """'empty', 'zip', 'legacy-torch', 'pickle' or 'other' (possibly safetensors) from the first 16 bytes."""
    if size == 0:
        return "empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "legacy-torch"
    # PROTO 2-5 then an opcode (never 0x00). A safetensors header of 640/896/1152/1408 bytes also starts with
    # 0x80 0x0[2-5], but its next bytes are the zero high bytes of the length.
    if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0:
        return "pickle"
    return "other"


def _looks_like_old_pickle(head: bytes) -> bool:
    # protocol 0/1 pickles have no PROTO opcode; they usually open with MARK, GLOBAL, an empty container or INST
    return head[:1] in (b"(", b"c", b"}", b"]", b")", b"i")


def _refuse_by_kind(kind: str, head: bytes, what: str) -> None:
    if kind == "empty":
        raise CheckpointFormatError("empty file")
    if kind == "legacy-torch":
        raise UnsafeCheckpointError(
            "a PyTorch file in the legacy (pre-1.6) format, a raw pickle stream "
            f"{_PICKLE_REFUSED}; re-save it with torch.save (torch>=1.6) or as safetensors"
        )
    if kind == "pickle":
        raise UnsafeCheckpointError(f"a Python pickle, not {what} {_PICKLE_REFUSED}")


def detect_format(path: str | os.PathLike) -> str:
    """'safetensors' or 'torch-zip', from the file's bytes; raises CheckpointFormatError for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            kind = _sniff(head, size)
            _refuse_by_kind(kind, head, "a safetensors file or PyTorch zip checkpoint")
            if kind == "zip":
                return "torch-zip"
            _check_header_length(head, size)
            return "safetensors"
    except CheckpointFormatError as e:
        raise type(e)(_one_line(f"{path}: {e}")) from None


# ----------------------------------------------------------------------------------------------------------------
# safetensors


def _check_header_length(head: bytes, size: int) -> int:
    if size < 8:
        raise CheckpointFormatError(f"truncated: {size} bytes, too short for a safetensors header")
    n = int.from_bytes(head[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
        why = (f"header length {n} is too small" if n < 2 else
               f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes" if n > MAX_HEADER_BYTES else
               f"header length {n} exceeds the file size {size}")
        if _looks_like_old_pickle(head):
            raise UnsafeCheckpointError(f"looks like a Python pickle (protocol 0/1): {why} {_PICKLE_REFUSED}")
        raise CheckpointFormatError(f"not a safetensors file or PyTorch zip checkpoint: {why}")
    return n


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointFormatError(f"header names {k!r} twice")
        out[k] = v
    return out


def _no_constant(name):
    raise CheckpointFormatError(f"header holds {name}, which is not JSON")


def _parse_header(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"header is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"header is a JSON {type(header).__name__}, not an object")
    return header


def _parse_metadata(meta) -> dict[str, str]:
    if meta is None:  # the safetensors library accepts null
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError("__metadata__ is not a mapping of strings to strings")
    return dict(meta)


def _parse_entries(header: dict, data_len: int, start: int) -> dict[str, tuple]:
    """key -> (dtype, shape, begin, end) with absolute file offsets, after checking that the tensors tile the data
    section exactly, in some order, as the safetensors library requires (no gap, no overlap, nothing after)."""
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointFormatError(f"tensor {key!r}: header entry is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(f"tensor {key!r}: unknown dtype {reprlib.repr(dtype_name)}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
            raise CheckpointFormatError(
                f"tensor {key!r}: shape {reprlib.repr(shape)} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets)):
            raise CheckpointFormatError(
                f"tensor {key!r}: data_offsets {reprlib.repr(offsets)} are not two non-negative integers")
        dtype = np.dtype(SAFETENSORS_DTYPES[dtype_name])
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if begin > end:
            raise CheckpointFormatError(f"tensor {key!r}: data_offsets {offsets} end before they begin")
        if end > data_len:
            raise CheckpointFormatError(
                f"tensor {key!r}: data_offsets {offsets} outside the data section of {data_len} bytes")
        if end - begin != nbytes:
            raise CheckpointFormatError(
                f"tensor {key!r}: data_offsets {offsets} hold {end - begin} bytes, shape {tuple(shape)} of "
                f"{dtype_name} needs {nbytes}")
        entries[key] = (dtype, tuple(shape), start + begin, start + end)
    at = start
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != at:
            how = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise CheckpointFormatError(f"tensor {key!r}: data_offsets {[begin - start, end - start]} {how}")
        at = end
    if at != start + data_len:
        raise CheckpointFormatError(
            f"the tensors cover {at - start} of the {data_len} bytes of the data section")
    return entries


class SafetensorsFile:
    """One memory-mapped safetensors file, its header checked as strictly as the safetensors library does (and a
    little more: duplicate names are refused). The tensors are read-only views into the map (no copy).

    `entries`: key -> (dtype, shape, begin, end), begin/end absolute file offsets; `metadata`: `__metadata__`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(16)
                kind = _sniff(head, size)
                _refuse_by_kind(kind, head, "a safetensors file")
                if kind == "zip":
                    raise CheckpointFormatError("a zip archive (a PyTorch checkpoint?), not a safetensors file")
                n = _check_header_length(head, size)
                f.seek(8)
                header = _parse_header(f.read(n))
                self.start = 8 + n
                self.metadata = _parse_metadata(header.get("__metadata__"))
                self.entries = _parse_entries(header, size - self.start, self.start)
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > self.start else None
        except CheckpointFormatError as e:
            raise type(e)(_one_line(f"{self.path}: {e}")) from None

    def record(self, key: str) -> np.ndarray:
        """The bytes of tensor `key` as a read-only uint8 view into the map."""
        _, _, begin, end = self.entries[key]
        if begin == end:
            return np.zeros(0, np.uint8)
        return np.frombuffer(self.map, np.uint8, end - begin, begin)

    def view(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        if begin == end:
            return np.zeros(shape, dtype)
        return np.frombuffer(self.map, dtype, math.prod(shape), begin).reshape(shape)

    def record_offset(self, key: str) -> int:
        """Where the bytes of tensor `key` start in the file."""
        return self.entries[key][2]

    def release(self, key: str) -> None:
        """Drop the pages of `key` from this process's resident set (the OS page cache keeps them)."""
        _, _, begin, end = self.entries[key]
        _release(self.map, begin, end)


def _release(map_: mmap.mmap | None, begin: int, end: int) -> None:
    """Drop bytes [begin, end) of a read-only file map from the resident set: the next access reads them again from
    the page cache. A memory hint only; does nothing where the platform has no MADV_DONTNEED."""
    if map_ is None or end <= begin or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo = begin // page * page
    try:
        map_.madvise(mmap.MADV_DONTNEED, lo, end - lo)
    except (OSError, ValueError):
        pass


# ----------------------------------------------------------------------------------------------------------------
# Lazy tensors


class _Immutable:
    """Objects the unpickler hands out refuse the BUILD opcode (which would call `__setstate__` or set attributes),
    so that a pickle cannot rewrite the shape of a checked tensor or the code of an allowed function."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"refused BUILD on {self!r}")


class _Storage(_Immutable):
    """`nbytes` bytes at the start of record `name` of `source` (an archive or a safetensors file)."""

    __slots__ = ("source", "name", "nbytes", "byteorder")

    def __init__(self, source, name: str, nbytes: int, byteorder: str = "little"):
        self.source, self.name, self.nbytes, self.byteorder = source, name, nbytes, byteorder

    def read(self) -> np.ndarray:
        return self.source.record(self.name)[:self.nbytes]

    def offset(self) -> int:
        return self.source.record_offset(self.name)

    def release(self) -> None:
        self.source.release(self.name)

    def __repr__(self):
        return f"storage {self.name} ({self.nbytes} bytes)"


def _contiguous(shape: tuple, stride: tuple) -> bool:
    expect = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expect:
            return False
        expect *= size
    return True


class TensorRef(_Immutable):
    """A tensor of a checkpoint, not read yet: `shape` and `dtype` come from the header or pickle, `numpy()` (or
    `np.asarray(ref)`) reads it: a read-only view into the file's memory map where the file allows it.

    `offset` and `stride` count elements; they were checked to stay inside the storage when the ref was made."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple, dtype):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)
        self.dtype = np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        count = math.prod(self.shape)
        if count == 0:
            out = np.zeros(self.shape, self.dtype)
            out.flags.writeable = False
            return out
        itemsize = self.dtype.itemsize
        raw = self.storage.read()
        flat = raw[:raw.size // itemsize * itemsize].view(self.dtype)
        if _contiguous(self.shape, self.stride):
            out = flat[self.offset:self.offset + count].reshape(self.shape)
        else:  # in bounds: checked by _check_view when the ref was made
            out = np.lib.stride_tricks.as_strided(
                flat[self.offset:], self.shape, tuple(s * itemsize for s in self.stride), writeable=False)
        if self.storage.byteorder == "big" and itemsize > 1:
            out = out.view(f"u{itemsize}").byteswap().view(self.dtype)
            out.flags.writeable = False
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)

    def __reduce__(self):  # copy/deepcopy without __setstate__
        return TensorRef, (self.storage, self.offset, self.shape, self.stride, self.dtype)

    def __repr__(self):
        return f"TensorRef(shape={self.shape}, dtype={self.dtype})"


def _check_view(storage: _Storage, offset, size, stride, dtype: np.dtype) -> TensorRef:
    if not _is_int(offset) or offset < 0:
        raise CheckpointFormatError(
            f"{storage!r}: storage offset {reprlib.repr(offset)} is not a non-negative integer")
    for name, dims in (("size", size), ("stride", stride)):
        if not isinstance(dims, (tuple, list)) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in dims):
            raise CheckpointFormatError(
                f"{storage!r}: tensor {name} {reprlib.repr(dims)} is not a tuple of non-negative integers")
    if len(size) != len(stride):
        raise CheckpointFormatError(
            f"{storage!r}: tensor size {tuple(size)} and stride {tuple(stride)} differ in rank")
    numel = storage.nbytes // dtype.itemsize
    if math.prod(size) == 0:
        last = offset - 1  # an empty tensor reads nothing; its offset may sit at the end
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel or offset > numel:
        raise CheckpointFormatError(
            f"{storage!r}: tensor view (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) reaches element "
            f"{last} of a storage of {numel} {dtype} elements")
    return TensorRef(storage, offset, tuple(size), tuple(stride), dtype)


class StateDict(Mapping[str, np.ndarray]):
    """`{name: array}` of a checkpoint, lazily: `sd[name]` reads one tensor (a memory-mapped view where the file
    allows), `sd.shape(name)` and `sd.dtype(name)` read nothing. `metadata`: safetensors `__metadata__`; for a
    PyTorch checkpoint the int and str values at its top level (a Lightning file's "epoch", "global_step"), as
    strings."""

    def __init__(self, tensors: Mapping[str, TensorRef], metadata: Mapping[str, str] | None = None, path=None):
        self._refs = dict(tensors)
        self.metadata = dict(metadata or {})
        self.path = path

    def __getitem__(self, key: str) -> np.ndarray:
        return self._refs[key].numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, key) -> bool:
        return key in self._refs

    def ref(self, key: str) -> TensorRef:
        return self._refs[key]

    def shape(self, key: str) -> tuple:
        return self._refs[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._refs[key].dtype

    def offset(self, key: str) -> tuple:
        """Where `key`'s data lies in the file, as a sort key: reading tensors in this order reads the file once
        front to back."""
        ref = self._refs[key]
        return id(ref.storage.source), ref.storage.offset(), ref.offset

    def release(self, key: str) -> None:
        """Drop the file pages of `key`'s record from this process's resident set once it is copied (the page cache
        keeps them): a loader that releases each tensor after use never holds the mapped file besides its copy.
        Tensors sharing the record read it again from the page cache."""
        self._refs[key].storage.release()

    def __repr__(self):
        return f"StateDict({self.path}, {len(self)} tensors)"


# ----------------------------------------------------------------------------------------------------------------
# PyTorch zip archives


class _Archive:
    """A PyTorch zip checkpoint: the zip directory, its `<dir>/` prefix, byte order, and a read-only memory map from
    which uncompressed (STORED) records are viewed in place."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
            raise CheckpointFormatError(f"a damaged zip archive ({_one_line(e)})") from None
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CheckpointFormatError("a zip archive that names a record twice")
        self.infos = {i.filename: i for i in infos}
        pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                "a zip archive but not a PyTorch checkpoint (no <dir>/data.pkl record)" if not pickles else
                f"a zip archive with {len(pickles)} data.pkl records")
        self.prefix = pickles[0][:-len("/data.pkl")]
        order = self.infos.get(f"{self.prefix}/byteorder")
        self.byteorder = "little" if order is None else self._small(order).decode("ascii", "replace").strip()
        if self.byteorder not in ("little", "big"):
            raise CheckpointFormatError(f"byteorder record says {self.byteorder[:20]!r}, not 'little' or 'big'")
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._starts = {}

    def _read(self, info: zipfile.ZipInfo) -> bytes:
        """A whole record through zipfile (decompressed, CRC-checked)."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                return zf.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
            raise CheckpointFormatError(f"cannot read record {info.filename} ({_one_line(e)})") from None

    def _small(self, info: zipfile.ZipInfo, limit: int = 64) -> bytes:
        if info.file_size > limit:
            raise CheckpointFormatError(f"record {info.filename} is {info.file_size} bytes (at most {limit} expected)")
        return self._read(info)

    def data_pkl(self) -> bytes:
        info = self.infos[f"{self.prefix}/data.pkl"]
        if info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointFormatError(f"data.pkl is {info.file_size} bytes, more than {MAX_PICKLE_BYTES}")
        return self._read(info)

    def record_size(self, name: str) -> int:
        info = self.infos.get(name)
        if info is None:
            raise CheckpointFormatError(f"the pickle points at record {name}, which the archive lacks")
        return info.file_size

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a STORED record's bytes start: after its local header, whose name and extra field may differ in
        length from the central directory's (torch pads the extra field to align the data to 64 bytes)."""
        at = info.header_offset
        if at + 30 > self.size or self.map[at:at + 4] != b"PK\x03\x04":
            raise CheckpointFormatError(f"record {info.filename}: no local file header at byte {at}")
        name_len = int.from_bytes(self.map[at + 26:at + 28], "little")
        extra_len = int.from_bytes(self.map[at + 28:at + 30], "little")
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if self.map[at + 30:at + 30 + name_len] != info.orig_filename.encode(encoding, "replace"):
            raise CheckpointFormatError(f"record {info.filename}: its local header names another file")
        start = at + 30 + name_len + extra_len
        if start + info.file_size > self.size:
            raise CheckpointFormatError(f"record {info.filename}: {info.file_size} bytes run past the end of the file")
        return start

    def _stored(self, name: str) -> bool:
        info = self.infos[name]
        return (not info.flag_bits & 0x1 and info.compress_type == zipfile.ZIP_STORED
                and info.compress_size == info.file_size)

    def record_offset(self, name: str) -> int:
        """Where record `name` starts in the file (its local header: the records' order in the file)."""
        return self.infos[name].header_offset

    def release(self, name: str) -> None:
        """Drop the mapped pages of a STORED record from this process's resident set (a decompressed record is a
        copy the caller owns: nothing to drop)."""
        if name in self._starts and self._stored(name):
            start = self._starts[name]
            _release(self.map, start, start + self.infos[name].file_size)

    def record(self, name: str) -> np.ndarray:
        """The bytes of record `name`: a read-only view into the map if STORED, else decompressed (and CRC-checked)."""
        info = self.infos[name]
        try:
            if info.flag_bits & 0x1:
                raise CheckpointFormatError(f"record {name} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                return np.frombuffer(self._read(info), np.uint8)
            if name not in self._starts:
                self._starts[name] = self._data_start(info)
        except CheckpointFormatError as e:  # raised when a tensor is read, long after read_state_dict returned
            raise CheckpointFormatError(f"{self.path}: {e}") from None
        return np.frombuffer(self.map, np.uint8, info.file_size, self._starts[name])


# ----------------------------------------------------------------------------------------------------------------
# The unpickler and its allowlist


class InertObject:
    """Stands in for a class a checkpoint names but sdjax never imports (Lightning's `ModelCheckpoint`): calling,
    NEWOBJ and BUILD only record their arguments. `qualname` is the class the pickle named."""

    qualname = "?"
    args: tuple = ()
    state: Any = None

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self.qualname} args={self.args!r} state={self.state!r}>"


class InertDict(dict):
    """Stands in for a dict subclass a checkpoint names (Lightning's `AttributeDict` of hyper-parameters)."""

    qualname = "?"
    state: Any = None

    def __setstate__(self, state):
        self.state = state


_INERT_CLASSES: dict[str, type] = {}


def _inert(qualname: str, base: type = InertObject) -> type:
    if qualname not in _INERT_CLASSES:
        short = qualname.rpartition(".")[2]
        _INERT_CLASSES[qualname] = type(short, (base,), {"qualname": qualname, "__module__": __name__})
    return _INERT_CLASSES[qualname]


class TorchDtype(_Immutable):
    """A `torch.<dtype>` global (the dtype of `_rebuild_tensor_v3`, or a hyper-parameter)."""

    __slots__ = ("name", "numpy")

    def __init__(self, name: str, numpy_dtype):
        self.name, self.numpy = name, np.dtype(numpy_dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageType(_Immutable):
    """A `torch.<X>Storage` global: the element type of a storage record."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _Allowed(_Immutable):
    """An allowlisted callable: `fn` is ours, never torch's or numpy's."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return self.name


_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
}
_STORAGE_TYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_NUMPY_SCALAR_TYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


class _NumpyDtype(InertObject):
    """`numpy.dtype(name, align, copy)` followed by BUILD with its byte order: recorded, for `numpy ... scalar`."""

    qualname = "numpy.dtype"
    numpy = None  # set by __init__, which NEWOBJ skips

    def __init__(self, name=None, align=False, copy=True):
        if name not in _NUMPY_SCALAR_TYPES:
            raise UnsafeCheckpointError(
                f"refused numpy.dtype({reprlib.repr(name)}): only plain numeric scalar types are read")
        self.args = (name, align, copy)
        self.numpy = np.dtype(name)

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]) of a plain type
        if (self.numpy is None or not isinstance(state, tuple) or len(state) < 8 or state[1] not in ("<", ">", "|", "=")
                or any(s is not None for s in state[2:5])):
            raise CheckpointFormatError(f"numpy.dtype{reprlib.repr(self.args)}: unexpected state {reprlib.repr(state)}")
        self.state = state
        self.numpy = self.numpy.newbyteorder(state[1]) if state[1] != "|" else self.numpy


def _numpy_scalar(dtype, data=None):
    if (type(dtype) is not _NumpyDtype or not isinstance(dtype.numpy, np.dtype) or dtype.numpy.kind not in "biuf"
            or not isinstance(data, bytes) or len(data) != dtype.numpy.itemsize):
        raise CheckpointFormatError("numpy scalar: expected a plain numeric dtype and its bytes")
    return np.frombuffer(data, dtype.numpy).astype(dtype.numpy.newbyteorder("="))[0]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # protocol 2 writes bytes as _codecs.encode(str, "latin1"); nothing else is needed, so no other codec is looked up
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafeCheckpointError(
            f"refused _codecs.encode with encoding {reprlib.repr(encoding)}: only latin1 text is read")
    return text.encode("latin1")


def _torch_size(dims=()):
    if not isinstance(dims, (tuple, list)) or not all(_is_int(d) for d in dims):
        raise CheckpointFormatError(f"torch.Size({reprlib.repr(dims)}): not a tuple of integers")
    return tuple(dims)


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or _is_int(index)):
        raise CheckpointFormatError("torch.device: expected a name and an optional index")
    return kind if index is None else f"{kind}:{index}"


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _TypedStorage):
        raise CheckpointFormatError(f"_rebuild_tensor_v2: {type(storage).__name__} is not a storage")
    return _check_view(storage.storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(storage, _TypedStorage) or not isinstance(dtype, TorchDtype):
        raise CheckpointFormatError("_rebuild_tensor_v3: expected a storage and a torch dtype")
    return _check_view(storage.storage, offset, size, stride, dtype.numpy)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise CheckpointFormatError(f"_rebuild_parameter: {type(data).__name__} is not a tensor")
    return data


class _TypedStorage(_Immutable):
    """What `persistent_load` returns: a storage record with the element type the pickle declared."""

    __slots__ = ("storage", "dtype")

    def __init__(self, storage: _Storage, dtype):
        self.storage, self.dtype = storage, np.dtype(dtype)


def _allowed_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    table: dict[tuple[str, str], Callable[[], Any]] = {
        ("collections", "OrderedDict"): lambda: collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): lambda: _Allowed("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): lambda: _Allowed("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): lambda: _Allowed("torch._utils._rebuild_parameter", _rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"):
            lambda: _Allowed("torch._utils._rebuild_parameter_with_state", _rebuild_parameter),
        ("torch", "Size"): lambda: _Allowed("torch.Size", _torch_size),
        ("torch", "device"): lambda: _Allowed("torch.device", _torch_device),
        ("_codecs", "encode"): lambda: _Allowed("_codecs.encode", _codecs_encode),
        ("numpy", "dtype"): lambda: _NumpyDtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "scalar")] = lambda: _Allowed("numpy.core.multiarray.scalar", _numpy_scalar)
    for name, dtype in _STORAGE_TYPES.items():
        table[("torch", name)] = lambda name=name, dtype=dtype: _StorageType(name, dtype)
    for module in ("torch", "torch.storage"):
        table[(module, "UntypedStorage")] = lambda: _StorageType("UntypedStorage", np.uint8)
    for name, dtype in _TORCH_DTYPES.items():
        table[("torch", name)] = lambda name=name, dtype=dtype: TorchDtype(name, dtype)
    for package in ("pytorch_lightning", "lightning.pytorch"):
        qualname = f"{package}.callbacks.model_checkpoint.ModelCheckpoint"
        table[tuple(qualname.rsplit(".", 1))] = lambda qualname=qualname: _inert(qualname)
    for qualname in ("pytorch_lightning.utilities.parsing.AttributeDict",
                     "lightning_fabric.utilities.data.AttributeDict", "lightning.fabric.utilities.data.AttributeDict"):
        table[tuple(qualname.rsplit(".", 1))] = lambda qualname=qualname: _inert(qualname, InertDict)
    return table


ALLOWED_GLOBALS = types.MappingProxyType(_allowed_globals())  # (module, name) -> maker of its stand-in


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` with nothing but `ALLOWED_GLOBALS`; storages come from `archive`'s records."""

    def __init__(self, data: bytes, archive: _Archive):
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.storages: dict[str, _TypedStorage] = {}

    def find_class(self, module, name):
        make = ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise UnsafeCheckpointError(f"refused global {module}.{name} (not on sdjax.formats' allowlist)")
        return make()

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"refused persistent id {reprlib.repr(pid)}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(
                f"storage {reprlib.repr(key)}: {reprlib.repr(storage_type)} is not a storage type")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_int(numel) or numel < 0:
            raise CheckpointFormatError(f"storage {reprlib.repr(key)}: malformed persistent id")
        name = f"{self.archive.prefix}/data/{key}"
        nbytes = numel * storage_type.dtype.itemsize
        have = self.archive.record_size(name)
        if nbytes > have:
            raise CheckpointFormatError(
                f"storage {key!r}: {numel} elements of {storage_type!r} need {nbytes} bytes, record data/{key} holds "
                f"{have}")
        seen = self.storages.get(key)
        if seen is not None:
            if (seen.storage.nbytes, seen.dtype) != (nbytes, storage_type.dtype):
                raise CheckpointFormatError(f"storage {key!r} is declared twice with different types or sizes")
            return seen
        typed = _TypedStorage(_Storage(self.archive, name, nbytes, self.archive.byteorder), storage_type.dtype)
        self.storages[key] = typed
        return typed


def _unpickle(data: bytes, archive: _Archive):
    # EXT1/2/4 opcodes look their global up in copyreg's registry (and a cache) without calling find_class. Both are
    # empty unless some library registered an extension; then the pickle is scanned and any EXT refused.
    if copyreg._extension_registry or copyreg._extension_cache:
        import pickletools

        try:
            if any(op.name.startswith("EXT") for op, _, _ in pickletools.genops(data)):
                raise UnsafeCheckpointError("refused EXT opcode (a global from copyreg's extension registry)")
        except (ValueError, EOFError) as e:
            raise CheckpointFormatError(f"data.pkl is not a valid pickle ({_one_line(e)})") from None
    try:
        return _SafeUnpickler(data, archive).load()
    except CheckpointFormatError:
        raise
    except Exception as e:  # malformed opcodes, wrong arguments to an allowed callable, ...
        raise CheckpointFormatError(f"data.pkl is not a valid checkpoint pickle ({type(e).__name__}: "
                                    f"{_one_line(e)[:200]})") from None


# ----------------------------------------------------------------------------------------------------------------
# Public readers


def _safetensors_refs(st: SafetensorsFile) -> dict[str, TensorRef]:
    refs = {}
    for key, (dtype, shape, begin, end) in st.entries.items():
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        refs[key] = TensorRef(_Storage(st, key, end - begin), 0, shape, stride, dtype)
    return refs


def read_pickle_tree(path: str | os.PathLike) -> Any:
    """The whole object of a PyTorch zip checkpoint (`torch.save`'s argument), unpickled with the allowlist only:
    dicts, lists, tuples, numbers, strings, numpy scalars, `InertObject` stand-ins, and tensors as lazy `TensorRef`s.
    A safetensors file gives `{name: TensorRef}`. Anything else raises CheckpointFormatError."""
    path = Path(path)
    kind = detect_format(path)
    try:
        if kind == "safetensors":
            return _safetensors_refs(SafetensorsFile(path))
        archive = _Archive(path)
        return _unpickle(archive.data_pkl(), archive)
    except CheckpointFormatError as e:
        message = str(e)
        raise type(e)(_one_line(message if message.startswith(f"{path}: ") else f"{path}: {message}")) from None


def flatten_tensors(tree: Any) -> dict[str, TensorRef]:
    """`{"a.b": TensorRef}` of every tensor under nested dicts/lists/tuples (names joined with "."; list items by
    index); other leaves, and subtrees under keys that are neither str nor int, are dropped."""
    out: dict[str, TensorRef] = {}
    stack = [("", tree, 0)]
    visits = 0
    while stack:
        name, node, depth = stack.pop()
        visits += 1
        if visits > MAX_TREE_NODES:
            raise CheckpointFormatError(f"more than {MAX_TREE_NODES} objects to flatten (shared containers?)")
        if isinstance(node, TensorRef):
            if name in out:
                raise CheckpointFormatError(f"two tensors are named {name!r}")
            out[name] = node
            continue
        if isinstance(node, dict):  # dict.items: a pickle can set attributes (`items`) on an OrderedDict
            items = [(k, v) for k, v in dict.items(node) if isinstance(k, str) or _is_int(k)]
        elif isinstance(node, (list, tuple)):
            items = list(enumerate(node))
        else:
            continue
        if depth >= MAX_TREE_DEPTH:
            raise CheckpointFormatError(f"containers nested deeper than {MAX_TREE_DEPTH} levels (a cycle?)")
        for k, v in reversed(items):
            stack.append((f"{name}.{k}" if name else str(k), v, depth + 1))
    return out


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """`{name: array}` of a safetensors file or PyTorch zip checkpoint, detected from its bytes.

    Tensors are read lazily (memory-mapped where the records are uncompressed). A Lightning checkpoint gives its
    `state_dict`; other nested dicts (an embedding's `string_to_param`) are flattened to "a.b" names, non-tensor
    leaves dropped. Pickles, legacy torch files, globals off the allowlist and lying headers raise
    `CheckpointFormatError` / `UnsafeCheckpointError` naming the file."""
    path = Path(path)
    if detect_format(path) == "safetensors":
        st = SafetensorsFile(path)
        return StateDict(_safetensors_refs(st), st.metadata, path)
    tree = read_pickle_tree(path)
    metadata = {}
    if isinstance(tree, dict):
        metadata = {k: str(v) for k, v in dict.items(tree)
                    if isinstance(k, str) and (_is_int(v) or isinstance(v, str)) and not isinstance(v, bool)}
    if isinstance(tree, dict) and isinstance(dict.get(tree, "state_dict"), dict):
        tree = dict.get(tree, "state_dict")
    if not isinstance(tree, (dict, list, tuple)):
        raise CheckpointFormatError(f"{path}: holds a {type(tree).__name__}, not a dict of tensors")
    try:
        return StateDict(flatten_tensors(tree), metadata, path)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{path}: {e}") from None
