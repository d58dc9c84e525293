"""What each KV layer holds in a llama-perplexity run: cells of the full-context and the sliding-window cache, and
values per layer (iSWA models' sliding-window layers hold their window, not the context)."""

from __future__ import annotations

from lacq.model.info import ModelInfo

# What lacq's llama-perplexity runs keep of llama.cpp's defaults (common/common.h): -b 2048, -ub 512.
PERPLEXITY_BATCH, PERPLEXITY_UBATCH = 2048, 512
KV_PAD = 256  # llama_context pads n_ctx and n_ctx_seq to 256 cells; llama_kv_cache_iswa its SWA cache too


def kv_cells(info: ModelInfo, ctx: int) -> tuple[int, int]:
    """(cells of the full-context cache, cells of the sliding-window cache) that llama-perplexity allocates per
    sequence for chunks of `ctx` tokens, as the pinned llama.cpp sizes them: tools/perplexity (n_batch / ctx
    sequences of ctx tokens), llama_context (n_ctx padded, n_ctx_seq = n_ctx / sequences padded, n_ubatch =
    min(n_batch, 512)) and llama_kv_cache_iswa (the SWA cache: min(n_ctx_seq, n_swa + n_ubatch), padded)."""
    pad = lambda n: -(-n // KV_PAD) * KV_PAD
    n_seq = max(1, PERPLEXITY_BATCH // ctx)
    full = pad(pad(n_seq * ctx) // n_seq)
    n_ubatch = min(PERPLEXITY_BATCH, n_seq * ctx, PERPLEXITY_UBATCH)
    return full, pad(min(full, info.swa_window + n_ubatch)) if info.is_iswa else full


def layer_values(info: ModelInfo, ctx: int | None, cache: str) -> list[float]:
    """Values each KV layer's `cache` ("k", "v" or "both") holds for chunks of `ctx` tokens: its cells (`kv_cells`:
    an iSWA model's sliding-window layers hold their window, not the context) × its K and/or V values per cell.
    `ctx` None (a run whose context is not known): per cell, as if every layer held as many."""
    full, window = kv_cells(info, ctx) if ctx else (1, 1)
    out = []
    for block in info.kv_blocks:
        heads = info.n_head_kv[block] if isinstance(info.n_head_kv, tuple) else info.n_head_kv
        per_token = heads * ((info.head_dim if cache in ("k", "both") else 0) +
                             (info.head_dim_v if cache in ("v", "both") else 0))
        out.append(float(per_token * (window if block in info.swa_blocks else full)))
    return out
