#!/usr/bin/env python3
"""The optimizer's quoted prediction, recomputed for already measured budgets: Spearman against measured KLD.

    python bench/requote.py --scan SCAN.json --verify VERIFY.json --kind "optimized KV"

VERIFY.json: rows as bench/gpu/verify.py writes them (kind, budget, kld, predicted with kld_low and
kld_high). The measured choices are the ones the former search made, so their ends are the stored
ones; this checkout's quote of them follows from the scan's drift (`additivity`): where each end
under-predicts the uniform run at the other, the larger end. The other rule (ends weighted by units
moved) needs the choices themselves, which verify.json does not keep: the script refuses there.
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
    from lacq.studies.optimize import additivity
    scan = Scan.read(args.scan)
    rows = [r for r in json.loads(args.verify.read_text()) if r["kind"] == args.kind]
    drift = additivity(scan)
    if not (drift[scan.highest]["low_error"] <= 1e-12 and drift[scan.lowest]["high_error"] <= 1e-12):
        raise SystemExit("an end over-predicts the uniform run at the other: the quote weights the ends by units "
                         "moved, which needs the measured choices")
    meas = [r["kld"] for r in rows]
    print(f"| prediction | Spearman ρ over {len(rows)} budgets |\n| --- | --- |")
    for name, vals in (("stored `kld` (cost-linear interpolation)", [r["predicted"]["kld"] for r in rows]),
                       ("`kld_low`", [r["predicted"]["kld_low"] for r in rows]),
                       ("`kld_high`", [r["predicted"]["kld_high"] for r in rows]),
                       ("`kld` of this checkout: the larger end",
                        [max(r["predicted"]["kld_low"], r["predicted"]["kld_high"]) for r in rows])):
        print(f"| {name} | {spearmanr(vals, meas)[0]:.3f} |")


if __name__ == "__main__":
    main()
