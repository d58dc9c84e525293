"""Numpy reference of lacq's tql2/tql3 (patch 0013) and tql4 (patch 0015) KV-cache quantizers.

tql is tqs's block (64 values, fp16 super-scale d, turbo's Gaussian Lloyd-Max
codebooks, the same index packing and sizes: 20 / 28 bytes, 2.5 / 3.5
bits/value) with the 16 sub-scale bits spent differently: a 2-bit exponent e_i
per 8 values instead of a 4-bit linear sub-scale per 16, and the sub-block's
scale is d * L[e_i] with L[e] = 2^(-0.35 e) (1, 0.785, 0.616, 0.483). Finer
scale placement buys more than finer scale values at 2 and 3 bits: on real
rotated rows the relative MSE is 13% / 9% below tqs2 / tqs3
(bench/kvformats/README.md). At 4 bits that rule is worse than tqs4; tql4 (tqs4's block, 36 bytes,
4.5 bits/value, L4[e] = 2^(-0.25 e)) chooses the exponents by squared error instead: see
quantize_fields4.

Quantizer, per sub-block of 8 values: rms = sqrt(sum x^2 / 8); for 3 candidate
scales s = rms*m (m = 0.7, 0.9, 1.1) every value takes the index of the nearest
centroid of x/s (the number of thresholds s*mid[t] strictly below x); the
candidate with the largest <x,c>^2/<c,c> (the first on ties) gives the
least-squares scale s_i = <x,c>/<c,c>. Then d = fp16(max_i s_i); the exponent
e_i is the number of thresholds d*T[k] strictly above s_i, T[k] = 2^(-0.35 (k+0.5))
(the geometric midpoints of L); final indices against d*L[e_i]. A block whose d
is 0 stores zeros. 4 comparisons per value (tqs: 8, turbo: 13).

Sums of 8 products are float64 over exact products of float32 values, added
pairwise (j + (j+4), then + 2, + 1), so FMA contraction cannot change them;
thresholds and scales are float32 products.

Layout (bytes per block of 64): 0 d; 2 sc[2], e_i = (sc[i//4] >> 2*(i%4)) & 3;
4 qs (and tql3: 20 qh), indices packed as tqs2 / tqs3.
Value j = C[idx_j] * (d * L[e_{j//8}]).
"""

from __future__ import annotations

import numpy as np

from lacq.plan.kv.tqs_ref import QK, _codebook, _count_below, ls_sub_scales, pack_indices, pairwise_sum, unpack_indices
from lacq.plan.kv.turbo_ref import FP16_MAX, finite_blocks

SUB = 8
SCALE_MULTS = [0.7, 0.9, 1.1]
EXP_STEP = 0.35
# the float32 roundings of the powers of two are the C tables' literals (tql_levels, tql_thresholds, tql4_levels)
LEVELS = (2.0 ** (-EXP_STEP * np.arange(4))).astype(np.float32)
THRESHOLDS = (2.0 ** (-EXP_STEP * (np.arange(3) + 0.5))).astype(np.float32)   # geometric midpoints of LEVELS
# tql4: exponent step 0.25, exponents chosen by squared error at 3 super-scales (see quantize_fields4)
EXP_STEP4 = 0.25
LEVELS4 = (2.0 ** (-EXP_STEP4 * np.arange(4))).astype(np.float32)
SUPER_MULTS4 = np.array([0.9, 1.0, 1.1], dtype=np.float32)
BLOCK_BYTES = {2: 20, 3: 28, 4: 36}
TYPE_BITS = {"tql2": 2, "tql3": 3, "tql4": 4}


def bits_per_value(bits: int) -> float:
    return BLOCK_BYTES[bits] * 8 / QK


def sub_scales(xs: np.ndarray, bits: int) -> np.ndarray:
    """xs (n, 8) float32 -> least-squares scale of the best of the 3 candidates (float32)."""
    return ls_sub_scales(xs, bits, SCALE_MULTS)


def quantize_fields(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., multiple of 64) -> (d fp16 (nb,), e uint8 (nb, 8), idx uint8 (nb, 64))."""
    xb = finite_blocks(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK))
    nb = len(xb)
    s = sub_scales(xb.reshape(-1, SUB), bits).reshape(nb, QK // SUB)
    d = np.minimum(s.max(axis=1), FP16_MAX).astype(np.float16)
    df = d.astype(np.float32)
    ok = df > 0
    thr = (df[:, None] * THRESHOLDS[None, :]).astype(np.float32)           # (nb, 3)
    e = (s[:, :, None] < thr[:, None, :]).sum(axis=2).astype(np.uint8)     # (nb, 8)
    e[~ok] = 0
    eff = (df[:, None] * LEVELS[e]).astype(np.float32)
    _, mids = _codebook(bits)
    idx = _count_below(xb.reshape(-1, SUB), eff.reshape(-1), mids).reshape(nb, QK)
    idx[~ok] = 0
    d[~ok] = 0
    return d, e, idx


def quantize_fields4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tql4: the sub-block scales s_i as for tql2/3 (4-bit codebook); then for each super-scale
    d = fp16(max s_i * g), g = 0.9, 1.0, 1.1 in that order, and each sub-block, the exponent e in 0..3
    with the least squared error at the scale d*LEVELS4[e] (the first on ties); the super-scale with the
    least total error (the first on ties) is kept. Error terms: r = float(x - s*c) (double arithmetic, the
    product exact), squared exactly in double, summed pairwise; so FMA contraction changes nothing."""
    bits = 4
    xb = finite_blocks(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK))
    nb = len(xb)
    xs = xb.reshape(nb, QK // SUB, SUB)
    s = sub_scales(xs.reshape(-1, SUB), bits).reshape(nb, QK // SUB)
    smax = s.max(axis=1)
    cent, mids = _codebook(bits)
    best = np.full(nb, np.inf)
    d_out = np.zeros(nb, dtype=np.float16)
    e_out = np.zeros((nb, QK // SUB), dtype=np.uint8)
    i_out = np.zeros((nb, QK), dtype=np.uint8)
    xd = xs.astype(np.float64)
    for g in SUPER_MULTS4:
        dh = np.minimum((smax * g).astype(np.float32), FP16_MAX).astype(np.float16)
        df = dh.astype(np.float32)
        errs, idxs = [], []
        for lv in LEVELS4:
            se = (df * lv).astype(np.float32)                                  # (nb,)
            idx = _count_below(xs.reshape(-1, SUB), np.repeat(se, QK // SUB), mids).reshape(nb, QK // SUB, SUB)
            r = (xd - se.astype(np.float64)[:, None, None] * cent[idx].astype(np.float64)).astype(np.float32)
            rd = r.astype(np.float64)
            errs.append(pairwise_sum(rd * rd))                                   # (nb, 8)
            idxs.append(idx)
        errs = np.stack(errs)                                                  # (4, nb, 8)
        e = errs.argmin(axis=0)                                                # first minimum
        emin = np.take_along_axis(errs, e[None], 0)[0]
        tot = pairwise_sum(emin)
        take = (df > 0) & (tot < best)
        best = np.where(take, tot, best)
        d_out[take] = dh[take]
        e_out[take] = e[take]
        chosen = np.take_along_axis(np.stack(idxs), e[None, :, :, None], 0)[0].reshape(nb, QK)
        i_out[take] = chosen[take]
    return d_out, e_out, i_out


def pack(d: np.ndarray, e: np.ndarray, idx: np.ndarray, bits: int) -> bytes:
    nb = len(d)
    out = np.zeros((nb, BLOCK_BYTES[bits]), dtype=np.uint8)
    out[:, 0:2] = np.asarray(d, dtype=np.float16).view(np.uint8).reshape(nb, 2)
    e = e.astype(np.uint8)
    for b in range(2):
        out[:, 2 + b] = e[:, 4 * b] | (e[:, 4 * b + 1] << 2) | (e[:, 4 * b + 2] << 4) | (e[:, 4 * b + 3] << 6)
    pack_indices(out, idx, bits)
    return out.tobytes()


def quantize(x: np.ndarray, bits: int) -> bytes:
    fields = quantize_fields4(x) if bits == 4 else quantize_fields(x, bits)
    return pack(*fields, bits)


def dequantize(data: bytes, bits: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES[bits])
    nb = len(raw)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(nb)
    sub = np.arange(QK) // SUB
    e = (raw[:, 2 + sub // 4] >> (2 * (sub % 4))) & 3                       # (nb, 64)
    idx = unpack_indices(raw, bits)
    cent, _ = _codebook(bits)
    scale = (d[:, None] * (LEVELS4 if bits == 4 else LEVELS)[e]).astype(np.float32)
    return (cent[idx] * scale).astype(np.float32).reshape(-1)


def roundtrip(x: np.ndarray, bits: int) -> np.ndarray:
    return dequantize(quantize(x, bits), bits).reshape(np.shape(x))
