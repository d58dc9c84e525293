#!/usr/bin/env python3
"""Optimized KV policies against measured KLD, boundary policies and evenly spaced layers, from one KV scan.

    python bench/kv_optimize.py --scan SCAN.json --bits 2.6,2.8,3.0 --dir DIR [--boundary 2] \
        [--even q8_0,turbo3] [--gap-to turbo3] [--out results.md] [--refine N [--jobs J]] \
        [--lacq-args '--backend cuda --source SRC']

For each budget: `lacq optimize kv SCAN --bits B --verify` (the policy run against the model's
f16-cache logits on the scan's tokens), and with --refine the same refined by N measured rounds. Baselines on the same tokens: V of the first and last N KV
layers at q8_0 over the scan's cheapest type (`lacq kld --boundary N`), and V of k evenly spaced
KV layers promoted to each --even type over the cheapest, with the smallest k whose bits/value
reach the budget (so the baseline never gets fewer bits) and, where that passes the budget, also
the largest k within it ("within": the same bits the optimizer may spend). Uniform runs come from the scan (same
build, tokens and settings). "gap" is the share of the KLD (and PPL) gap from uniform cheapest to
uniform --gap-to recovered. Prints a markdown table, appends it to --out, writes DIR/rows.json.
Runs one measurement at a time, with lacq's default threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, emit_table  # noqa: F401  (puts the repository on sys.path)


def lacq(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "lacq", *args], check=False, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"lacq {' '.join(args)} failed:\n{out.stdout[-800:]}\n{out.stderr[-800:]}")


def last_kld(db: Path) -> dict:
    from lacq.results.store import open_store
    r = open_store(db).results(kind="kld")[-1]
    m, kv = r.metrics, r.kv or {}
    return {"label": r.label, "kld": m["kld_mean"], "kld_error": m["kld_mean_error"], "ppl": m["ppl_q"],
            "ppl_error": m.get("ppl_q_error"), "predicted": m.get("predicted"), "bits": kv.get("v_bits_per_value")}


def even_ordinals(n: int, k: int) -> list[int]:
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def spearman(a: list[float], b: list[float]) -> float:
    from lacq.results.tables import spearman as rho
    return rho(a, b)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=Path, required=True)
    ap.add_argument("--bits", required=True, help="comma-separated bits/value budgets")
    ap.add_argument("--dir", type=Path, required=True, help="work directory: policies, sqlite, rows.json")
    ap.add_argument("--boundary", type=int, action="append", default=[], help="boundary N (repeatable)")
    ap.add_argument("--even", default="", help="comma-separated types evenly spaced layers are promoted to")
    ap.add_argument("--gap-to", default=None, help="uniform type the gap is measured to (default: the dearest)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file the table is appended to")
    ap.add_argument("--refine", type=int, default=0, help="also the optimized policy refined by N measured rounds")
    ap.add_argument("--jobs", type=int, default=1, help="refinement runs at a time")
    ap.add_argument("--lacq-args", default="",
                    help="extra arguments for every lacq run, e.g. '--backend cuda --source S'")
    args = ap.parse_args()
    extra = args.lacq_args.split()
    args.dir.mkdir(parents=True, exist_ok=True)
    db = args.dir / "kv_optimize.sqlite"
    os.environ["LACQ_DB"] = str(db)
    from lacq.studies.artifact import Scan
    scan = Scan.read(args.scan)
    model, low, other = scan.model["path"], scan.lowest, scan.base.get("other", "q8_0")
    to = args.gap_to or scan.highest
    run = ["--chunks", str(scan.chunks), "-c", str(scan.ctx)]
    units = sorted((u for u in scan.units if u.kind == "kv_layer"), key=lambda u: u.ordinal)
    n = len(units)

    def bits_of(types: dict[int, str]) -> float:
        return (scan.fixed_cost + sum(u.cost[types.get(u.ordinal, low)] for u in units)) / scan.total_values

    rows: list[dict] = []
    done: dict[tuple, dict] = {}
    for b in [float(x) for x in args.bits.split(",")]:
        name = f"opt_{b}bpv".replace(".", "_")
        lacq("optimize", "kv", str(args.scan), "--bits", str(b), "--name", name, "-o", str(args.dir / f"{name}.toml"),
             "--force", "--verify", *extra)
        rows.append({"kind": "optimized", "budget": b, **last_kld(db)})
        print(rows[-1], flush=True)
        if args.refine:
            lacq("optimize", "kv", str(args.scan), "--bits", str(b), "--name", name + "_r", "-o",
                 str(args.dir / f"{name}_r.toml"), "--force", "--verify", "--refine", str(args.refine), "--jobs",
                 str(args.jobs), *extra)
            rows.append({"kind": "refined", "budget": b, **last_kld(db)})
            print(rows[-1], flush=True)
        for t in [x for x in args.even.split(",") if x]:
            bits = {k: bits_of({o: t for o in even_ordinals(n, k)}) for k in range(1, n + 1)}
            up = next((k for k in bits if bits[k] >= b - 1e-9), None)  # the fewest layers reaching the budget
            within = max((k for k in bits if bits[k] <= b + 1e-9), default=None)  # the most within it
            for k, how in ((up, ""), (within, " within")):
                if k is None or (how and k == up):
                    continue
                ords = even_ordinals(n, k)
                key = (t, tuple(ords))
                if key not in done:
                    pol = args.dir / f"even_{t}_{k}.toml"
                    pol.write_text(f'name = "even_{t}_{k}"\ndescription = "V of {k} evenly spaced KV layers at {t}"\n'
                                   f'k = "{other}"\nv = "{low}"\n'
                                   + "".join(f'[[v_layers]]\nlayers = "{o}"\ntype = "{t}"\n' for o in ords))
                    lacq("kld", model, "--base", model, *run, "--kv-policy", str(pol), "--label", f"even {k}@{t}",
                         *extra)
                    done[key] = {"layers": ords, **last_kld(db)}
                rows.append({"kind": f"evenly spaced {t}{how}", "budget": b, **done[key]})
                print(rows[-1], flush=True)
    for nb in args.boundary:
        lacq("kld", model, "--base", model, *run, "--ctk", other, "--ctv", low, "--boundary", str(nb),
             "--label", f"boundary {nb}", *extra)
        rows.append({"kind": f"boundary {nb}", **last_kld(db)})
    (args.dir / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")

    u_low, u_to = scan.uniform[low], scan.uniform[to]

    def gap(r: dict, key: str) -> str:
        a, z = getattr(u_low, key), getattr(u_to, key)
        return "" if a is None or z is None or a == z or r.get(key) is None else f"{100 * (a - r[key]) / (a - z):.0f}%"

    cmd = " ".join([os.path.relpath(sys.argv[0]) if Path(sys.argv[0]).exists() else sys.argv[0], *sys.argv[1:]])
    lines = [f"`python {cmd}`", "",
             f"scan `{args.scan}` ({scan.chunks}×{scan.ctx} tokens, V over {', '.join(scan.types)}, K {other}); "
             f"uniform V from the scan: " + ", ".join(f"{t} {k.kld:.4f} ± {k.kld_error:.4f} (PPL {k.ppl:.3f})"
                                                       for t, k in scan.uniform.items()), "",
             f"| configuration | budget | bits/value | KLD | ± | PPL | gap {low}→{to} by KLD | by PPL | predicted (low..high) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r.get("predicted")
        pred = f"{p['kld']:.4f} ({p['kld_low']:.4f}..{p['kld_high']:.4f})" if p and p.get("kld_low") is not None \
            and p.get("kld_high") is not None else (f"{p['kld']:.4f}" if p else "")
        what = r["kind"] + (f" {r['layers']}" if "layers" in r else "")
        ppl = f"{r['ppl']:.3f}" + ("" if r.get("ppl_error") is None else f" ± {r['ppl_error']:.3f}")
        lines.append(f"| {what} | {r.get('budget', '')} | {r['bits']:.3f} | {r['kld']:.4f} | {r['kld_error']:.4f} | "
                     f"{ppl} | {gap(r, 'kld')} | {gap(r, 'ppl')} | {pred} |")
    opt = [r for r in rows if r["kind"] == "optimized"]
    if len(opt) > 2:
        meas = [r["kld"] for r in opt]
        lines += [""] + [f"- Spearman ρ of predicted `{k}` against measured over the {len(opt)} budgets: "
                         f"{spearman([r['predicted'][k] for r in opt], meas):.3f}" for k in ("kld", "kld_low", "kld_high")
                         if all(r["predicted"].get(k) is not None for r in opt)]
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
