"""A GGUF assembled from tensors of other GGUFs of the same model, without re-quantizing.

A sensitivity scan needs hundreds of variants that differ from a uniformly
quantized file in one unit. llama-quantize quantizes every tensor on its own
(no imatrix, deterministic), so a variant equals, tensor for tensor, the file
llama-quantize would write for the same plan: each tensor's bytes can be copied
from the candidate file quantized wholly at that tensor's type.

The output takes the header and metadata of `default` byte for byte (its
`general.file_type` therefore names the default's type), then one tensor info
per tensor in the default's order with the chosen source's type and shape, and
the data, each tensor aligned to `general.alignment`. The file is written to a
temporary name and renamed.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf

from lacq.errors import GGUFError
from lacq.fsutil import atomic_output, canonical_hash
from lacq.model.reader import GGUFFile, RawTensor, read_gguf


def _tensor_bytes(t: RawTensor) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type)]
    return math.prod(t.shape) // block * size


def assemble(default: Path, sources: dict[str, Path], choice: dict[str, str], out: Path) -> Path:
    """Write `out`: every tensor from `default`, except those named in `choice` (tensor -> key of `sources`)."""
    default, out = Path(default), Path(out)
    base = read_gguf(default)
    files = {k: read_gguf(p) for k, p in sources.items()}
    by_name = {k: {t.name: t for t in f.tensors} for k, f in files.items()}
    names = [t.name for t in base.tensors]
    for key, f in files.items():
        if [t.name for t in f.tensors] != names:
            raise GGUFError(f"{sources[key]} does not hold the same tensors as {default}: not the same model")
    unknown = sorted(set(choice) - set(names))
    if unknown:
        raise GGUFError(f"no tensor {unknown[0]} in {default}")
    align = int(base.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
    picked: list[tuple[RawTensor, GGUFFile]] = []
    for t in base.tensors:
        key = choice.get(t.name)
        picked.append((by_name[key][t.name], files[key]) if key is not None else (t, base))
    infos = bytearray()
    offset = 0
    for t, _ in picked:
        name = t.name.encode()
        infos += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.shape))
        infos += b"".join(struct.pack("<Q", d) for d in t.shape)
        infos += struct.pack("<IQ", t.type, offset)
        offset += _tensor_bytes(t)
        offset += -offset % align
    with atomic_output(out) as part, open(part, "wb") as dst, open(default, "rb") as src:
        dst.write(src.read(24))  # magic, version, tensor count, metadata count: the same
        dst.write(src.read(base.infos_offset - 24))  # the metadata, byte for byte
        dst.write(infos)
        dst.write(b"\0" * (-dst.tell() % align))
        handles = {}
        try:
            for t, f in picked:
                fh = handles.get(f.path) or handles.setdefault(f.path, open(f.path, "rb"))
                fh.seek(f.data_offset + t.offset)
                n = _tensor_bytes(t)
                _copy(fh, dst, n)
                dst.write(b"\0" * (-n % align))
        finally:
            for fh in handles.values():
                fh.close()
    return out


def _copy(src, dst, n: int) -> None:
    while n > 0:
        block = src.read(min(n, 1 << 22))
        if not block:
            raise GGUFError(f"{src.name} ends before its tensor data does")
        dst.write(block)
        n -= len(block)



ASSEMBLY_VERSION = 1  # bump when `assemble` writes other bytes for the same inputs


def assembly_hash(default_sha256: str, source_sha256: dict[str, str], choice: dict[str, str]) -> str:
    """The identity of the file `assemble` writes, from its inputs: the default's and the sources' sha256
    (by key of `sources`) and the tensor -> source mapping, which determine its bytes. Cheaper than hashing
    the file, and the same for the same recipe wherever it is written."""
    used = sorted(set(choice.values()))
    return canonical_hash({"assembled": ASSEMBLY_VERSION, "default": default_sha256,
                           "sources": {k: source_sha256[k] for k in used}, "choice": dict(sorted(choice.items()))})
