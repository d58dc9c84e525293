#!/usr/bin/env python3
"""Predicted against measured: optimized recipes and KV policies from this session's CUDA scans, and baselines.

    python bench/gpu/verify.py --scan-weights S.json --scan-kv K.json --source SRC --model M.gguf --base F16.gguf --out DIR

Runs on the GPU host after bench/gpu/scans.sh setup+model (the scans name /tmp/g paths). For ten size
budgets: `lacq optimize weights --verify`; for ten bits/value budgets: `lacq optimize kv --verify`;
then the baselines the issue compares against: llama.cpp's mixes (stock llama-quantize), the study's
hand recipes, boundary_v2_turbo, and V of evenly spaced KV layers at q8_0 over turbo2 at the optimized
policies' bits. Writes DIR/verify.json (every row: kind, label, cost, predicted, measured, ±).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WEIGHT_MB = (93.5, 98.4, 102.0, 105.5, 105.9, 110.0, 112.1, 118.0, 125.0, 135.0)
KV_BITS = (2.6, 2.8, 3.0, 3.1, 3.3, 3.5, 4.0, 4.5, 5.5, 7.0)
MIXES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")
HAND = ("uniform_q4_0", "first8_q8", "attention_q8", "ffn_q8")


def lacq(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "lacq", *args], capture_output=True, text=True)
    if out.returncode:
        print(out.stdout[-800:], out.stderr[-800:], file=sys.stderr)
    return out.stdout


def last_kld(db: Path) -> dict:
    from lacq.results.store import open_store
    r = open_store(db).results(kind="kld")[-1]
    m = r.metrics
    return {"label": r.label, "bytes": r.model_bytes, "kld": m["kld_mean"], "kld_error": m["kld_mean_error"],
            "ppl": m["ppl_q"], "predicted": m.get("predicted"), "v_bits": (r.kv or {}).get("v_bits_per_value")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for a in ("--scan-weights", "--scan-kv", "--source", "--model", "--base", "--out"):
        ap.add_argument(a, required=a != "--scan-weights")
    args = ap.parse_args()  # without --scan-weights: the KV budgets and their baselines only
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "verify.sqlite"
    import os
    os.environ["LACQ_DB"] = str(db)
    common = ["--backend", "cuda", "--source", args.source]
    rows = []
    for mb in WEIGHT_MB if args.scan_weights else ():
        lacq("optimize", "weights", args.scan_weights, "--size-mb", str(mb), "--name", f"opt_{mb}mb".replace(".", "_"),
             "-o", str(out / f"opt_{mb}mb.toml"), "--force", "--verify", *common)
        rows.append({"kind": "optimized weights", "budget": mb, **last_kld(db)})
        print(rows[-1], flush=True)
    scan = json.loads(Path(args.scan_weights).read_text()) if args.scan_weights else None
    for name in MIXES + HAND if scan else ():
        base = name.lower() if name in MIXES else None
        recipe = out / f"{name}.toml"
        if base:
            recipe.write_text(f'name = "{name}"\ndescription = "stock llama-quantize {name}"\nbase = "{base}"\n')
        q = lacq("quantize", "--recipe", str(recipe) if base else name, args.base, "-o", str(out / f"{name}.gguf"),
                 "--force", *common)
        lacq("kld", str(out / f"{name}.gguf"), "--base", args.base, "--chunks", str(scan["chunks"]), "-c",
             str(scan["ctx"]), "--label", name, *common)
        rows.append({"kind": "llama.cpp mix" if base else "hand recipe", **last_kld(db)})
        print(rows[-1], q.strip()[-120:], flush=True)
    kv = json.loads(Path(args.scan_kv).read_text())
    n_kv = kv["model"]["n_kv_layers"]
    for bits in KV_BITS:
        lacq("optimize", "kv", args.scan_kv, "--bits", str(bits), "--name", f"opt_{bits}bpv".replace(".", "_"),
             "-o", str(out / f"opt_{bits}bpv.toml"), "--force", "--verify", *common)
        rows.append({"kind": "optimized KV", "budget": bits, **last_kld(db)})
        print(rows[-1], flush=True)
        # the same bits spent on evenly spaced layers: each q8_0 layer over turbo2 adds 6/n_kv bits/value
        k = round((bits - 2.5) * n_kv / 6.0)
        if 0 < k <= n_kv and bits <= 4.0:
            ords = sorted({round(i * (n_kv - 1) / (k - 1)) for i in range(k)} if k > 1 else {n_kv // 2})
            pol = out / f"even_{k}.toml"
            pol.write_text(f'name = "even_{k}"\ndescription = "V of {k} evenly spaced KV layers at q8_0"\nk = "q8_0"\n'
                           f'v = "turbo2"\n' + "".join(f'[[v_layers]]\nlayers = "{o}"\ntype = "q8_0"\n' for o in ords))
            lacq("kld", args.model, "--base", args.model, "--chunks", str(kv["chunks"]), "-c", str(kv["ctx"]),
                 "--kv-policy", str(pol), "--label", f"even {k} layers", *common)
            rows.append({"kind": "evenly spaced KV", "budget": bits, "layers": ords, **last_kld(db)})
            print(rows[-1], flush=True)
    lacq("kld", args.model, "--base", args.model, "--chunks", str(kv["chunks"]), "-c", str(kv["ctx"]),
         "--kv-policy", "boundary_v2_turbo", "--label", "boundary_v2_turbo", *common)
    rows.append({"kind": "boundary_v2_turbo", **last_kld(db)})
    (out / "verify.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
