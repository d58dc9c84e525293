"""Measure the distribution of the rotated K/V rows and the error of every format on them.

    OPENBLAS_NUM_THREADS=1 python3 bench/kvformats/analyze.py \
        /work/kvf-data/rows_smollm2.npz /work/kvf-data/rows_gemma3.npz --out bench/kvformats/results

Writes stats.md (per layer), formats.md / formats.json (per model: mean and worst layer),
gaussian.md (loss decomposition on N(0,1) blocks) and codebook_fit.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blockq as B  # noqa: E402
import formats as F  # noqa: E402
import quants as Q  # noqa: E402

LM = {b: np.array(Q.turbo_ref.CENTROIDS[b], dtype=np.float32) for b in (2, 3, 4)}


def _bq(b, block, scale, search):
    return lambda x: B.roundtrip(x, LM[b], block, scale, search)


# name -> (round trip, bits/value, scale overhead bits/value, write-path passes per value)
# passes: candidate scales each value is compared against (+1 for a final assignment);
# q-types need one pass (max, then one divide/round).
FORMATS = {
    "q8_0": (Q.q8_0, 8.5, 0.5, 1), "q5_0": (Q.q5_0, 5.5, 0.5, 1), "q4_1": (Q.q4_1, 5.0, 1.0, 1),
    "q4_0": (Q.q4_0, 4.5, 0.5, 1),
}
for b in (4, 3, 2):
    FORMATS[f"turbo{b}"] = (Q.turbo(b), b + 0.5, 0.5, 13)
    FORMATS[f"tqs{b} (new)"] = ((lambda bb: lambda x: F.roundtrip(x, bb))(b), b + 0.5, 0.5, 8)
    FORMATS[f"tqs{b}, 3 cand."] = (_bq(b, 64, "sub4/16", "lin0.7:1.1:3"), b + 0.5, 0.5, 4)
    FORMATS[f"tqs{b}, 1 cand."] = (_bq(b, 64, "sub4/16", "lin0.9:0.9:1"), b + 0.5, 0.5, 2)
    FORMATS[f"lm{b} f16/64"] = (_bq(b, 64, "f16", "grid13"), b + 0.25, 0.25, 13)
    FORMATS[f"lm{b} log8/32"] = (_bq(b, 32, "log8", "grid13"), b + 0.25, 0.25, 14)
    FORMATS[f"lm{b} e8m0/32"] = (_bq(b, 32, "e8m0", "grid13"), b + 0.25, 0.25, 14)
    FORMATS[f"lm{b} f16/32 iter2"] = (_bq(b, 32, "f16", "iter2"), b + 0.5, 0.5, 2)
    FORMATS[f"lm{b} f16/32 grid200"] = (_bq(b, 32, "f16", "grid200"), b + 0.5, 0.5, 200)


def layer_stats(x):
    xb = x.reshape(-1, 32).astype(np.float64)
    r = np.sqrt((xb ** 2).mean(axis=1))
    xn = xb[r > 0] / r[r > 0, None]
    m2 = (x.astype(np.float64) ** 2).mean()
    mean_vec = x.astype(np.float64).mean(axis=0)
    return dict(
        kurt=float((x.astype(np.float64) ** 4).mean() / m2 ** 2),
        kurt_block=float((xn ** 4).mean() / (xn ** 2).mean() ** 2),
        log2_rms_sd=float(np.std(np.log2(r[r > 0]))),
        max_over_rms=float(np.abs(xn).max()),
        frac_gt4=float((np.abs(xn) > 4).mean()),
        mean_energy=float((mean_vec ** 2).mean() / m2),
    )


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--values", type=int, default=32768, help="values sampled per layer tensor")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    stats_lines = ["| model | layer | tensor | kurtosis | kurtosis in block (Gaussian 2.82) | sd log2 block RMS | max abs/RMS | share > 4 RMS | mean-vector energy share |",
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    res = {}
    for path in a.rows:
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        model = meta["model"]
        per = {name: [] for name in FORMATS}
        for il in range(meta["n_layer"]):
            for t in "kv":
                full = z[f"{t}{il}"]
                n = max(1, a.values // full.shape[1])
                x = full[rng.choice(len(full), min(n, len(full)), replace=False)].astype(np.float32)
                s = layer_stats(full)
                stats_lines.append(f"| {model} | {il} | {t.upper()} | {s['kurt']:.2f} | {s['kurt_block']:.2f} | {s['log2_rms_sd']:.2f} | {s['max_over_rms']:.2f} | {s['frac_gt4']:.1e} | {s['mean_energy']:.3f} |")
                for name, (fn, *_r) in FORMATS.items():
                    per[name].append((il, t, Q.rel_mse(x, fn(x))))
            print(model, il, flush=True)
        res[model] = per
    (out / "stats.md").write_text("\n".join(stats_lines) + "\n")

    # Gaussian blocks for reference
    g = np.random.default_rng(1).standard_normal((4096, 64)).astype(np.float32)
    gauss = {name: Q.rel_mse(g, fn(g)) for name, (fn, *_r) in FORMATS.items()}

    models = list(res)
    hdr = "| format | bits/value | scale bits/value | passes/value (write) | " + " | ".join(
        f"{m}: rel MSE mean | worst (layer) | mean / 4^-(b-scale) | mean / 4^-b" for m in models) + " | Gaussian |"
    lines = [hdr, "|" + " --- |" * (4 + 4 * len(models) + 1)]
    js = {}
    for name, (_fn, bpv, ovh, passes) in FORMATS.items():
        row = f"| {name} | {bpv:g} | {ovh:g} | {passes} |"
        js[name] = dict(bits_per_value=bpv, scale_bits=ovh, passes=passes, gaussian=gauss[name])
        for m in models:
            v = res[m][name]
            mse = np.array([e for *_k, e in v])
            wi = int(mse.argmax())
            mean = float(mse.mean())
            row += f" {mean:.4g} | {mse[wi]:.4g} ({v[wi][1].upper()}{v[wi][0]}) | {mean / 4 ** -(bpv - ovh):.2f} | {mean / 4 ** -bpv:.2f} |"
            js[name][m] = dict(mean=mean, worst=float(mse[wi]), worst_layer=f"{v[wi][1].upper()}{v[wi][0]}",
                               per_layer={f"{t.upper()}{il}": e for il, t, e in v})
        row += f" {gauss[name]:.4g} |"
        lines.append(row)
    (out / "formats.md").write_text("\n".join(lines) + "\n")
    (out / "formats.json").write_text(json.dumps(js, indent=1) + "\n")

    # loss decomposition and codebook fit on Gaussian / pooled real rows
    gl = ["| payload bits | 4^-R bound | Lloyd-Max, variance known (no side info) | + fp16 scale per 32, LS, 13 cand. (turbo) | same, scale not rounded to fp16 | same, 200 cand. | codebook refit by Lloyd on real rows (test half) | tqs (fp16/64 + 4-bit per 16) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in (2, 3, 4):
        _c, lm = Q.lloyd_max_gaussian(2 ** b)
        gb = g.reshape(-1, 32)
        d, idx = B.search_scale(gb, LM[b], "grid13")
        unrounded = Q.rel_mse(gb, LM[b][idx] * d[:, None])
        pooled = []
        for path in a.rows:
            z = np.load(path)
            meta = json.loads(str(z["meta"]))
            for il in range(meta["n_layer"]):
                for t in "kv":
                    full = z[f"{t}{il}"]
                    pooled.append(full[rng.choice(len(full), max(1, 4096 // full.shape[1]), replace=False)].reshape(-1))
        pooled = np.concatenate(pooled).astype(np.float32)
        half = (len(pooled) // 64) * 32
        cb = B.fit_codebook(pooled[:half], LM[b], 32, "grid13", iters=6)
        test = pooled[half:2 * half]
        fit = (Q.rel_mse(test, B.roundtrip(test, cb, 32, "f16", "grid13")),
               Q.rel_mse(test, B.roundtrip(test, LM[b], 32, "f16", "grid13")))
        gl.append(f"| {b} | {4.0 ** -b:.4g} | {lm:.4g} ({lm / 4 ** -b:.2f}x) | {gauss[f'turbo{b}']:.4g} ({gauss[f'turbo{b}'] / 4 ** -b:.2f}x) | {unrounded:.4g} | {gauss[f'lm{b} f16/32 grid200']:.4g} | {fit[0]:.4g} vs Gaussian codebook {fit[1]:.4g}; fitted levels {', '.join(f'{c:.3f}' for c in cb[len(cb) // 2:])} | {gauss[f'tqs{b} (new)']:.4g} ({gauss[f'tqs{b} (new)'] / 4 ** -b:.2f}x) |")
    (out / "gaussian.md").write_text("\n".join(gl) + "\n")
    print((out / "formats.md").read_text())
    print((out / "gaussian.md").read_text())


if __name__ == "__main__":
    main()
