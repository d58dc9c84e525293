"""The GGUF reader on hostile files: real headers, mutated (truncated, bits flipped, counts, lengths and type
ids overwritten), read with a clean GGUFError or a result, in bounded time and memory, never another exception."""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import time
import tracemalloc
from pathlib import Path

import gguf
import platformdirs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import write_synthetic_gguf

from lacq.errors import GGUFError
from lacq.model.info import inspect_model
from lacq.model.reader import read_gguf

SECONDS = 2.0  # per example
PEAK_BYTES = 32 << 20  # Python allocations while reading a file of a few hundred kB at most
# Values that break readers: zero, one, sign bits, all ones, a little past what a small file holds.
NASTY = [0, 1, 2, 3, 31, 33, 0x7F, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 40,
         0x7FFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF]


def _fields(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every 4- or 8-byte field of the header, as gguf-py parses it: counts, string
    lengths, value types, array element types, dims, tensor types and offsets."""
    reader = gguf.GGUFReader(path)
    out = []
    for field in itertools.chain(reader.fields.values(), (t.field for t in reader.tensors)):
        pos = field.offset
        for part in field.parts:
            if part.nbytes in (4, 8) and part.size == 1:
                out.append((pos, part.nbytes))
            pos += part.nbytes
    return out


def _base(tmp: Path) -> Path:
    """A small model as gguf-py's writer makes it, with every kind of metadata value and a vocabulary."""
    tokens = ["<s>", "</s>", "hello", "wörld", "x" * 40]
    return write_synthetic_gguf(tmp / "base.gguf", n_blocks=2, n_head_kv=[2, 0], extra_kv={
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.5] * 5,
        "tokenizer.ggml.token_type": [1] * 5, "general.tags": ["a", "b"], "general.flag": True,
        "{arch}.rope.freq_base": 10000.0, "general.alignment": 32})


def _real_vocab() -> Path | None:
    """A GGUF written by llama.cpp's own tools (a vocabulary file of the pinned tree in the e2e cache)."""
    home = Path(os.environ.get("LACQ_TEST_HOME") or platformdirs.user_cache_dir("lacq-test"))
    return next(iter(sorted(home.glob("trees/*/llama.cpp/models/ggml-vocab-llama-spm.gguf"))), None)


@st.composite
def mutations(draw, size: int, fields: list[tuple[int, int]]):
    """A list of edits: ("cut", n), ("flip", pos, bit) or ("put", pos, width, value)."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "field", "flip", "cut"]))
        if kind == "cut":
            edits.append(("cut", draw(st.integers(0, size - 1))))
        elif kind == "flip":
            edits.append(("flip", draw(st.integers(0, size - 1)), draw(st.integers(0, 7))))
        else:
            pos, width = draw(st.sampled_from(fields))
            value = draw(st.one_of(st.sampled_from(NASTY), st.integers(0, 40),  # value and tensor type ids
                                   st.integers(0, (1 << (8 * width)) - 1)))
            edits.append(("put", pos, width, value % (1 << (8 * width))))
    return edits


def _apply(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for edit in edits:
        if edit[0] == "cut":
            del buf[edit[1]:]
        elif edit[0] == "flip" and edit[1] < len(buf):
            buf[edit[1]] ^= 1 << edit[2]
        elif edit[0] == "put" and edit[1] + edit[2] <= len(buf):
            buf[edit[1]:edit[1] + edit[2]] = edit[3].to_bytes(edit[2], "little")
    return bytes(buf)


_names = itertools.count()
OUTCOMES: dict[str, int] = {}  # what the examples ended in, printed with -s


@contextlib.contextmanager
def _address_space_cap(extra: int = 1 << 30):
    """Cap this process's address space at what it uses now plus `extra` while an example runs: a mutation that
    makes the reader allocate without bound then fails the example with MemoryError, instead of running the
    machine (and the CI job with it) out of memory before the tracemalloc check can look."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    cap = used + extra if hard == resource.RLIM_INFINITY else min(hard, used + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _read_mutated(tmp: Path, data: bytes) -> None:
    path = tmp / f"m{next(_names)}.gguf"  # a new name each time: the reader caches by path, size and mtime
    path.write_bytes(data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with _address_space_cap():
            inspect_model(path)  # the reader, then what lacq makes of its tensor table and metadata
        outcome = "read"
    except GGUFError as e:
        assert str(e) and "\n" not in str(e)
        outcome = str(e).split(": ", 1)[1][:40]
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        path.unlink()
    assert elapsed < SECONDS, f"{elapsed:.2f} s"
    assert peak < PEAK_BYTES, f"{peak} bytes allocated"
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def _fuzz(source: Path, tmp: Path, examples: int):
    data = source.read_bytes()
    read_gguf(source)  # the unmutated file reads

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutations(len(data), _fields(source)))
    def check(edits):
        _read_mutated(tmp, _apply(data, edits))

    OUTCOMES.clear()
    check()
    print(f"\n{source.name}: {sum(OUTCOMES.values())} examples:",
          ", ".join(f"{n} {what}" for what, n in sorted(OUTCOMES.items(), key=lambda kv: -kv[1])[:6]))


def test_mutated_writer_headers_read_cleanly(tmp_path):
    _fuzz(_base(tmp_path), tmp_path, examples=1000)


def test_mutated_llama_cpp_headers_read_cleanly(tmp_path):
    source = _real_vocab()
    if source is None:
        pytest.skip("no llama.cpp tree in the e2e cache (an e2e run unpacks one)")
    _fuzz(source, tmp_path, examples=200)
