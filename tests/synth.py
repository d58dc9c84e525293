"""Tiny synthetic GGUF models for layer bookkeeping tests (no weights worth running).

Tensors are named as llama's; blocks whose head_count_kv entry is 0 get a
stand-in recurrent tensor (ssm_in) instead of attention weights, as hybrid
models do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np


def write_synthetic_gguf(
    path: str | os.PathLike,
    n_blocks: int = 4,
    arch: str = "llama",
    n_head: int = 4,
    n_head_kv: int | Sequence[int] = 2,
    n_embd: int = 64,
    n_ff: int | Sequence[int] = 128,
    n_vocab: int = 256,
    extra_kv: dict[str, Any] | None = None,
    tensor_type: str = "f16",
    tied: bool = True,
    block_count: int | None = -1,
    truncate: bool = False,
    n_ctx: int = 4096,
) -> Path:
    """Write a small model; `extra_kv` keys may use "{arch}"; block_count=None omits the key."""
    path = Path(path)
    w = gguf.GGUFWriter(path, arch)
    if block_count is not None:
        w.add_block_count(n_blocks if block_count == -1 else block_count)
    w.add_context_length(n_ctx)  # above lacq's default -c 512, as every real model
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff if isinstance(n_ff, int) else list(n_ff))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv if isinstance(n_head_kv, int) else list(n_head_kv))
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value in (extra_kv or {}).items():
        _add_kv(w, key.format(arch=arch), value)

    head_dim = n_embd // n_head
    heads_kv = [n_head_kv] * n_blocks if isinstance(n_head_kv, int) else list(n_head_kv)
    ffs = [n_ff] * n_blocks if isinstance(n_ff, int) else list(n_ff)
    rng = np.random.default_rng(0)

    def add(name: str, *numpy_shape: int) -> None:
        data = rng.standard_normal(numpy_shape, dtype=np.float32)
        if len(numpy_shape) == 1 or tensor_type == "f32":
            w.add_tensor(name, data)
        elif tensor_type == "f16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[tensor_type.upper()]
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_shape=numpy_shape, raw_dtype=qtype)

    add("token_embd.weight", n_vocab, n_embd)
    for i in range(n_blocks):
        add(f"blk.{i}.attn_norm.weight", n_embd)
        if heads_kv[i] > 0:
            add(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
            add(f"blk.{i}.attn_k.weight", heads_kv[i] * head_dim, n_embd)
            add(f"blk.{i}.attn_v.weight", heads_kv[i] * head_dim, n_embd)
            add(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        else:
            add(f"blk.{i}.ssm_in.weight", 2 * n_embd, n_embd)
        if ffs[i] > 0:
            add(f"blk.{i}.ffn_norm.weight", n_embd)
            add(f"blk.{i}.ffn_gate.weight", ffs[i], n_embd)
            add(f"blk.{i}.ffn_up.weight", ffs[i], n_embd)
            add(f"blk.{i}.ffn_down.weight", n_embd, ffs[i])
    add("output_norm.weight", n_embd)
    if not tied:
        add("output.weight", n_vocab, n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 1000)
    return path


def _add_kv(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))
