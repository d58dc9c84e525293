"""Reading a scan: per-unit recovery and damage, the damage pattern, advice, bar charts.

Recovery of a unit = KLD(all lowest) − KLD(only that unit at the highest type): what protecting it
alone buys. Damage = KLD(only that unit at the lowest type) − KLD(all highest): what it alone costs.
Every variant is measured on the same tokens, so a difference is paired: its ± is the standard error of
the per-chunk differences where the scan has at least PAIRED_MIN_CHUNKS chunks, else the two
measurements' ± added in quadrature (which overstates the noise of a paired difference).

The damage pattern (over one partition of the model: blocks, groups, tensors or KV layers) uses the
shares of the positive damages and the recoveries as shares of the gap (KLD all lowest − all highest):
- insensitive: the whole lowest-vs-highest gap is below INSENSITIVE_KLD;
- single bottleneck: the unit that carries the most damage carries at least BOTTLENECK_SHARE of it, raising
  it alone recovers at least BOTTLENECK_SHARE of the gap, and no other unit alone recovers more than
  BOTTLENECK_NEXT of the gap (both directions agree that protecting this one unit is most of the answer;
  two units that each destroy the model alone carry half the damage each and recover nothing alone);
- a few hot units + distributed: the top FEW units carry at least FEW_SHARE;
- distributed: otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from lacq.fsutil import atomic_output
from lacq.studies.artifact import Kld, Scan
from lacq.studies.optimize import WHOLE_KINDS

INSENSITIVE_KLD = 0.005
PAIRED_MIN_CHUNKS = 3
BOTTLENECK_SHARE, BOTTLENECK_NEXT = 0.5, 0.1
FEW, FEW_SHARE = 3, 0.5

COLUMNS = {"unit": "Unit", "kind": "Kind", "recovery": "Recovery (KLD)", "recovery_err": "±",
           "recovery_per_mb": "Recovery / MB", "damage": "Damage (KLD)", "damage_err": "± ",
           "share_pct": "Share of damage %", "extra_mb": "Extra MB", "replaced": "llama.cpp writes"}
KV_COLUMNS = {**{k: v for k, v in COLUMNS.items() if k not in ("recovery_per_mb", "extra_mb", "replaced")},
              "block": "Block", "recovery_per_bit": "Recovery / bit/value"}


def unit_frame(scan: Scan, kinds: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per unit, sorted by recovery per unit of extra cost (best first)."""
    lo, hi = scan.uniform[scan.lowest], scan.uniform[scan.highest]
    rows = []
    for u in scan.units:
        if kinds and u.kind not in kinds:
            continue
        up, down = u.raise_[scan.highest], u.lower[scan.lowest]
        extra = u.cost[scan.highest] - u.cost[scan.lowest]
        row = {"unit": u.id, "kind": u.kind, "block": u.block,
               "recovery": lo.kld - up.kld, "recovery_err": diff_error(lo, up),
               "damage": down.kld - hi.kld, "damage_err": diff_error(down, hi),
               "replaced": "; ".join(f"{t}→{a}" for t, a in u.replaced.items())}
        if scan.kind == "kv":
            bits = extra / scan.total_values if scan.total_values else float("nan")
            row["recovery_per_bit"] = row["recovery"] / bits if bits else float("nan")
            row["sort"] = row["recovery_per_bit"]
        else:
            row["extra_mb"] = extra / 1e6
            row["recovery_per_mb"] = row["recovery"] / row["extra_mb"] if extra > 0 else float("nan")
            row["sort"] = row["recovery_per_mb"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    positive = df.damage.clip(lower=0)
    df["share_pct"] = 100 * positive / positive.sum() if positive.sum() > 0 else 0.0
    return df.sort_values("sort", ascending=False, na_position="last").drop(columns="sort").reset_index(drop=True)


def diff_error(a: Kld, b: Kld) -> float:
    """The ± of a.kld - b.kld: paired over chunks where there are enough of them."""
    n = min(len(a.per_chunk), len(b.per_chunk))
    if n >= PAIRED_MIN_CHUNKS and len(a.per_chunk) == len(b.per_chunk):
        d = [x - y for x, y in zip(a.per_chunk, b.per_chunk)]
        mean = sum(d) / n
        return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return math.hypot(a.kld_error, b.kld_error)


def partitions(scan: Scan) -> list[tuple[str, ...]]:
    """The unit kinds that each cover the model once (a block scan, a group scan, ...)."""
    present = {u.kind for u in scan.units}
    whole = tuple(k for k in WHOLE_KINDS if k in present)
    return [(k, *whole) for k in ("block", "group", "tensor", "kv_layer") if k in present]


def classify(scan: Scan, kinds: tuple[str, ...]) -> tuple[str, str]:
    """(pattern, one sentence of advice) for one partition of the scan."""
    df = unit_frame(scan, kinds)
    gap = scan.uniform[scan.lowest].kld - scan.uniform[scan.highest].kld
    what = "KV layers" if scan.kind == "kv" else kinds[0] + "s"
    if gap < INSENSITIVE_KLD:
        return "insensitive", (f"all {what} at {scan.lowest} cost only {gap:.4f} KLD more than at {scan.highest}: "
                               f"use the cheapest type and spend the bits elsewhere")
    shares = df.sort_values("share_pct", ascending=False)
    top = shares.head(FEW)
    if bottleneck := single_bottleneck(df, gap):
        unit, share, recovered, next_best = bottleneck
        return "single bottleneck", (f"{unit} carries {share:.0f}% of the damage and raising it alone recovers "
                                     f"{recovered:.0f}% of the gap (any other unit: at most {next_best:.0f}%): "
                                     f"protect it at {scan.highest} and keep the rest at {scan.lowest}")
    if top.share_pct.sum() >= 100 * FEW_SHARE:
        names = ", ".join(top.unit)
        return "a few hot units + distributed", (f"{names} carry {top.share_pct.sum():.0f}% of the damage: "
                                                 "protect them first, then spread what the budget leaves")
    return "distributed", (f"the damage is spread (top {FEW} {what}: {top.share_pct.sum():.0f}%): no placement "
                           "rule of thumb fits; let `lacq optimize` spend the budget by recovery per byte")


def single_bottleneck(df: pd.DataFrame, gap: float) -> tuple[str, float, float, float] | None:
    """(unit, % of the damage, % of the gap it recovers alone, the most any other unit recovers %) where one
    unit is the single bottleneck (see the module's docstring), else None. `df` is a `unit_frame`."""
    if df.empty or gap <= 0:
        return None
    top = df.loc[df.share_pct.idxmax()]
    recovered = 100 * df.recovery / gap
    others = recovered.drop(index=top.name)
    next_best = float(others.max()) if not others.empty else 0.0
    mine = float(recovered.loc[top.name])
    if top.share_pct >= 100 * BOTTLENECK_SHARE and mine >= 100 * BOTTLENECK_SHARE and next_best <= 100 * BOTTLENECK_NEXT:
        return str(top.unit), float(top.share_pct), mine, next_best
    return None


def plot_scan(scan: Scan, out_dir: Path, stem: str) -> list[Path]:
    """One bar chart per unit kind: recovery and damage per unit, with their ±."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for kinds in partitions(scan):
        df = unit_frame(scan, kinds[:1])
        if df.empty:
            continue
        order = df.sort_values("block" if df.block.notna().all() else "unit")
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(order) + 2), 3.6))
        x = range(len(order))
        ax.bar([i - 0.2 for i in x], order.recovery, 0.4, yerr=order.recovery_err, label=f"recovery (only it at {scan.highest})")
        ax.bar([i + 0.2 for i in x], order.damage, 0.4, yerr=order.damage_err, label=f"damage (only it at {scan.lowest})")
        ax.set_xticks(list(x), list(order.unit), rotation=90, fontsize=7)
        ax.set_ylabel("KLD vs base")
        ax.set_title(f"{Path(scan.model['path']).name}: {kinds[0]} sensitivity, {scan.lowest} ↔ {scan.highest}, "
                     f"{scan.chunks}×{scan.ctx} tokens", fontsize=9)
        ax.legend(fontsize=7)
        out = Path(out_dir) / f"{stem}-{kinds[0]}.png"
        with atomic_output(out) as part:
            fig.savefig(part, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out)
    return written
