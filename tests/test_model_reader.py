"""The one GGUF reader agrees with gguf-py's GGUFReader on what lacq reads, and refuses damage cleanly."""

from __future__ import annotations

import gguf
import pytest
from synth import write_synthetic_gguf

from lacq.errors import GGUFError
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
