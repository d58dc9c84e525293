"""A tiny random-weight partial-rotary GGUF (gemma architecture, RoPE on part of each head).

llama's architecture refuses rope.dimension_count != head size; gemma (one cache, no sliding window) takes
it, so the model's K cache holds heads of ``head_dim`` values of which the first ``n_rot`` are rotated.
The tokenizer comes from the pinned tree's vocab-only GGUF, as in hybrid_fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from hybrid_fixture import _copy_tokenizer, _default_vocab, _Tensors


def make_partial_rotary_gguf(path: str | os.PathLike, head_dim: int = 128, n_rot: int = 64, n_head: int = 2,
                             n_blocks: int = 2, n_ff: int = 256, qk_scale: float = 0.15, seed: int = 0) -> Path:
    """Write the model; q and k weights get `qk_scale` so that attention is far from uniform (a corrupted K
    then moves the logits)."""
    vocab = _default_vocab()
    if vocab is None or not vocab.is_file():
        raise FileNotFoundError("no vocab-only GGUF found: set LACQ_VOCAB_GGUF")
    arch, n_embd = "gemma", head_dim * n_head
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("lacq-fixture-partial-rotary")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    n_vocab = _copy_tokenizer(writer, vocab)
    for key, value in {"context_length": 4096, "embedding_length": n_embd, "feed_forward_length": n_ff,
                       "block_count": n_blocks, "attention.head_count": n_head,
                       "attention.head_count_kv": n_head, "rope.dimension_count": n_rot}.items():
        writer.add_key_value(f"{arch}.{key}", value, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.rope.freq_base", 10000.0, gguf.GGUFValueType.FLOAT32)
    writer.add_key_value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, gguf.GGUFValueType.FLOAT32)

    t = _Tensors(writer, np.random.default_rng(seed))
    t.embd("token_embd.weight", n_vocab, n_embd)
    t.ones("output_norm.weight", n_embd)
    for i in range(n_blocks):
        p = f"blk.{i}."
        t.ones(p + "attn_norm.weight", n_embd)
        t.rand(p + "attn_q.weight", (n_embd, n_embd), scale=qk_scale)
        t.rand(p + "attn_k.weight", (n_embd, n_embd), scale=qk_scale)
        t.rand(p + "attn_v.weight", (n_embd, n_embd))
        t.rand(p + "attn_output.weight", (n_embd, n_embd))
        t.ones(p + "ffn_norm.weight", n_embd)
        t.rand(p + "ffn_gate.weight", (n_ff, n_embd))
        t.rand(p + "ffn_up.weight", (n_ff, n_embd))
        t.rand(p + "ffn_down.weight", (n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
