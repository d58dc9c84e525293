"""Numpy reference of lacq's turbo2/turbo3/turbo4 KV-cache quantizer.

Mirrors quantize_row_turboN_ref / dequantize_row_turboN in the patched ggml
(ggml/src/ggml-quants.c) bit for bit: blocks of 32 values, one fp16 scale,
b-bit indices into a unit-variance Gaussian Lloyd-Max codebook.

Per block: rms = sqrt(sum(x^2)/32); for 13 candidate scales s = rms*m
(m = 0.70, 0.75, ..., 1.30) every value takes the index of the nearest centroid
of x/s, computed as the number of thresholds s*mid[t] strictly below x (a tie
goes to the lower index); the scale is then refit by least squares,
d = <x,c>/<c,c>, and the candidate with the largest <x,c>^2/<c,c> is kept (the
first one on ties). Sums run sequentially in float64 over float32 products, as
in C; thresholds and scales are float32 products. A block holding a non-finite
value is stored as zeros and a scale above the largest fp16 as 65504, as every
quantizer of lacq's KV types does (finite_blocks, FP16_MAX).

Layouts (bytes per block): turbo2 10 (2.5 bits/value), turbo3 14 (3.5),
turbo4 18 (4.5). Value j of a block:
  turbo2: idx = (qs[j%8] >> 2*(j//8)) & 3
  turbo3: idx = ((qs[j%8] >> 2*(j//8)) & 3) | ((qh[j//8] >> (j%8)) & 1) << 2
  turbo4: idx = qs[j] & 15 if j < 16 else qs[j-16] >> 4
"""

from __future__ import annotations

import numpy as np

QK = 32
FP16_MAX = np.float32(65504.0)  # the C quantizers store a larger scale as this, not as inf

CENTROIDS = {
    2: [-1.5104, -0.4528, 0.4528, 1.5104],
    3: [-2.1520, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1520],
    4: [-2.7326, -2.0690, -1.6181, -1.2562, -0.9424, -0.6568, -0.3881, -0.1284,
        0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326],
}
MIDS = {
    2: [-0.9816, 0.0, 0.9816],
    3: [-1.74795, -1.04995, -0.50055, 0.0, 0.50055, 1.04995, 1.74795],
    4: [-2.4008, -1.84355, -1.43715, -1.0993, -0.7996, -0.52245, -0.25825, 0.0,
        0.25825, 0.52245, 0.7996, 1.0993, 1.43715, 1.84355, 2.4008],
}
SCALE_MULTS = [0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.00, 1.05, 1.10, 1.15, 1.20, 1.25, 1.30]

BLOCK_BYTES = {2: 10, 3: 14, 4: 18}
TYPE_BITS = {"turbo2": 2, "turbo3": 3, "turbo4": 4}


def bits_per_value(bits: int) -> float:
    return BLOCK_BYTES[bits] * 8 / QK


def finite_blocks(xb: np.ndarray) -> np.ndarray:
    """xb (nblocks, block) float32 with every block that holds a non-finite value set to zeros: the C quantizers
    write such a block as zeros (ggml_kv_block_finite), which is what they write for an all-zero block."""
    return np.where(np.isfinite(xb).all(axis=1, keepdims=True), xb, np.float32(0))


def quantize_indices(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """x: (nblocks, 32) float32 -> (scales as float32 before fp16 rounding, indices uint8)."""
    x = finite_blocks(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK))
    nb = x.shape[0]
    cent = np.array(CENTROIDS[bits], dtype=np.float32)
    mids = np.array(MIDS[bits], dtype=np.float32)
    xd = x.astype(np.float64)

    sxx = np.zeros(nb)
    for j in range(QK):
        sxx = sxx + xd[:, j] * xd[:, j]
    rms = np.sqrt(sxx / QK).astype(np.float32)

    best_score = np.full(nb, -1.0)
    best_d = np.zeros(nb, dtype=np.float32)
    best_idx = np.zeros((nb, QK), dtype=np.uint8)
    for m in SCALE_MULTS:
        s = rms * np.float32(m)                       # float32 product
        thr = s[:, None] * mids[None, :]              # float32 products
        idx = (x[:, :, None] > thr[:, None, :]).sum(axis=2).astype(np.uint8)
        c = cent[idx].astype(np.float64)
        sxc = np.zeros(nb)
        scc = np.zeros(nb)
        for j in range(QK):
            sxc = sxc + xd[:, j] * c[:, j]
            scc = scc + c[:, j] * c[:, j]
        score = sxc * sxc / scc
        better = score > best_score
        best_score = np.where(better, score, best_score)
        best_d = np.where(better, (sxc / scc).astype(np.float32), best_d)
        best_idx[better] = idx[better]

    zero = ~(rms > 0)
    best_d[zero] = 0.0
    best_idx[zero] = 0
    return np.minimum(best_d, FP16_MAX), best_idx


def pack(d: np.ndarray, idx: np.ndarray, bits: int) -> bytes:
    nb = idx.shape[0]
    out = np.zeros((nb, BLOCK_BYTES[bits]), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    i = idx.astype(np.uint8)
    if bits in (2, 3):
        lo = i & 3
        out[:, 2:10] = lo[:, 0:8] | (lo[:, 8:16] << 2) | (lo[:, 16:24] << 4) | (lo[:, 24:32] << 6)
        if bits == 3:
            hi = (i >> 2) & 1
            for j in range(4):
                h = np.zeros(nb, dtype=np.uint8)
                for b in range(8):
                    h |= hi[:, 8 * j + b] << b
                out[:, 10 + j] = h
    else:
        out[:, 2:18] = i[:, 0:16] | (i[:, 16:32] << 4)
    return out.tobytes()


def quantize(x: np.ndarray, bits: int) -> bytes:
    d, idx = quantize_indices(x, bits)
    return pack(d, idx, bits)


def dequantize(data: bytes, bits: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES[bits])
    nb = raw.shape[0]
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(nb)
    j = np.arange(QK)
    if bits in (2, 3):
        qs = raw[:, 2:10]
        idx = (qs[:, j % 8] >> (2 * (j // 8))) & 3
        if bits == 3:
            qh = raw[:, 10:14]
            idx = idx | (((qh[:, j // 8] >> (j % 8)) & 1) << 2)
    else:
        qs = raw[:, 2:18]
        idx = np.where(j < 16, qs[:, j % 16] & 15, qs[:, j % 16] >> 4)
    cent = np.array(CENTROIDS[bits], dtype=np.float32)
    return (cent[idx] * d[:, None]).astype(np.float32).reshape(-1)
