"""KLD of simulated V-cache formats in the numpy forward pass: a format judged by what it does to the
model's output, before anyone writes its kernels.

    OPENBLAS_NUM_THREADS=1 python3 bench/kvformats/kld_sim.py MODEL.gguf --chunks 8 \
        [--formats q4_0,tqs4,tql4d,...] --out bench/kvformats/results/kld_sim_smollm2.md

Each layer's V is rotated as the cache rotates it (Hadamard groups of 64), quantized and dequantized
by the format's numpy reference, and rotated back; K stays float (so the KLD is V's alone, without
the K q8_0 floor of bench/kv_types.py). KLD against the unquantized pass over the scored second half
of each chunk (llama-perplexity's tokens), with the standard error over tokens, and for each format
the paired difference to the first format on the same tokens.

Besides the shipped types, candidates that exist only here (numpy; no kernels):
  tql4c  tql's layout with 4-bit indices, exponent by tql2/3's comparison rule (step 0.25)
  tql4d  the same bytes, exponents chosen by direct error over 3 super-scales (0.9, 1.0, 1.1 x max):
         the search patch 0015's tql4 ships (`tql4` here runs its numpy reference, tql_ref)
  tql2d  tql2's bytes with tql4d's search
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quants as Q  # noqa: E402
from dump_rows import corpus_tokens  # noqa: E402
from model import Weights, forward, read_hparams, rotate  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

from lacq.plan.kv import tql_ref, tqs_ref, turbo_ref  # noqa: E402


def _f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def sub_exponent(x: np.ndarray, bits: int, step: float, direct: bool) -> np.ndarray:
    """Blocks of 64, fp16 d, a 2-bit exponent per 8 values (scale d * 2^(-step e)), turbo's codebook.
    direct: exponents by least squared error at 3 super-scales; else tql's comparison rule."""
    cent = np.array(turbo_ref.CENTROIDS[bits], np.float64)
    mids = np.array(turbo_ref.MIDS[bits], np.float64)
    xb = np.asarray(x, np.float32).reshape(-1, 8, 8).astype(np.float64)
    n = len(xb)
    flat = xb.reshape(-1, 8)
    s = tql_ref.sub_scales(flat.astype(np.float32), bits).astype(np.float64).reshape(n, 8)
    levels = 2.0 ** (-step * np.arange(4))

    def assign(sc):                                   # sc (n, 8) -> reconstruction (n, 8, 8)
        idx = (xb[:, :, :, None] > sc[:, :, None, None] * mids).sum(-1)
        return cent[idx] * sc[:, :, None]

    if not direct:
        d = _f16(s.max(1)).astype(np.float64)
        e = np.clip(np.rint(np.log2(np.maximum(s, 1e-30) / np.maximum(d, 1e-30)[:, None]) / -step), 0, 3).astype(int)
        out = assign(d[:, None] * levels[e])
        return out.reshape(np.shape(x)).astype(np.float32)
    best = np.full(n, np.inf)
    out = np.zeros_like(xb)
    for g in (0.9, 1.0, 1.1):
        d = _f16(s.max(1) * g).astype(np.float64)
        recs = [assign(np.repeat((d * lv)[:, None], 8, axis=1)) for lv in levels]
        errs = np.stack([((xb - r) ** 2).sum(-1) for r in recs])          # (4, n, 8)
        k = errs.argmin(0)
        rec = np.take_along_axis(np.stack(recs), k[None, :, :, None], 0)[0]
        tot = errs.min(0).sum(-1)
        better = tot < best
        best = np.where(better, tot, best)
        out[better] = rec[better]
    return out.reshape(np.shape(x)).astype(np.float32)


FORMATS = {
    "f16": lambda x: _f16(x),
    "q8_0": Q.q8_0,
    "q4_0": Q.q4_0,
    "turbo4": Q.turbo(4),
    "tqs4": lambda x: tqs_ref.roundtrip(x, 4),
    "tql4c": lambda x: sub_exponent(x, 4, 0.25, direct=False),
    "tql4": lambda x: tql_ref.roundtrip(x, 4),
    "tql4d": lambda x: sub_exponent(x, 4, 0.25, direct=True),
    "turbo3": Q.turbo(3),
    "tqs3": lambda x: tqs_ref.roundtrip(x, 3),
    "tql3": lambda x: tql_ref.roundtrip(x, 3),
    "turbo2": Q.turbo(2),
    "tqs2": lambda x: tqs_ref.roundtrip(x, 2),
    "tql2": lambda x: tql_ref.roundtrip(x, 2),
    "tql2d": lambda x: sub_exponent(x, 2, 0.35, direct=True),
}
BITS = {"f16": 16, "q8_0": 8.5, "q4_0": 4.5, "turbo4": 4.5, "tqs4": 4.5, "tql4c": 4.5, "tql4": 4.5, "tql4d": 4.5,
        "turbo3": 3.5, "tqs3": 3.5, "tql3": 3.5, "turbo2": 2.5, "tqs2": 2.5, "tql2": 2.5, "tql2d": 2.5}


def v_hook(fmt):
    def hook(v, _il):
        r = rotate(v, 64)
        q = fmt(r.reshape(-1, 64)).reshape(r.shape)
        return rotate(q, 64)                          # the normalized Hadamard matrix is its own inverse
    return hook


def log_softmax(logits):
    m = logits.max(axis=1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--formats", default="q4_0,tqs4,tql4,tql4d,tqs3,tql3,turbo2,tqs2,tql2,tql2d")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    names = a.formats.split(",")
    reader = gguf.GGUFReader(a.model)
    hp = read_hparams(reader)
    tok = load_tokenizer(reader)
    ids = corpus_tokens(tok, a.chunks * a.ctx)
    w = Weights(reader)
    per = {n: [] for n in names}                      # per-token KLD, all chunks
    t0 = time.time()
    for c in range(a.chunks):
        chunk = ids[c * a.ctx:(c + 1) * a.ctx].copy()
        if tok.add_bos:
            chunk[0] = tok.bos
        first = len(chunk) // 2
        x, out_w, _, _ = forward(hp, w, chunk, capture=False)
        lp0 = log_softmax(x[first:-1] @ out_w.T)
        p0 = np.exp(lp0)
        for n in names:
            xq, _, _, _ = forward(hp, w, chunk, capture=False, v_hook=v_hook(FORMATS[n]))
            lpq = log_softmax(xq[first:-1] @ out_w.T)
            per[n].append((p0 * (lp0 - lpq)).sum(axis=1))
        print(f"chunk {c + 1}/{a.chunks} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    ref = np.concatenate(per[names[0]])
    lines = [f"#### V formats by KLD in the numpy forward pass, {Path(a.model).name}, {a.chunks} x {a.ctx} "
             f"(second halves: {len(ref)} tokens), K float",
             "", f"`python3 bench/kvformats/kld_sim.py {Path(a.model).name} --chunks {a.chunks} "
             f"--formats {a.formats}`", "",
             f"| format | bits/value | mean KLD | ± | × {names[0]} | paired Δ vs {names[0]} | ± |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        k = np.concatenate(per[n])
        dlt = k - ref
        lines.append(f"| {n} | {BITS[n]:g} | {k.mean():.5f} | {k.std(ddof=1) / np.sqrt(len(k)):.5f} | "
                     f"{k.mean() / ref.mean():.3f} | {dlt.mean():+.5f} | {dlt.std(ddof=1) / np.sqrt(len(k)):.5f} |")
    text = "\n".join(lines) + "\n"
    with open(a.out, "a") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
