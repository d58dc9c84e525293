"""Tiny random-weight GGUF fixtures for KV-layer bookkeeping tests.

The models are not meant to say anything sensible: they exist so that llama.cpp
builds the same caches it would for a real model of the architecture, and the
per-layer KV-type log (``llama_kv_types: layer blk=... ord=...``) can be checked
against known block indices.

Architectures:

``lfm2``    hybrid: short-convolution blocks plus a few attention blocks (the
            memory's layer filter keeps only the attention blocks in the KV cache).
``gemma3``  iSWA: two KV caches (sliding-window blocks and full-attention blocks,
            every 6th block full); KV-layer ordinals run over both caches.

Usable as a library::

    info = make_hybrid_gguf("/tmp/lfm2.gguf", arch="lfm2")
    info["kv_blocks"]      # block indices that own attention K/V, in order

or as a script::

    python3 tests/hybrid_fixture.py OUT.gguf [--arch lfm2|gemma3] [--blocks N]

The tokenizer metadata (``tokenizer.*``) is copied from a vocab-only GGUF of the
pinned llama.cpp tree (``models/ggml-vocab-llama-spm.gguf`` by default).
Output is deterministic for given arguments (seeded numpy generator).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np

ARCHES = ("lfm2", "gemma3")

# default block layouts: lfm2 has attention in these blocks (the rest are short-conv blocks)
LFM2_DEFAULT_BLOCKS = 16
LFM2_DEFAULT_ATTN = (2, 5, 6, 9, 12, 14)
GEMMA3_DEFAULT_BLOCKS = 12
GEMMA3_SWA_PATTERN = 6  # llama.cpp's default for gemma3: every 6th block is full attention


def _default_vocab() -> Path | None:
    """A vocab-only GGUF of the pinned tree (its models/ folder), as lacq prepared it."""
    env = os.environ.get("LACQ_VOCAB_GGUF")
    if env:
        return Path(env)
    from lacq.llama.source import pinned_source
    vocab = pinned_source().path / "models" / "ggml-vocab-llama-spm.gguf"
    return vocab if vocab.is_file() else None


def _copy_tokenizer(writer: "gguf.GGUFWriter", vocab_path: Path) -> int:
    """Copy every tokenizer.* key of a vocab-only GGUF; returns the vocabulary size."""
    reader = gguf.GGUFReader(str(vocab_path))
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, value, vtype, sub_type=sub)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        else:
            writer.add_key_value(key, value, vtype)
    if n_vocab == 0:
        raise ValueError(f"{vocab_path}: no tokenizer.ggml.tokens")
    return n_vocab


class _Tensors:
    def __init__(self, writer: "gguf.GGUFWriter", rng: np.random.Generator):
        self.w = writer
        self.rng = rng
        self.count = 0

    def rand(self, name: str, shape: Sequence[int], scale: float = 0.05) -> None:
        # shape is given in numpy order (rows, cols): ggml's ne is the reverse
        a = (self.rng.standard_normal(size=tuple(shape)) * scale).astype(np.float32)
        # matrices as F16 to keep the file small; 1-D and conv kernels stay F32
        self.w.add_tensor(name, a.astype(np.float16) if len(shape) == 2 and min(shape) > 8 else a)
        self.count += 1

    def ones(self, name: str, n: int) -> None:
        self.w.add_tensor(name, np.ones((n,), dtype=np.float32))
        self.count += 1

    def embd(self, name: str, n_vocab: int, n_embd: int) -> None:
        # the embedding dominates the size: store it as Q8_0 (ggml accepts it for get_rows and the tied output)
        a = (self.rng.standard_normal(size=(n_vocab, n_embd)) * 0.05).astype(np.float32)
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        self.w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        self.count += 1


def _write_lfm2(writer, t: _Tensors, n_blocks: int, attn_blocks: Sequence[int], n_embd: int, n_head: int,
                n_head_kv: int, n_ff: int, n_vocab: int, n_ctx: int) -> None:
    arch = "lfm2"
    head_dim = n_embd // n_head
    l_cache = 3
    writer.add_key_value(f"{arch}.context_length", n_ctx, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.embedding_length", n_embd, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.feed_forward_length", n_ff, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.block_count", n_blocks, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.head_count", n_head, gguf.GGUFValueType.UINT32)
    # per-block KV head count: 0 marks a short-conv (recurrent) block
    kv_arr = [n_head_kv if i in attn_blocks else 0 for i in range(n_blocks)]
    writer.add_key_value(f"{arch}.attention.head_count_kv", kv_arr, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.rope.freq_base", 1000000.0, gguf.GGUFValueType.FLOAT32)
    writer.add_key_value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, gguf.GGUFValueType.FLOAT32)
    writer.add_key_value(f"{arch}.shortconv.l_cache", l_cache, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.vocab_size", n_vocab, gguf.GGUFValueType.UINT32)

    t.embd("token_embd.weight", n_vocab, n_embd)
    t.ones("token_embd_norm.weight", n_embd)
    for i in range(n_blocks):
        p = f"blk.{i}."
        t.ones(p + "attn_norm.weight", n_embd)
        t.ones(p + "ffn_norm.weight", n_embd)
        t.rand(p + "ffn_gate.weight", (n_ff, n_embd))
        t.rand(p + "ffn_up.weight", (n_ff, n_embd))
        t.rand(p + "ffn_down.weight", (n_embd, n_ff))
        if i in attn_blocks:
            t.ones(p + "attn_q_norm.weight", head_dim)
            t.ones(p + "attn_k_norm.weight", head_dim)
            t.rand(p + "attn_q.weight", (n_embd, n_embd))
            t.rand(p + "attn_k.weight", (n_head_kv * head_dim, n_embd))
            t.rand(p + "attn_v.weight", (n_head_kv * head_dim, n_embd))
            t.rand(p + "attn_output.weight", (n_embd, n_embd))
        else:
            t.rand(p + "shortconv.conv.weight", (n_embd, l_cache), scale=0.3)
            t.rand(p + "shortconv.in_proj.weight", (3 * n_embd, n_embd))
            t.rand(p + "shortconv.out_proj.weight", (n_embd, n_embd))


def _write_gemma3(writer, t: _Tensors, n_blocks: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int,
                  n_vocab: int, n_ctx: int, n_swa: int) -> None:
    arch = "gemma3"
    head_dim = n_embd // n_head
    writer.add_key_value(f"{arch}.context_length", n_ctx, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.embedding_length", n_embd, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.feed_forward_length", n_ff, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.block_count", n_blocks, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.head_count", n_head, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.head_count_kv", n_head_kv, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.key_length", head_dim, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.value_length", head_dim, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.sliding_window", n_swa, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.rope.freq_base", 1000000.0, gguf.GGUFValueType.FLOAT32)
    writer.add_key_value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, gguf.GGUFValueType.FLOAT32)
    writer.add_key_value(f"{arch}.vocab_size", n_vocab, gguf.GGUFValueType.UINT32)

    t.embd("token_embd.weight", n_vocab, n_embd)
    t.ones("output_norm.weight", n_embd)
    for i in range(n_blocks):
        p = f"blk.{i}."
        t.ones(p + "attn_norm.weight", n_embd)
        t.rand(p + "attn_q.weight", (n_head * head_dim, n_embd))
        t.rand(p + "attn_k.weight", (n_head_kv * head_dim, n_embd))
        t.rand(p + "attn_v.weight", (n_head_kv * head_dim, n_embd))
        t.rand(p + "attn_output.weight", (n_embd, n_head * head_dim))
        t.ones(p + "post_attention_norm.weight", n_embd)
        t.ones(p + "attn_k_norm.weight", head_dim)
        t.ones(p + "attn_q_norm.weight", head_dim)
        t.ones(p + "ffn_norm.weight", n_embd)
        t.rand(p + "ffn_gate.weight", (n_ff, n_embd))
        t.rand(p + "ffn_up.weight", (n_ff, n_embd))
        t.rand(p + "ffn_down.weight", (n_embd, n_ff))
        t.ones(p + "post_ffw_norm.weight", n_embd)


def make_hybrid_gguf(
    path: str | os.PathLike,
    arch: str = "lfm2",
    n_blocks: int | None = None,
    attn_blocks: Sequence[int] | None = None,
    n_embd: int = 64,
    n_head: int = 1,
    n_head_kv: int = 1,
    n_ff: int = 64,
    n_ctx: int = 4096,
    n_swa: int = 128,
    seed: int = 0,
    vocab_gguf: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write a tiny random-weight GGUF and describe its layout.

    Returns a dict with at least ``arch``, ``n_blocks`` and ``kv_blocks`` (block indices
    that own attention K/V, ascending; KV-layer ordinal i is ``kv_blocks[i]``), plus
    ``path``, ``n_kv``, ``head_dim`` and for iSWA models ``swa_blocks``/``full_blocks``.
    The default head size is 64 so that llama.cpp's Hadamard rotation of quantized
    caches is exercised.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown fixture arch {arch!r}; known: {', '.join(ARCHES)}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, n_head of n_head_kv")

    vocab = Path(vocab_gguf) if vocab_gguf else _default_vocab()
    if vocab is None or not vocab.is_file():
        raise FileNotFoundError("no vocab-only GGUF found: pass vocab_gguf= or set LACQ_VOCAB_GGUF")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"lacq-fixture-{arch}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    n_vocab = _copy_tokenizer(writer, vocab)
    t = _Tensors(writer, rng)

    info: dict[str, Any] = {"arch": arch, "path": str(path), "head_dim": n_embd // n_head}

    if arch == "lfm2":
        nb = LFM2_DEFAULT_BLOCKS if n_blocks is None else int(n_blocks)
        if attn_blocks is None:
            attn = list(LFM2_DEFAULT_ATTN) if n_blocks is None else [i for i in range(nb) if i % 3 == 2]
        else:
            attn = sorted(set(int(b) for b in attn_blocks))
        if not attn or attn[0] < 0 or attn[-1] >= nb:
            raise ValueError(f"attention blocks {attn} do not fit in {nb} blocks")
        _write_lfm2(writer, t, nb, attn, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx)
        info.update(n_blocks=nb, kv_blocks=list(attn), recurrent_blocks=[i for i in range(nb) if i not in attn])
    else:
        nb = GEMMA3_DEFAULT_BLOCKS if n_blocks is None else int(n_blocks)
        if attn_blocks is not None:
            raise ValueError("gemma3: every block owns K/V; attn_blocks does not apply")
        _write_gemma3(writer, t, nb, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx, n_swa)
        full = [i for i in range(nb) if i % GEMMA3_SWA_PATTERN == GEMMA3_SWA_PATTERN - 1]
        info.update(n_blocks=nb, kv_blocks=list(range(nb)), full_blocks=full,
                    swa_blocks=[i for i in range(nb) if i not in full], n_swa=n_swa)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    info["n_kv"] = len(info["kv_blocks"])
    info["n_tensors"] = t.count
    info["n_vocab"] = n_vocab
    info["bytes"] = path.stat().st_size
    return info


def boundary_blocks(info: dict[str, Any], n: int = 2) -> list[int]:
    """Block indices of KV-layer ordinals 0..n-1 and n_kv-n..n_kv-1 ("boundary n")."""
    kv = info["kv_blocks"]
    ords = sorted(set(list(range(min(n, len(kv)))) + list(range(max(0, len(kv) - n), len(kv)))))
    return [kv[o] for o in ords]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--arch", default="lfm2", choices=ARCHES)
    ap.add_argument("--blocks", type=int, default=None, help="number of blocks")
    ap.add_argument("--attn-blocks", default=None, help="lfm2: comma-separated attention block indices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", default=None, help="vocab-only GGUF to copy tokenizer.* from")
    a = ap.parse_args(argv)
    attn = [int(x) for x in a.attn_blocks.split(",")] if a.attn_blocks else None
    info = make_hybrid_gguf(a.out, arch=a.arch, n_blocks=a.blocks, attn_blocks=attn, seed=a.seed, vocab_gguf=a.vocab)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
