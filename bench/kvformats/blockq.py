"""Generic block scalar quantizer for exploring layouts: x ~ scale * codebook[idx] per block.

A layout is (codebook, block size, scale coding, scale search). Scale codings:
  f16          one fp16 scale per block
  sub<b>/<S>   one fp16 super-scale per block plus a b-bit unsigned sub-scale per S values
               (k-quant style: effective scale of a sub-block = d * u, u in 1..2^b-1)
  e8m0         power-of-two scale (8-bit exponent), indices assigned with the stored scale
  log8         8-bit log scale 2^(k/8), k = -128..127, indices assigned with the stored scale
Scale searches (all end with least-squares refit d = <x,c>/<c,c> of the chosen indices):
  grid13       turbo's: 13 candidate scales 0.70..1.30 x block RMS, best <x,c>^2/<c,c>
  iterN        closed form: s = alpha * RMS, then N rounds of (nearest index, LS refit)
  gridK        K candidates evenly spaced 0.5..1.6 x RMS (a near-exhaustive reference)
"""

from __future__ import annotations

import numpy as np


def f16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def mids_of(c):
    c = np.asarray(c, dtype=np.float32)
    return ((c[1:] + c[:-1]) / 2).astype(np.float32)


def assign(xn, mids):
    """Index of the nearest level for x/s (a value on a midpoint goes to the lower level)."""
    return np.searchsorted(mids, xn, side="left")


def _ls(x, c):
    sxc = (x * c).sum(axis=1)
    scc = (c * c).sum(axis=1)
    d = np.where(scc > 0, sxc / np.where(scc > 0, scc, 1), 0)
    return d, sxc * d  # scale and score <x,c>^2/<c,c>


def search_scale(x, cb, search="iter2", alpha=1.0):
    """x (nb, B) -> (d float32 before rounding, idx)."""
    cb = np.asarray(cb, dtype=np.float32)
    mids = mids_of(cb)
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=1)).astype(np.float32)
    safe = np.where(rms > 0, rms, 1)[:, None]
    if search.startswith("iter"):
        n = int(search[4:])
        s = safe * np.float32(alpha)
        idx = assign(x / s, mids)
        d, _ = _ls(x, cb[idx])
        for _ in range(n - 1):
            s = np.where(d > 0, d, safe[:, 0])[:, None]
            idx = assign(x / s, mids)
            d, _ = _ls(x, cb[idx])
        return d.astype(np.float32), idx
    if search == "grid13":
        mults = np.arange(13) * 0.05 + 0.70
    elif search.startswith("lin"):  # linA:B:K  K candidates from A to B x RMS
        a, b, k = search[3:].split(":")
        mults = np.linspace(float(a), float(b), int(k))
    elif search.startswith("grid"):
        mults = np.linspace(0.5, 1.6, int(search[4:]))
    else:
        raise ValueError(f"Expected search iterN, grid13 or gridK, got {search!r}")
    best = np.full(len(x), -1.0)
    bd = np.zeros(len(x), dtype=np.float32)
    bidx = np.zeros(x.shape, dtype=np.int64)
    for m in mults:
        idx = assign(x / (safe * np.float32(m * alpha)), mids)
        d, score = _ls(x, cb[idx])
        better = score > best
        best = np.where(better, score, best)
        bd = np.where(better, d, bd).astype(np.float32)
        bidx[better] = idx[better]
    return bd, bidx


def roundtrip(x, cb, block=32, scale="f16", search="iter2", alpha=1.0):
    """Quantize and dequantize rows x (..., multiple of block)."""
    shape = np.shape(x)
    cb = np.asarray(cb, dtype=np.float32)
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, block)
    mids = mids_of(cb)
    if scale == "f16":
        d, idx = search_scale(xb, cb, search, alpha)
        return (cb[idx] * f16(d)[:, None]).reshape(shape)
    if scale in ("e8m0", "log8"):
        d, _ = search_scale(xb, cb, search, alpha)
        k = 1 if scale == "e8m0" else 8
        e = np.round(k * np.log2(np.maximum(d, 1e-30))) / k
        ds = np.where(d > 0, 2.0 ** e, 0).astype(np.float32)
        idx = assign(xb / ds[:, None], mids)
        return (cb[idx] * ds[:, None]).reshape(shape)
    if scale.startswith("sub"):
        bits, sub = (int(t) for t in scale[3:].split("/"))
        xs = xb.reshape(-1, sub)
        d, _ = search_scale(xs, cb, search, alpha)
        d = d.reshape(len(xb), block // sub)
        umax = 2 ** bits - 1
        dsup = f16(d.max(axis=1) / umax)
        u = np.clip(np.round(d / np.where(dsup > 0, dsup, 1)[:, None]), 1, umax)
        eff = (dsup[:, None] * u).reshape(-1, 1)
        idx = assign(xs / np.where(eff > 0, eff, 1), mids)
        return (cb[idx] * eff).reshape(shape)
    raise ValueError(f"Expected scale f16, e8m0 or sub<bits>/<size>, got {scale!r}")


def scale_bits_per_value(block, scale):
    if scale == "f16":
        return 16 / block
    if scale in ("e8m0", "log8"):
        return 8 / block
    bits, sub = (int(t) for t in scale[3:].split("/"))
    return (16 + bits * block // sub) / block


def fit_codebook(x, cb0, block=32, search="iter2", iters=8, symmetric=True):
    """Lloyd on real rows for the scaled model: alternate (scales, indices) and the codebook's
    least-squares update c_k = sum d*x / sum d^2 over values with index k."""
    cb = np.array(cb0, dtype=np.float64)
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, block)
    for _ in range(iters):
        d, idx = search_scale(xb, cb.astype(np.float32), search)
        dd = np.repeat(d[:, None], block, axis=1).astype(np.float64)
        num = np.bincount(idx.ravel(), weights=(dd * xb).ravel(), minlength=len(cb))
        den = np.bincount(idx.ravel(), weights=(dd * dd).ravel(), minlength=len(cb))
        new = np.where(den > 0, num / np.where(den > 0, den, 1), cb)
        if symmetric:
            new = (new - new[::-1]) / 2
        # keep the codebook's overall scale fixed (unit second moment under a Gaussian-like
        # assignment is irrelevant: the block scale absorbs it); normalize the largest level
        cb = np.sort(new / np.abs(new).max() * np.abs(np.asarray(cb0)).max())
    return cb.astype(np.float32)
