"""Reference quantizers for the KV-format study, all round trips x -> x_hat on (n, 32k) rows.

ggml's q8_0, q5_0, q4_0, q4_1 (quantize_row_*_ref in ggml/src/ggml-quants.c: fp16 scale
d = max/-8 (q4_0), max/-16 (q5_0), amax/127 (q8_0), (max-min)/15 and min (q4_1); q4_0/q5_0
truncate x/d + 8.5 (16.5) toward zero and clamp to 15 (31); q8_0 rounds half away from zero),
lacq's turbo2/3/4 (lacq.plan.kv.turbo_ref, bit-exact with the patched C), and a generic block scalar
quantizer used to explore new layouts.
"""

from __future__ import annotations

import numpy as np

from lacq.plan.kv import turbo_ref

QK = 32


def f16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def _blocks(x, qk=QK):
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, qk)


def q8_0(x):
    b = _blocks(x)
    amax = np.abs(b).max(axis=1)
    d = amax / 127.0
    idd = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = b * idd[:, None]
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -128, 127)  # roundf
    return (q * f16(d)[:, None]).reshape(np.shape(x))


def _q_signed_max(b, nlev_half, offset):
    i = np.abs(b).argmax(axis=1)
    mx = b[np.arange(len(b)), i]
    d = (mx / -nlev_half).astype(np.float32)
    idd = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(2 * nlev_half - 1, np.trunc(b * idd[:, None] + np.float32(offset)))
    return (q - nlev_half) * f16(d)[:, None]


def q4_0(x):
    return _q_signed_max(_blocks(x), 8, 8.5).reshape(np.shape(x))


def q5_0(x):
    return _q_signed_max(_blocks(x), 16, 16.5).reshape(np.shape(x))


def q4_1(x):
    b = _blocks(x)
    mn, mx = b.min(axis=1), b.max(axis=1)
    d = (mx - mn) / 15.0
    idd = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.trunc((b - mn[:, None]) * idd[:, None] + 0.5))
    return (q * f16(d)[:, None] + f16(mn)[:, None]).reshape(np.shape(x))


def turbo(bits):
    def rt(x):
        d, idx = turbo_ref.quantize_indices(_blocks(x), bits)
        cent = np.array(turbo_ref.CENTROIDS[bits], dtype=np.float32)
        return (cent[idx] * f16(d)[:, None]).reshape(np.shape(x))
    rt.__name__ = f"turbo{bits}"
    return rt


STOCK = {
    "q8_0": (q8_0, 8.5), "q5_0": (q5_0, 5.5), "q4_1": (q4_1, 5.0), "q4_0": (q4_0, 4.5),
    "turbo4": (turbo(4), 4.5), "turbo3": (turbo(3), 3.5), "turbo2": (turbo(2), 2.5),
}


def rel_mse(x, xh):
    x = x.astype(np.float64)
    return float(((x - xh) ** 2).sum() / (x ** 2).sum())


# ---- Gaussian reference numbers ------------------------------------------------------------

def lloyd_max_gaussian(n_levels: int, iters: int = 300) -> tuple[np.ndarray, float]:
    """Lloyd-Max quantizer of N(0,1) with n_levels levels, by iteration on the exact density."""
    from math import erf, exp, pi, sqrt

    phi = lambda t: exp(-t * t / 2) / sqrt(2 * pi)  # noqa: E731
    Phi = lambda t: 0.5 * (1 + erf(t / sqrt(2)))  # noqa: E731
    c = np.linspace(-2, 2, n_levels) * (1 if n_levels > 1 else 0)
    for _ in range(iters):
        t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
        nc = []
        for a, b in zip(t[:-1], t[1:]):
            pa, pb = (0 if a == -np.inf else phi(a)), (0 if b == np.inf else phi(b))
            mass = Phi(b) - Phi(a)
            nc.append((pa - pb) / mass)
        c = np.array(nc)
    # distortion = 1 - sum mass_k c_k^2 (centroid condition)
    t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
    mass = np.array([Phi(b) - Phi(a) for a, b in zip(t[:-1], t[1:])])
    return c, float(1 - (mass * c * c).sum())
