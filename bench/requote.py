#!/usr/bin/env python3
"""The optimizer's quoted prediction, recomputed for already measured budgets: Spearman against measured KLD.

    python bench/requote.py --scan SCAN.json --verify VERIFY.json --kind "optimized KV"

VERIFY.json: rows as bench/gpu/verify.py writes them (kind, budget, kld, predicted). Each budget is
optimized again with this checkout's lacq (the search is a pure function of the scan, so the choice
is the measured one: the script refuses when the recomputed ends differ from the stored ones), and
the stored quote, the ends and this checkout's quote are ranked against the measured KLD.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT  # noqa: F401  (puts the repository on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=Path, required=True)
    ap.add_argument("--verify", type=Path, required=True)
    ap.add_argument("--kind", required=True, help='"optimized KV" or "optimized weights"')
    args = ap.parse_args()
    from scipy.stats import spearmanr

    from lacq.studies.artifact import Scan
    from lacq.studies.optimize import optimize
    scan = Scan.read(args.scan)
    rows = [r for r in json.loads(args.verify.read_text()) if r["kind"] == args.kind]
    scale = 1e6 if scan.kind == "weights" else 1.0
    sols = [optimize(scan, r["budget"] * scale) for r in rows]
    for s, r in zip(sols, rows, strict=True):
        old = r["predicted"]
        if abs(s.kld_low - old["kld_low"]) > 1e-9 or abs(s.kld_high - old["kld_high"]) > 1e-9:
            raise SystemExit(f"budget {r['budget']}: the recomputed choice differs from the measured one")
    meas = [r["kld"] for r in rows]
    print(f"| prediction | Spearman ρ over {len(rows)} budgets |\n| --- | --- |")
    for name, vals in (("stored `kld` (cost-linear interpolation)", [r["predicted"]["kld"] for r in rows]),
                       ("`kld_low`", [s.kld_low for s in sols]), ("`kld_high`", [s.kld_high for s in sols]),
                       ("`kld` of this checkout", [s.kld for s in sols])):
        print(f"| {name} | {spearmanr(vals, meas)[0]:.3f} |")
    print("\nnotes:", "; ".join(n for n in sols[0].notes if n.startswith("quoted")))


if __name__ == "__main__":
    main()
