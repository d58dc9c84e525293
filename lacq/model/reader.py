"""The one GGUF reader: header, metadata and tensor infos, without the tokenizer's bulk.

gguf-py's GGUFReader turns every tokenizer string and merge into numpy parts
(5 s on SmolLM2, 21 s on gemma-3-270m's 262k-token vocabulary). lacq needs the
metadata scalars, a few per-layer arrays, the tensor table and, for the
tokenizer, only counts, a fingerprint and a couple of token strings. This
reader walks the file once over a memory map: arrays under `tokenizer.`, and
any array of more than `_BULK_COUNT` elements, are skipped and remembered by
their byte span (hashable, indexable on demand); everything else is decoded
(numbers in one numpy call). Results are cached per process by file identity
(path, size, mtime), so a command that looks at a model twice reads it once.

A hostile or damaged file gets a GGUFError, never another exception: every
count and length is checked against the bytes left before anything is
allocated, arrays do not nest, `general.alignment` must be a power of two and
every tensor type must be one whose block size lacq knows.

Layout (gguf-py's GGUFReader and ggml's gguf.cpp agree): magic, version u32,
tensor count u64, metadata count u64; each metadata item is a string key, a
value type u32 and the value; each tensor info is a name, n_dims u32, dims u64
each, type u32, offset u64; tensor data starts at the next multiple of
`general.alignment` (default 32).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lacq.errors import GGUFError

_SCALARS = {  # GGUFValueType -> struct format
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}
_SIZES = {t: struct.calcsize(f) for t, f in _SCALARS.items()}
_BULK_PREFIX = "tokenizer."  # arrays here are the vocabulary: skipped, kept as spans
# Larger arrays anywhere are skipped too: per-layer arrays have one element per block (hundreds at most),
# and decoding millions of elements into Python objects costs seconds and hundreds of MB for nothing.
_BULK_COUNT = 65536
_MAX_DIMS = 4  # GGML_MAX_DIMS
_KV_MIN_BYTES = 8 + 4 + 1  # the smallest metadata item: an empty key, its type, a one-byte value
_TENSOR_MIN_BYTES = 8 + 4 + 4 + 8  # the smallest tensor info: an empty name, n_dims 0, type, offset


@dataclass(frozen=True)
class ArraySpan:
    """An array left undecoded: its element type, count and byte range in the file."""

    type: int
    count: int
    start: int
    end: int


@dataclass(frozen=True)
class RawTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type: int  # GGMLQuantizationType value
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    arrays: dict[str, ArraySpan] = field(repr=False)
    tensors: tuple[RawTensor, ...] = field(repr=False)
    infos_offset: int  # where the tensor infos start: the metadata is bytes 24..infos_offset
    data_offset: int
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.metadata or key in self.arrays

    def array_len(self, key: str) -> int | None:
        span = self.arrays.get(key)
        if span is not None:
            return span.count
        value = self.metadata.get(key)
        return len(value) if isinstance(value, list) else None

    def array_sha256(self, key: str) -> str | None:
        """sha256 of a skipped array's bytes as stored (element type and count included)."""
        span = self.arrays.get(key)
        if span is None:
            return None
        h = hashlib.sha256(struct.pack("<IQ", span.type, span.count))
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            h.update(mm[span.start:span.end])
        return h.hexdigest()

    def string_at(self, key: str, index: int) -> str | None:
        """Element `index` of a skipped string array (a token's text), or None."""
        span = self.arrays.get(key)
        if span is None or span.type != gguf.GGUFValueType.STRING or not 0 <= index < span.count:
            return None
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = span.start
            for _ in range(index):
                pos += 8 + struct.unpack_from("<Q", mm, pos)[0]
            n = struct.unpack_from("<Q", mm, pos)[0]
            return mm[pos + 8:pos + 8 + n].decode("utf-8", "replace")


class _Cursor:
    def __init__(self, buf: mmap.mmap, size: int):
        self.buf, self.pos, self.size = buf, 0, size

    def unpack(self, fmt: str, n: int) -> Any:
        if self.pos + n > self.size:
            raise EOFError(f"needs {n} bytes at offset {self.pos}, file has {self.size}")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def count(self, what: str, item_bytes: int) -> int:
        """A u64 count of items of at least `item_bytes` each, refused if they cannot fit in the file."""
        at = self.pos
        n = self.unpack("<Q", 8)
        if n * item_bytes > self.size - self.pos:
            raise EOFError(f"{what} at offset {at} claims {n} items, more than the {self.size - self.pos} "
                           "bytes left hold")
        return n

    def string(self) -> str:
        n = self.unpack("<Q", 8)
        if self.pos + n > self.size:
            raise EOFError(f"a string of {n} bytes at offset {self.pos} runs past the end")
        text = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return text

    def skip_strings(self, count: int) -> None:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise EOFError(f"a string array runs past the end at offset {pos}")
            pos += 8 + unpack("<Q", buf, pos)[0]
        if pos > size:
            raise EOFError("a string array runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int, key: str, arrays: dict[str, ArraySpan]) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], _SIZES[vtype])
        if vtype != gguf.GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {vtype} for {_quoted(key)}")
        etype = self.unpack("<I", 4)
        if etype != gguf.GGUFValueType.STRING and etype not in _SIZES:
            raise ValueError(f"{_quoted(key)}: arrays of value type {etype} are not GGUF (arrays do not nest)")
        count = self.count(f"array {_quoted(key)}", 8 if etype == gguf.GGUFValueType.STRING else _SIZES[etype])
        start = self.pos
        if key.startswith(_BULK_PREFIX) or count > _BULK_COUNT:
            if etype == gguf.GGUFValueType.STRING:
                self.skip_strings(count)
            else:
                self.pos += count * _SIZES[etype]
            arrays[key] = ArraySpan(etype, count, start, self.pos)
            return None
        if etype == gguf.GGUFValueType.STRING:
            return [self.string() for _ in range(count)]
        self.pos += count * _SIZES[etype]
        return np.frombuffer(self.buf[start:self.pos], _SCALARS[etype]).tolist()  # a copy: no view of the map


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Read a GGUF's header, metadata and tensor table (cached by path, size and mtime)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    return _read_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    if size < 4:
        raise GGUFError(f"{path}: not a GGUF file ({size} bytes)")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _parse(path, mm, size)
            except (EOFError, ValueError, UnicodeDecodeError, struct.error) as e:
                raise GGUFError(f"{path}: unreadable or truncated GGUF ({e})") from None


def _parse(path: str, mm: mmap.mmap, size: int) -> GGUFFile:
    cur = _Cursor(mm, size)
    cur.pos = 4
    version = cur.unpack("<I", 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.unpack("<Q", 8)
    n_kv = cur.count("the metadata count", _KV_MIN_BYTES)
    if n_tensors * _TENSOR_MIN_BYTES > size - cur.pos:
        raise EOFError(f"the header claims {n_tensors} tensors, more than the file's {size} bytes hold")
    metadata: dict[str, Any] = {}
    arrays: dict[str, ArraySpan] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I", 4)
        value = cur.value(vtype, key, arrays)
        if key not in arrays:
            metadata[key] = value
    infos_offset = cur.pos
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I", 4)
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {_quoted(name)} has {n_dims} dimensions (ggml has at most {_MAX_DIMS})")
        shape = tuple(cur.unpack("<Q", 8) for _ in range(n_dims))
        ttype = cur.unpack("<I", 4)
        offset = cur.unpack("<Q", 8)
        _check_type(path, name, ttype)
        tensors.append(RawTensor(name, shape, ttype, offset))
    align = metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise GGUFError(f"{path}: {gguf.Keys.General.ALIGNMENT} = {_quoted(align)}: must be a positive power of two")
    data_offset = cur.pos + (-cur.pos % align)
    return GGUFFile(path, version, metadata, arrays, tuple(tensors), infos_offset, data_offset, size)


def _quoted(value: Any) -> str:
    """A key, name or value from the file, fit for a one-line message: a damaged one may be long or hold newlines."""
    text = repr(value)
    return text if len(text) <= 62 else text[:60] + "..."


_KNOWN_TYPES = {int(t) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES}


def _check_type(path: str, name: str, ttype: int) -> None:
    """Refuse a tensor type lacq cannot size. Showing it as "unknown type N" instead would leave every
    consumer (sizes, bpw, the truncation check, recipes, assembly) without a block size; a file with such a
    type comes from a llama.cpp newer than the pinned one, which could not load it either."""
    if ttype not in _KNOWN_TYPES:
        raise GGUFError(f"{path}: tensor {_quoted(name)} has type id {ttype}, unknown to this lacq and its gguf "
                        f"package (known: {min(_KNOWN_TYPES)}..{max(_KNOWN_TYPES)}); is the file from a newer "
                        "llama.cpp?")
