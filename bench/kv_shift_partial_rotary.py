"""The K shift of a rotated cache on a partial-rotary model, before and after patch 0002's fix (issue 19, item 1).

A numpy emulation of the graph llama_kv_cache::build_graph_shift makes, on random K rows: the cache stores K
rotated by a Hadamard matrix of the head's size; before the fix the shift un-rotated, RoPE'd and re-rotated a view
of the first n_rot values of each head, reshaped into rows of the Hadamard's size (so with n_rot < head size one
row held parts of two heads); after it, the whole head. Prints the relative error of the shifted K against the K a
fresh evaluation at the new positions stores. (On the CPU the old graph aborted before it could be measured: the
quantized layers' view cannot be cast.) Usage: python3 bench/kv_shift_partial_rotary.py
"""

from __future__ import annotations

import numpy as np


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of size n, orthonormal (ggml_gen_hadamard's)."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rope_neox(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float = 10000.0) -> np.ndarray:
    """x (cells, heads, d): RoPE of the first n_rot values of each head at positions pos, NEOX pairing."""
    x = x.copy()
    half = n_rot // 2
    theta = pos[:, None] * base ** (-np.arange(half) * 2.0 / n_rot)
    c, s = np.cos(theta), np.sin(theta)
    a, b = x[..., :half].copy(), x[..., half:n_rot].copy()
    x[..., :half] = a * c[:, None, :] - b * s[:, None, :]
    x[..., half:n_rot] = a * s[:, None, :] + b * c[:, None, :]
    return x


def main() -> None:
    rng = np.random.default_rng(0)
    d, n_head, n = 128, 2, 160
    h = hadamard(d)
    for n_rot, shift in ((64, 5), (64, 64), (32, 64)):
        k = rng.standard_normal((n, n_head, d))
        pos = np.arange(n, dtype=float)
        cache = rope_neox(k, pos + shift, n_rot) @ h.T       # stored rotated, written at positions p + shift
        want = rope_neox(k, pos, n_rot) @ h.T                # what a fresh evaluation at p stores
        delta = np.full(n, -float(shift))
        # before: the first n_rot values of each head, reshaped into rows of the Hadamard's size
        rows = cache[:, :, :n_rot].reshape(-1, d) @ h.T
        shifted = rope_neox(rows.reshape(n, n_head, n_rot), delta, n_rot).reshape(-1, d) @ h.T
        old = cache.copy()
        old[:, :, :n_rot] = shifted.reshape(n, n_head, n_rot)
        # after: the whole head
        new = rope_neox(cache @ h.T, delta, n_rot) @ h.T
        rel_old, rel_new = (float(np.linalg.norm(a - want) / np.linalg.norm(want)) for a in (old, new))
        print(f"head {d}, n_rot {n_rot}, shift {shift}: relative error before {rel_old:.3f}, after {rel_new:.1e}")


if __name__ == "__main__":
    main()
