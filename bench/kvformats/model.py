"""Numpy forward pass of the two test models from their GGUF weights, capturing K and V rows.

llama (SmolLM2): RMSNorm, RoPE in llama.cpp's NORM mode (adjacent pairs; convert_hf_to_gguf
permutes q/k so this matches HF), SiLU-gated FFN, tied embeddings.
gemma3 (src/models/gemma3.cpp of the pinned tree): embeddings times sqrt(n_embd), q/k RMSNorm per
head, RoPE NEOX with base rope.freq_base on global layers and 10000 (hparams default
rope_freq_base_train_swa, the GGUF has no swa key) on sliding ones, every 6th block global
(il % 6 == 5), window 512 (key visible when q_pos - k_pos < 512), Q scaled by 1/sqrt(head),
GELU-tanh-gated FFN, post-attention and post-FFN norms. Norm weights are used as stored: the
converter (conversion/gemma.py norm_shift) already added Gemma's +1.

What the cache stores, and what we return: K after norm and RoPE, V as projected, both before
the Hadamard rotation (apply it with `rotate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np


@dataclass
class Hparams:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_base: float
    rope_base_swa: float
    n_swa: int
    swa_pattern: int


def _kv(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_hparams(reader: gguf.GGUFReader) -> Hparams:
    arch = _kv(reader, "general.architecture")
    g = lambda k, d=None: _kv(reader, f"{arch}.{k}", d)  # noqa: E731
    n_embd = g("embedding_length")
    n_head = g("attention.head_count")
    head_dim = g("attention.key_length", n_embd // n_head)
    return Hparams(
        arch=arch, n_layer=g("block_count"), n_embd=n_embd, n_head=n_head,
        n_head_kv=g("attention.head_count_kv"), head_dim=head_dim,
        eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_base=float(g("rope.freq_base", 10000.0)),
        rope_base_swa=float(g("rope.freq_base_swa", 10000.0)),
        n_swa=int(g("attention.sliding_window", 0) or 0),
        swa_pattern=int(g("attention.sliding_window_pattern", 6)) if arch == "gemma3" else 0,
    )


class Weights:
    """Dequantized tensors on demand (float32, shape (ne1, ne0) = (out, in))."""

    def __init__(self, reader: gguf.GGUFReader):
        self.t = {t.name: t for t in reader.tensors}
        self.cache: dict[str, np.ndarray] = {}

    def __contains__(self, name):
        return name in self.t

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            t = self.t[name]
            a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            self.cache[name] = a.reshape(*reversed([int(x) for x in t.shape])) if a.ndim > 1 else a
        return self.cache[name]


def rms_norm(x, w, eps):
    x = x.astype(np.float32)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def rope(x, pos, base, neox):
    """x: (T, H, D). llama.cpp NORM mode rotates pairs (2i, 2i+1), NEOX pairs (i, i+D/2)."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if neox:
        out[..., : d // 2], out[..., d // 2:] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def is_swa(hp: Hparams, il: int) -> bool:
    return hp.swa_pattern > 0 and hp.n_swa > 0 and il % hp.swa_pattern < hp.swa_pattern - 1


def forward(hp: Hparams, w: Weights, tokens: np.ndarray, capture: bool = True, v_hook=None):
    """One sequence from position 0. Returns (logits (T, vocab), K list, V list); K/V per layer
    are (T, n_head_kv, head_dim) float32. v_hook(v, layer) -> v replaces each layer's V before
    attention (a simulated V cache type)."""
    T = len(tokens)
    pos = np.arange(T)
    emb = w["token_embd.weight"]
    x = emb[tokens].astype(np.float32)
    gemma = hp.arch == "gemma3"
    if gemma:
        x = x * np.float32(np.sqrt(hp.n_embd))
    D, H, Hkv = hp.head_dim, hp.n_head, hp.n_head_kv
    ks, vs = [], []
    qpos, kpos = pos[:, None], pos[None, :]
    causal = kpos <= qpos
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        h = rms_norm(x, w[p + "attn_norm.weight"], hp.eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(T, H, D)
        k = (h @ w[p + "attn_k.weight"].T).reshape(T, Hkv, D)
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, Hkv, D)
        if gemma:
            q = rms_norm(q, w[p + "attn_q_norm.weight"], hp.eps)
            k = rms_norm(k, w[p + "attn_k_norm.weight"], hp.eps)
            base = hp.rope_base_swa if is_swa(hp, il) else hp.rope_base
        else:
            base = hp.rope_base
        q = rope(q, pos, base, neox=gemma)
        k = rope(k, pos, base, neox=gemma)
        if capture:
            ks.append(k.copy())
            vs.append(v.copy())
        if v_hook is not None:
            v = v_hook(v, il)
        mask = causal
        if gemma and is_swa(hp, il):
            mask = causal & (qpos - kpos < hp.n_swa)
        rep = H // Hkv
        out = np.empty((T, H, D), dtype=np.float32)
        for hh in range(H):
            kh, vh = k[:, hh // rep], v[:, hh // rep]
            s = (q[:, hh] @ kh.T) / np.float32(np.sqrt(D))
            s = np.where(mask, s, -np.inf)
            s = s - s.max(axis=1, keepdims=True)
            e = np.exp(s)
            out[:, hh] = (e / e.sum(axis=1, keepdims=True)) @ vh
        a = out.reshape(T, H * D) @ w[p + "attn_output.weight"].T
        if gemma:
            a = rms_norm(a, w[p + "post_attention_norm.weight"], hp.eps)
        x = x + a
        h = rms_norm(x, w[p + "ffn_norm.weight"], hp.eps)
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        f = ((gelu_tanh(g) if gemma else silu(g)) * u) @ w[p + "ffn_down.weight"].T
        if gemma:
            f = rms_norm(f, w[p + "post_ffw_norm.weight"], hp.eps)
        x = x + f
    x = rms_norm(x, w["output_norm.weight"], hp.eps)
    out_w = w["output.weight"] if "output.weight" in w else emb
    return x, out_w, ks, vs


def nll_second_half(x, out_w, tokens):
    """llama-perplexity's scoring: logits at positions n/2 .. n-2 predict tokens n/2+1 .. n-1."""
    n = len(tokens)
    first = n // 2
    logits = x[first:n - 1] @ out_w.T
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    return lse - logits[np.arange(n - 1 - first), tokens[first + 1:n]]


def hadamard(n: int) -> np.ndarray:
    """ggml_gen_hadamard (src/llama-kv-cache.cpp): Sylvester order, normalized, symmetric."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def rotation_sizes(head_dim: int) -> tuple[int, int]:
    """(K, V) Hadamard sizes of llama_kv_cache::build_input_{k,v}_rot: K the largest power of two
    (>= 64) dividing the head size, V always 64."""
    nrot = 64
    while head_dim % (nrot * 2) == 0:
        nrot *= 2
    return nrot, 64


def rotate(rows: np.ndarray, n: int) -> np.ndarray:
    """rows (..., head_dim): each consecutive n-group times the Hadamard matrix."""
    shp = rows.shape
    r = rows.reshape(-1, n) @ hadamard(n)
    return r.reshape(shp)
