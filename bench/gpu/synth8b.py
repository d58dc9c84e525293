"""A Llama-3-8B-shaped F16 GGUF with random weights, for time, memory and disk measurements (not quality).

32 blocks, 4096 wide, FFN 14336, 32 query heads and 8 KV heads of 128, untied output; the tokenizer is
the Llama-3 vocabulary of the pinned tree's models/ggml-vocab-llama-bpe.gguf (its tokenizer.* metadata
copied). Weights are drawn on the GPU with torch when there is one (16 GB of normals in seconds) and
streamed to the file one tensor at a time.

    python3 bench/gpu/synth8b.py VOCAB.gguf OUT.gguf [--blocks 32]
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np

DIM, FFN, HEADS, KV_HEADS, VOCAB_N = 4096, 14336, 32, 8, 128256


def shapes(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) in llama.cpp's order; numpy shapes are ggml's reversed."""
    kv = DIM // HEADS * KV_HEADS
    out = [("token_embd.weight", (VOCAB_N, DIM))]
    for b in range(blocks):
        p = f"blk.{b}."
        out += [(p + "attn_norm.weight", (DIM,)), (p + "attn_q.weight", (DIM, DIM)), (p + "attn_k.weight", (kv, DIM)),
                (p + "attn_v.weight", (kv, DIM)), (p + "attn_output.weight", (DIM, DIM)),
                (p + "ffn_norm.weight", (DIM,)), (p + "ffn_gate.weight", (FFN, DIM)), (p + "ffn_up.weight", (FFN, DIM)),
                (p + "ffn_down.weight", (DIM, FFN))]
    return out + [("output_norm.weight", (DIM,)), ("output.weight", (VOCAB_N, DIM))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vocab")
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=32)
    args = ap.parse_args()
    try:
        import torch
        gen = torch.Generator(device="cuda").manual_seed(0) if torch.cuda.is_available() else None
    except ImportError:
        torch, gen = None, None
    rng = np.random.default_rng(0)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        if gen is not None:
            return (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16) * std).cpu().numpy()
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    t0 = time.time()
    src = gguf.GGUFReader(args.vocab)
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name("synthetic Llama-3-8B shape, random weights")
    w.add_block_count(args.blocks)
    w.add_context_length(8192)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB_N)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, field.contents(), vtype)
    plan = shapes(args.blocks)
    for name, shape in plan:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in plan:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:  # 1/sqrt(fan-in): activations stay of order one through 32 blocks
            w.write_tensor_data(normal(shape, 1.0 / np.sqrt(shape[1])))
    w.close()
    n = sum(int(np.prod(s)) for _, s in plan)
    print(f"{args.out}: {n / 1e9:.2f} B parameters, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
