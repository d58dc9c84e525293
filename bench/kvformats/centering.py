"""Does subtracting a fixed per-layer mean vector before quantizing help? For K it is free:
q.(k - mu) differs from q.k by a per-query constant, which softmax ignores. The mean comes from
the first half of the dumped rows (earlier chunks), the error is measured on the second half, as
absolute squared error over the energy of the uncentered rows (the table's usual denominator).

    OPENBLAS_NUM_THREADS=1 python3 bench/kvformats/centering.py /work/kvf-data/rows_smollm2.npz \
        /work/kvf-data/rows_gemma3.npz --out bench/kvformats/results/centering.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formats as F  # noqa: E402
import quants as Q  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    lines = ["| model | tensor | mean-vector energy share (test half) | q4_0 | q4_0 centered | tqs4 | tqs4 centered | tqs3 | tqs3 centered | tqs2 | tqs2 centered |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in a.rows:
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        for t in "KV":
            acc = {}
            share = []
            for il in range(meta["n_layer"]):
                full = z[f"{t.lower()}{il}"].astype(np.float32)
                half = len(full) // 2
                mu = full[:half].mean(axis=0)
                x = full[half:][:: max(1, (len(full) - half) * full.shape[1] // 32768)]
                e = float((x.astype(np.float64) ** 2).sum())
                share.append(float((mu.astype(np.float64) ** 2).sum() * len(x) / e))
                for name, fn in [("q4_0", Q.q4_0), ("tqs4", lambda v: F.roundtrip(v, 4)),
                                 ("tqs3", lambda v: F.roundtrip(v, 3)), ("tqs2", lambda v: F.roundtrip(v, 2))]:
                    plain = float(((x - fn(x)) ** 2).sum()) / e
                    xc = x - mu
                    cent = float(((xc - fn(xc)) ** 2).sum()) / e
                    acc.setdefault(name, []).append((plain, cent))
            row = f"| {meta['model']} | {t} | {np.mean(share):.3f} |"
            for name in ("q4_0", "tqs4", "tqs3", "tqs2"):
                v = np.array(acc[name])
                row += f" {v[:, 0].mean():.4g} | {v[:, 1].mean():.4g} |"
            lines.append(row)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
