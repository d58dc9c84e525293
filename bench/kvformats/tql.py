"""tql2/tql3/tql4 (patches 0013, 0015) against tqs, turbo and q4_0 on real rotated K/V rows and on Gaussian blocks.

    OPENBLAS_NUM_THREADS=1 python3 bench/kvformats/tql.py \
        /work/kvf-data/rows_smollm2.npz /work/kvf-data/rows_gemma3.npz --out bench/kvformats/results/tql.md

Relative MSE = sum (x - x^)^2 / sum x^2 per layer tensor (32768 sampled values each, the same
sample as analyze.py), averaged over every layer's K and V; "/ bound" divides by the Gaussian
rate-distortion bound at the payload, 4^-(bits/value - 0.5), the issue's measure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kld_sim  # noqa: E402
from quants import rel_mse  # noqa: E402

NAMES = ("q4_0", "turbo4", "tqs4", "tql4", "turbo3", "tqs3", "tql3", "turbo2", "tqs2", "tql2")
FORMATS = {name: (kld_sim.FORMATS[name], kld_sim.BITS[name]) for name in NAMES}  # one registry of the formats


def per_model(path: str, n_values: int) -> tuple[str, dict[str, list[float]]]:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    rng = np.random.default_rng(0)
    errs: dict[str, list[float]] = {name: [] for name in FORMATS}
    for il in range(meta["n_layer"]):
        for t in "kv":
            full = z[f"{t}{il}"]
            n = max(1, n_values // full.shape[1])
            x = full[rng.choice(len(full), min(n, len(full)), replace=False)].astype(np.float32)
            for name, (fn, _bpv) in FORMATS.items():
                errs[name].append(rel_mse(x, fn(x)))
    return meta["model"], errs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--values", type=int, default=32768)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    g = np.random.default_rng(1).standard_normal((8192, 64)).astype(np.float32)
    models = [per_model(p, a.values) for p in a.rows]
    head = ("| format | bits/value | " + " | ".join(f"{m}: mean | worst | / bound" for m, _ in models)
            + " | Gaussian | / bound |")
    lines = [head, "|" + " --- |" * (3 + 3 * len(models) + 1)]
    for name, (fn, bpv) in FORMATS.items():
        bound = 4.0 ** -(bpv - 0.5)
        row = f"| {name} | {bpv:g} |"
        for _m, errs in models:
            e = np.array(errs[name])
            row += f" {e.mean():.4g} | {e.max():.4g} | {e.mean() / bound:.2f} |"
        ge = rel_mse(g, fn(g))
        row += f" {ge:.4g} | {ge / bound:.2f} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
