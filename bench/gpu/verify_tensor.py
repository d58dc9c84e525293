#!/usr/bin/env python3
"""Optimized recipes from a tensor-granularity weight scan against llama.cpp's own mixes, on the same tokens.

    python bench/gpu/verify_tensor.py --scan S.json --source SRC --model M.gguf --base F16.gguf --out DIR [--chunks 20]

For ten size budgets (the stock mixes' sizes among them): `lacq optimize weights --verify` (prediction
against a measurement on the scan's own chunks), then the recipe's file measured again at --chunks beside
llama.cpp's Q3_K_M, Q4_K_S, Q4_K_M and Q5_K_M made by stock llama-quantize from the same base. Writes
DIR/verify.json (kind, label, bytes, predicted, measured at the scan's chunks, measured at --chunks, ±).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BUDGETS_MB = (93.5, 98.0, 100.0, 102.0, 104.0, 105.5, 105.9, 108.0, 110.0, 112.1)
MIXES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")


def lacq(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "lacq", *args], capture_output=True, text=True, check=False)
    if out.returncode:
        print(f"lacq {' '.join(args[:3])}: exit {out.returncode}", out.stdout[-600:], out.stderr[-600:], file=sys.stderr)
    return out.stdout


def last_kld() -> dict:
    from lacq.results.store import open_store
    r = open_store().results(kind="kld")[-1]
    m = r.metrics
    return {"label": r.label, "bytes": r.model_bytes, "kld": m["kld_mean"], "kld_error": m["kld_mean_error"],
            "kld_p99": m["kld_quantiles"].get("p99"), "ppl": m["ppl_q"], "predicted": m.get("predicted"),
            "model": r.model_path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for a in ("--scan", "--source", "--model", "--base", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--chunks", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["LACQ_DB"] = str(out / "verify.sqlite")
    common = ["--backend", "cuda", "--source", args.source]
    measure = ["--base", args.base, "--chunks", str(args.chunks), *common]
    rows = []
    for mb in BUDGETS_MB:
        name = f"opt_{mb}mb".replace(".", "_")
        lacq("optimize", "weights", args.scan, "--size-mb", str(mb), "--name", name, "-o", str(out / f"{name}.toml"),
             "--tensor-type-file", str(out / f"{name}.txt"), "--force", "--verify", *common)
        short = last_kld()
        lacq("quantize", "--recipe", str(out / f"{name}.toml"), args.base, "-o", str(out / f"{name}.gguf"), "--force",
             *common)
        lacq("kld", str(out / f"{name}.gguf"), "--label", f"{name} ({args.chunks} chunks)", *measure)
        rows.append({"kind": "optimized", "budget_mb": mb, "scan_chunks": short, "full": last_kld()})
        print(json.dumps(rows[-1]), flush=True)
    for mix in MIXES:
        recipe = out / f"{mix}.toml"
        recipe.write_text(f'name = "{mix}"\ndescription = "stock llama-quantize {mix}"\nbase = "{mix.lower()}"\n')
        lacq("quantize", "--recipe", str(recipe), args.base, "-o", str(out / f"{mix}.gguf"), "--force", *common)
        lacq("kld", str(out / f"{mix}.gguf"), "--label", mix, *measure)
        rows.append({"kind": "llama.cpp mix", "full": last_kld()})
        print(json.dumps(rows[-1]), flush=True)
    (out / "verify.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
