"""How far a V type's PPL moves when its input rows move by float noise (CPU vs CUDA arithmetic).

    OPENBLAS_NUM_THREADS=1 python3 bench/kvformats/input_sensitivity.py MODEL.gguf --chunks 8 \
        [--formats tqs2,tql2,tql3,tql4,tqs4] [--eps 1e-3]

The numpy forward pass quantizes V with each format (as kld_sim.py does) three times: on the exact
rows, and twice on rows multiplied by (1 + eps * N(0,1)) per value with different seeds, the size of
the difference between two backends' matrix products. Prints the three PPLs and the largest relative
move. A type whose quantizer makes coarse discrete choices (tql2's exponents) moves more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dump_rows import corpus_tokens  # noqa: E402
from kld_sim import FORMATS, v_hook  # noqa: E402
from model import Weights, forward, nll_second_half, read_hparams  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def noisy(fmt, eps: float, seed: int):
    g = np.random.default_rng(seed)

    def hook(v, il):
        return v_hook(fmt)(v * (1 + eps * g.standard_normal(v.shape).astype(np.float32)), il)
    return hook


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--formats", default="tqs2,tql2,tql3,tql4,tqs4")
    ap.add_argument("--eps", type=float, default=1e-3)
    a = ap.parse_args(argv)
    r = gguf.GGUFReader(a.model)
    hp, tok, w = read_hparams(r), load_tokenizer(r), Weights(r)
    ids = corpus_tokens(tok, a.chunks * 512)
    for name in a.formats.split(","):
        nll = {0: [], 1: [], 2: []}
        for c in range(a.chunks):
            ch = ids[c * 512:(c + 1) * 512].copy()
            if tok.add_bos:
                ch[0] = tok.bos
            for k in (0, 1, 2):
                hook = v_hook(FORMATS[name]) if k == 0 else noisy(FORMATS[name], a.eps, 100 * c + k)
                x, ow, _, _ = forward(hp, w, ch, capture=False, v_hook=hook)
                nll[k].append(nll_second_half(x, ow, ch))
        p = {k: float(np.exp(np.concatenate(v).mean())) for k, v in nll.items()}
        move = 100 * max(abs(p[1] - p[0]), abs(p[2] - p[0])) / p[0]
        print(f"| {name} | {p[0]:.4f} | {p[1]:.4f} | {p[2]:.4f} | {move:.3f}% |", flush=True)


if __name__ == "__main__":
    main()
