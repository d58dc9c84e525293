"""Numpy reference of lacq's tqs2/tqs3/tqs4 KV-cache quantizer.

Mirrors quantize_row_tqsN_ref / dequantize_row_tqsN in the patched ggml
(ggml/src/ggml-quants.c) and the CPU backend's AVX-512 quantizer bit for bit:
blocks of 64 values, an fp16 super-scale d, a 4-bit sub-scale u_i per 16 values,
b-bit indices into turbo's unit-variance Gaussian Lloyd-Max codebook
(turbo_ref.CENTROIDS; same thresholds).

Per sub-block of 16 values: rms = sqrt(sum x^2 / 16); for 7 candidate scales
s = rms*m (m = 0.6, 0.7, ..., 1.2) every value takes the index of the nearest
centroid of x/s, counted as the thresholds s*mid[t] strictly below x; the
candidate with the largest <x,c>^2/<c,c> (the first on ties) gives the
least-squares scale s_i = <x,c>/<c,c>. Then d = fp16(max_i s_i / 15),
u_i = min(15, floor(s_i/d + 0.5)), at least 1 when s_i > 0, 0 for an all-zero
sub-block; final indices against the scale d*u_i. An all-zero block (or d
rounding to 0) stores zeros.

Sums of 16 products are float64 over exact products of float32 values, added
pairwise in a fixed order (j + (j+8), then + 4, + 2, + 1), which is what one
16-lane register or a half warp computes; thresholds and scales are float32
products, as in C.

Layouts (bytes per block of 64): tqs2 20 (2.5 bits/value), tqs3 28 (3.5),
tqs4 36 (4.5). Offsets: 0 d; 2 sc[2], u_i = (sc[i//2] >> 4*(i%2)) & 15;
4 qs. Index of value j:
  tqs2: (qs[j%16] >> 2*(j//16)) & 3
  tqs3: the same, plus bit 2 = (qh[j//8] >> (j%8)) & 1 with qh at offset 20
  tqs4: (qs[j%32] >> 4*(j//32)) & 15
Value j = C[idx_j] * (d * u_{j//16}).
"""

from __future__ import annotations

import numpy as np

from lacq.plan.kv import turbo_ref

QK = 64
SUB = 16
SUB_BITS = 4
SCALE_MULTS = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2]
BLOCK_BYTES = {2: 20, 3: 28, 4: 36}
TYPE_BITS = {"tqs2": 2, "tqs3": 3, "tqs4": 4}
TYPES = TYPE_BITS  # the research scripts' name


def bits_per_value(bits: int) -> float:
    return BLOCK_BYTES[bits] * 8 / QK


def _codebook(bits: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.array(turbo_ref.CENTROIDS[bits], dtype=np.float32),
            np.array(turbo_ref.MIDS[bits], dtype=np.float32))


def _count_below(x: np.ndarray, s: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """x (n, 16) float32, s (n,) float32 -> number of thresholds s*mid strictly below x."""
    thr = s[:, None] * mids[None, :]                       # float32 products
    return (x[:, :, None] > thr[:, None, :]).sum(axis=2).astype(np.uint8)


def pairwise_sum(p: np.ndarray) -> np.ndarray:
    """(..., n) float64, n a power of two -> (...): p[j] + p[j+n/2], then the halves again down to one
    (the C order: what one SIMD register or a group of lanes computes)."""
    h = p.shape[-1] // 2
    while h:
        p = p[..., :h] + p[..., h:2 * h]
        h //= 2
    return p[..., 0]


def ls_sub_scales(xs: np.ndarray, bits: int, mults) -> np.ndarray:
    """xs (n, sub) float32 -> the least-squares scale of the best of the candidate scales rms*m (float32):
    for each m in order every value takes the nearest centroid of x/(rms*m), and the candidate with the largest
    <x,c>^2/<c,c> (the first on ties) gives <x,c>/<c,c>; 0 for an all-zero sub-block. tqs and tql share it."""
    cent, mids = _codebook(bits)
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    xd = xs.astype(np.float64)
    rms = np.sqrt(pairwise_sum(xd * xd) / xs.shape[1]).astype(np.float32)
    best = np.full(len(xs), -1.0)
    bs = np.zeros(len(xs), dtype=np.float32)
    for m in mults:
        idx = _count_below(xs, rms * np.float32(m), mids)
        c = cent[idx].astype(np.float64)
        sxc, scc = pairwise_sum(xd * c), pairwise_sum(c * c)
        score = sxc * sxc / scc
        better = score > best
        best = np.where(better, score, best)
        bs = np.where(better, (sxc / scc).astype(np.float32), bs)
    bs[~(rms > 0)] = 0.0
    return bs


def sub_scales(xs: np.ndarray, bits: int) -> np.ndarray:
    """xs (n, 16) float32 -> least-squares scale of the best of the 7 candidates (float32)."""
    return ls_sub_scales(xs, bits, SCALE_MULTS)


def quantize_fields(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., multiple of 64) -> (d fp16 (nb,), u uint8 (nb, 4), idx uint8 (nb, 64))."""
    xb = turbo_ref.finite_blocks(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK))
    nb = len(xb)
    s = sub_scales(xb.reshape(-1, SUB), bits).reshape(nb, QK // SUB)
    umax = 2 ** SUB_BITS - 1
    d = np.minimum(s.max(axis=1) / np.float32(umax), turbo_ref.FP16_MAX).astype(np.float16)
    df = d.astype(np.float32)
    ok = df > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.floor(s / np.where(ok, df, np.float32(1))[:, None] + np.float32(0.5))
    u = np.where((s > 0) & ok[:, None], np.clip(r, 1, umax), 0).astype(np.uint8)
    eff = np.where(ok[:, None], df[:, None] * u.astype(np.float32), np.float32(0)).astype(np.float32)
    _, mids = _codebook(bits)
    idx = _count_below(xb.reshape(-1, SUB), eff.reshape(-1), mids).reshape(nb, QK)
    idx[~(eff.repeat(SUB, axis=1) > 0)] = 0
    d[~ok] = 0
    return d, u, idx


def pack_indices(out: np.ndarray, idx: np.ndarray, bits: int) -> None:
    """Indices (nb, 64) -> bytes 4.. of each block row of out (nb, BLOCK_BYTES[bits])."""
    nb = len(out)
    i = idx.astype(np.uint8)
    if bits == 4:
        out[:, 4:36] = i[:, 0:32] | (i[:, 32:64] << 4)
    else:
        lo = i & 3
        out[:, 4:20] = lo[:, 0:16] | (lo[:, 16:32] << 2) | (lo[:, 32:48] << 4) | (lo[:, 48:64] << 6)
        if bits == 3:
            hi = ((i >> 2) & 1).reshape(nb, 8, 8)
            out[:, 20:28] = (hi << np.arange(8, dtype=np.uint8)).sum(axis=2).astype(np.uint8)


def unpack_indices(raw: np.ndarray, bits: int) -> np.ndarray:
    """Block rows (nb, BLOCK_BYTES[bits]) -> indices (nb, 64)."""
    j = np.arange(QK)
    if bits == 4:
        return (raw[:, 4 + j % 32] >> (4 * (j // 32))) & 15
    idx = (raw[:, 4 + j % 16] >> (2 * (j // 16))) & 3
    if bits == 3:
        idx = idx | (((raw[:, 20 + j // 8] >> (j % 8)) & 1) << 2)
    return idx


def pack(d: np.ndarray, u: np.ndarray, idx: np.ndarray, bits: int) -> bytes:
    nb = len(d)
    out = np.zeros((nb, BLOCK_BYTES[bits]), dtype=np.uint8)
    out[:, 0:2] = np.asarray(d, dtype=np.float16).view(np.uint8).reshape(nb, 2)
    out[:, 2] = u[:, 0] | (u[:, 1] << 4)
    out[:, 3] = u[:, 2] | (u[:, 3] << 4)
    pack_indices(out, idx, bits)
    return out.tobytes()


def quantize(x: np.ndarray, bits: int) -> bytes:
    return pack(*quantize_fields(x, bits), bits)


def dequantize(data: bytes, bits: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES[bits])
    nb = len(raw)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(nb)
    sub = np.arange(QK) // SUB
    u = (raw[:, 2 + sub // 2] >> (4 * (sub % 2))) & 15                      # (nb, 64)
    idx = unpack_indices(raw, bits)
    cent, _ = _codebook(bits)
    scale = (d[:, None] * u.astype(np.float32)).astype(np.float32)
    return (cent[idx] * scale).astype(np.float32).reshape(-1)


def roundtrip(x: np.ndarray, bits: int) -> np.ndarray:
    return dequantize(quantize(x, bits), bits).reshape(np.shape(x))
