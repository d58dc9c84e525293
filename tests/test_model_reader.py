"""The one GGUF reader agrees with gguf-py's GGUFReader on what lacq reads, and refuses damage cleanly."""

from __future__ import annotations

import time
import tracemalloc

import gguf
import numpy as np
import pytest
from cliutil import assert_clean_error, run_cli
from synth import write_synthetic_gguf

from lacq.errors import GGUFError
from lacq.model.info import inspect_model
from lacq.model.reader import read_gguf
from lacq.model.tokenizer import chat_metadata, has_tokenizer, tokenizer_fingerprint

TOKENS = ["<s>", "</s>", "hello", "wörld", "x" * 300]
TOKENIZER = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.bos_token_id": 0,
             "tokenizer.ggml.eos_token_id": 3, "tokenizer.ggml.scores": [0.5, 1.0, -1.0, 2.0, 0.0],
             "tokenizer.chat_template": "{{ messages }}"}


def _agree_with_gguf_py(path):
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    for name, field in theirs.fields.items():
        if name.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        if name in ours.arrays:
            assert ours.array_len(name) == len(field.data), name
        else:
            assert ours.get(name) == field.contents(), name
    assert [(t.name, t.shape, t.type) for t in ours.tensors] == \
        [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in theirs.tensors]
    assert [ours.data_offset + t.offset for t in ours.tensors] == [int(t.data_offset) for t in theirs.tensors]
    return ours


def test_synthetic_model_reads_like_gguf_py(tmp_path):
    f = _agree_with_gguf_py(write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2, extra_kv=TOKENIZER))
    assert set(f.arrays) == {"tokenizer.ggml.tokens", "tokenizer.ggml.scores"}  # skipped, not decoded
    assert f.array_len("tokenizer.ggml.tokens") == 5
    assert [f.string_at("tokenizer.ggml.tokens", i) for i in range(5)] == TOKENS
    assert f.string_at("tokenizer.ggml.tokens", 5) is None


@pytest.mark.e2e
def test_smollm2_reads_like_gguf_py(smollm2):
    f = _agree_with_gguf_py(smollm2)
    assert f.array_len("tokenizer.ggml.tokens") == 49152 and f.array_len("tokenizer.ggml.merges") == 48900


def test_tokenizer_metadata(tmp_path):
    m = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=1, extra_kv=TOKENIZER)
    assert has_tokenizer(m)
    assert chat_metadata(m) == ("{{ messages }}", "<s>", "wörld")
    other = write_synthetic_gguf(tmp_path / "o.gguf", n_blocks=1,
                                 extra_kv={**TOKENIZER, "tokenizer.ggml.tokens": TOKENS[:-1] + ["y"]})
    same = write_synthetic_gguf(tmp_path / "s.gguf", n_blocks=2, extra_kv=TOKENIZER)
    assert tokenizer_fingerprint(m) == tokenizer_fingerprint(same)
    assert tokenizer_fingerprint(m) != tokenizer_fingerprint(other)
    bare = write_synthetic_gguf(tmp_path / "b.gguf", n_blocks=1)
    assert not has_tokenizer(bare) and chat_metadata(bare) == (None, "", "")


def test_a_rewritten_file_is_read_again(tmp_path):
    path = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=1)
    assert len(read_gguf(path).tensors) > 0
    n = len(read_gguf(path).tensors)
    write_synthetic_gguf(path, n_blocks=3)  # same path, new size and mtime: the cache must not answer
    assert len(read_gguf(path).tensors) > n


@pytest.mark.parametrize("cut", [3, 10, 24, 200, -1])
def test_cut_headers_are_refused_in_one_line(tmp_path, cut):
    whole = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=1, extra_kv=TOKENIZER).read_bytes()
    header_end = read_gguf(tmp_path / "m.gguf").data_offset
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(whole[:cut if cut > 0 else header_end - 5])
    with pytest.raises(GGUFError, match="not a GGUF|truncated|unreadable"):
        read_gguf(bad)


def test_unknown_version_is_refused(tmp_path):
    whole = bytearray(write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=1).read_bytes())
    whole[4:8] = (99).to_bytes(4, "little")
    (tmp_path / "v.gguf").write_bytes(bytes(whole))
    with pytest.raises(GGUFError, match="version 99"):
        read_gguf(tmp_path / "v.gguf")


# -- hostile files: a clean GGUFError naming the problem, bounded time and memory

def _tensor_type_offset(path) -> int:
    """Where the first tensor's type id is: after its name length, name, n_dims and dims."""
    f = gguf.GGUFReader(path).tensors[0].field
    return f.offset + sum(part.nbytes for part in f.parts[:4])


def _patched(path, offset: int, value: bytes):
    data = bytearray(path.read_bytes())
    data[offset:offset + len(value)] = value
    out = path.with_name(f"patched-{offset}-{value.hex()}.gguf")
    out.write_bytes(bytes(data))
    return out


def _with_alignment(tmp_path, value: int):
    path = write_synthetic_gguf(tmp_path / "a.gguf", n_blocks=1, extra_kv={"general.alignment": 32})
    at = path.read_bytes().index(b"general.alignment") + len("general.alignment") + 4  # after the value type
    return _patched(path, at, value.to_bytes(4, "little"))


def _with_array(tmp_path, key: str, count: int):
    """A model whose `key` holds `count` u32 elements, spliced into the writer's 8-element array: the
    inserted bytes are a multiple of the alignment, so the tensor data stays where the offsets say."""
    assert (count - 8) * 4 % 32 == 0
    path = write_synthetic_gguf(tmp_path / "small.gguf", n_blocks=1, extra_kv={key: [7] * 8})
    data = path.read_bytes()
    at = data.index(key.encode()) + len(key) + 8  # after the value type and the element type
    out = tmp_path / f"array-{count}.gguf"
    with open(out, "wb") as f:
        f.write(data[:at] + count.to_bytes(8, "little"))
        f.write(np.full(count, 7, "<u4").tobytes())
        f.write(data[at + 8 + 8 * 4:])
    return out


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_alignment_that_is_not_a_power_of_two_is_refused(tmp_path, alignment):
    with pytest.raises(GGUFError, match=f"general.alignment = {alignment}: must be a positive power of two"):
        read_gguf(_with_alignment(tmp_path, alignment))


def test_alignment_of_a_larger_power_of_two_reads(tmp_path):
    assert read_gguf(_with_alignment(tmp_path, 64)).get("general.alignment") == 64


def test_an_unknown_tensor_type_is_refused_by_name(tmp_path):
    path = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=1)
    bad = _patched(path, _tensor_type_offset(path), (200).to_bytes(4, "little"))
    with pytest.raises(GGUFError, match="tensor 'token_embd.weight' has type id 200, unknown .* newer llama.cpp"):
        read_gguf(bad)


def test_nested_arrays_and_impossible_counts_are_refused(tmp_path):
    path = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2, n_head_kv=[2, 2])
    key = b"llama.attention.head_count_kv"
    at = path.read_bytes().index(key) + len(key) + 4  # the element type
    with pytest.raises(GGUFError, match="arrays of value type 9 are not GGUF"):
        read_gguf(_patched(path, at, (9).to_bytes(4, "little")))
    with pytest.raises(GGUFError, match="claims 1099511627776 items"):
        read_gguf(_patched(path, at + 4, (1 << 40).to_bytes(8, "little")))
    with pytest.raises(GGUFError, match="metadata count .* claims"):
        read_gguf(_patched(path, 16, (1 << 62).to_bytes(8, "little")))


def test_small_arrays_outside_the_tokenizer_are_decoded_as_gguf_py_does(tmp_path):
    extra = {"general.ints": list(range(-500, 500)), "general.floats": [i / 7 for i in range(1000)],
             "general.flags": [True, False] * 10, "general.names": ["a", "bé", ""]}
    f = _agree_with_gguf_py(write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2, extra_kv=extra))
    assert f.get("general.ints")[:3] == [-500, -499, -498] and f.get("general.names") == ["a", "bé", ""]


def test_a_20_mb_array_is_spanned_not_decoded(tmp_path):
    path = _with_array(tmp_path, "general.big", 5_000_000)  # 20 MB of u32
    tracemalloc.start()
    start = time.perf_counter()
    f = read_gguf(path)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f.has("general.big") and f.array_len("general.big") == 5_000_000 and f.get("general.big") is None
    assert [t.name for t in f.tensors] == [t.name for t in read_gguf(tmp_path / "small.gguf").tensors]
    inspect_model(path)  # the tensor data is where the offsets say, past the array
    assert elapsed < 1.5, f"{elapsed:.2f} s"  # element by element it took 9-10 s
    assert peak < 4 << 20, f"{peak} bytes"  # and 170 MB of Python ints


def test_inspect_refuses_hostile_files_in_one_line(tmp_path):
    path = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=1)
    hostile = {
        "must be a positive power of two": _with_alignment(tmp_path, 0),
        "has type id 200": _patched(path, _tensor_type_offset(path), (200).to_bytes(4, "little")),
        "metadata count": _patched(path, 16, (1 << 62).to_bytes(8, "little")),
        "truncated": tmp_path / "cut.gguf",
    }
    hostile["truncated"].write_bytes(path.read_bytes()[:300])
    for needle, bad in hostile.items():
        result = run_cli("inspect", bad)
        assert_clean_error(result, needle)
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_hostile_block_count_is_refused_before_any_per_block_list(tmp_path):
    """A block count of four billion (one overwritten u32) once built per-block lists until the machine ran out of
    memory (the fuzzer found it on llama.cpp's vocab GGUF); it is refused by name instead."""
    path = write_synthetic_gguf(tmp_path / "b.gguf", n_blocks=1)
    key = b"llama.block_count"
    at = path.read_bytes().index(key) + len(key) + 4  # after the value type
    path = _patched(path, at, (0xFFFFFFF0).to_bytes(4, "little"))
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=r"llama.block_count = 4294967280 is not a block count"):
            inspect_model(path)
        assert tracemalloc.get_traced_memory()[1] < 32 << 20
    finally:
        tracemalloc.stop()
