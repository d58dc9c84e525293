"""Result tables: pandas rows -> rich / markdown / csv / json.

The only module besides the CLI that prints (through a rich Console it is given).
"""

from __future__ import annotations

import json
import math

import pandas as pd
from rich.console import Console
from rich.table import Table

from lacq.results.store import Result, latest_by_label

# Columns of the perplexity comparison, in display order, with their headers.
PPL_COLUMNS = {
    "configuration": "Configuration",
    "size_mb": "Size (MB)",
    "ppl": "PPL",
    "ppl_error": "±",
    "ppl_delta_pct": "PPL Δ%",
    "compression": "Compression ×",
    "k_bpv": "K bits/value",
    "v_bpv": "V bits/value",
    "mark": "",
}


def ppl_frame(results: list[Result], base_label: str | None = None) -> pd.DataFrame:
    """One row per configuration (its latest result), with deltas against the base.

    The base is `base_label` if given, else the largest model among the rows
    (the unquantized reference in a weight study).
    """
    latest = latest_by_label(results, "ppl")
    if not latest:
        return pd.DataFrame(columns=list(PPL_COLUMNS))
    rows = []
    for r in latest.values():
        m = r.metrics
        rows.append({
            "configuration": r.label, "size_mb": r.model_bytes / 1e6, "ppl": m["ppl"], "ppl_error": m["ppl_error"],
            "k_bpv": m.get("k_bits_per_value"), "v_bpv": m.get("v_bits_per_value"), "recipe": r.recipe,
            "chunks": r.chunks, "ctx": r.ctx,
        })
    df = pd.DataFrame(rows)
    if base_label is not None and base_label in set(df.configuration):
        base = df[df.configuration == base_label].iloc[0]
    else:
        base = df.sort_values("size_mb", ascending=False).iloc[0]
    df["ppl_delta_pct"] = (df.ppl / base.ppl - 1) * 100
    df["compression"] = base.size_mb / df.size_mb
    df["mark"] = _marks(df, base.configuration)
    df = df.sort_values(["ppl", "size_mb"]).reset_index(drop=True)
    return df


# The combined comparison: KLD first where a base exists, PPL beside it, NIAH after.
COMBINED_COLUMNS = {
    "configuration": "Configuration", "size_mb": "Size (MB)", "kld_mean": "Mean KLD", "kld_mean_error": "KLD ±",
    "kld_p99": "KLD 99%", "same_top_p_pct": "Same top p %", "ppl": "PPL", "ppl_error": "±",
    "ppl_delta_pct": "PPL Δ%", "compression": "Compression ×", "k_bpv": "K bits/value", "v_bpv": "V bits/value",
    "niah_pass_pct": "NIAH %", "niah_by_length": "NIAH by length", "mark": "",
}


def combined_frame(results: list[Result], base_label: str | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """PPL rows joined with KLD and NIAH results of the same configurations.

    Returns the frame and the columns to show: PPL's table alone when the study
    has no KLD or NIAH results; sorted by mean KLD when it has KLD.
    """
    from lacq.measure.kld import kld_frame, niah_summary_frame

    df = ppl_frame(results, base_label)
    columns = PPL_COLUMNS
    kld = kld_frame(results)
    if len(kld):
        kld = kld.drop(columns=[c for c in ("size_mb", "recipe", "ppl_q") if c in kld.columns])
        df = df.merge(kld, on="configuration", how="outer").sort_values("kld_mean", na_position="first")
        columns = COMBINED_COLUMNS
    niah = niah_summary_frame(results)
    if len(niah):
        df = df.merge(niah, on="configuration", how="left" if len(df) else "outer")
        columns = COMBINED_COLUMNS
    if columns is COMBINED_COLUMNS:
        columns = {c: h for c, h in COMBINED_COLUMNS.items() if c in df.columns and df[c].notna().any()}
    return df.reset_index(drop=True), columns


def _marks(df: pd.DataFrame, base_label: str) -> list[str]:
    """'base', '*' on the Pareto front (no row both smaller and better), '★ best trade-off'.

    The best trade-off is the Pareto row (other than the smallest) that buys the
    most perplexity per extra megabyte over the smallest configuration; with only
    one candidate it is that one.
    """
    others = df[df.configuration != base_label]
    pareto = set()
    for _, r in others.iterrows():
        dominated = ((others.size_mb <= r.size_mb) & (others.ppl < r.ppl)).any() or \
                    ((others.size_mb < r.size_mb) & (others.ppl <= r.ppl)).any()
        if not dominated:
            pareto.add(r.configuration)
    best = None
    if len(others):
        smallest = others.sort_values(["size_mb", "ppl"]).iloc[0]
        gains = {}
        for _, r in others[others.configuration.isin(pareto)].iterrows():
            extra = r.size_mb - smallest.size_mb
            if extra > 0:
                gains[r.configuration] = (smallest.ppl - r.ppl) / extra
        best = max(gains, key=gains.get) if gains else smallest.configuration
    marks = []
    for label in df.configuration:
        if label == base_label:
            marks.append("base")
        elif label == best:
            marks.append("★ best trade-off")
        elif label in pareto:
            marks.append("pareto")
        else:
            marks.append("")
    return marks


def _fmt(col: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if col == "size_mb":
        return f"{value:.1f}"
    if col in ("ppl", "ppl_error"):
        return f"{value:.4f}"
    if col == "ppl_delta_pct":
        return "-" if abs(value) < 1e-12 else f"{value:+.2f}%"
    if col == "compression":
        return f"{value:.2f}×"
    if col in ("k_bpv", "v_bpv"):
        return f"{value:.3f}"
    if col in ("kld_mean", "kld_mean_error"):
        return f"{value:.5f}"
    if col in ("kld_p99", "same_top_p_pct", "niah_pass_pct"):
        return f"{value:.2f}" if col != "niah_pass_pct" else f"{value:.0f}%"
    return str(value)


def render(df: pd.DataFrame, fmt: str, console: Console, title: str | None = None,
           columns: dict[str, str] = PPL_COLUMNS) -> None:
    cols = [c for c in columns if c in df.columns]
    # A column that is the same on every row (KV bits/value in a weight study) says nothing in a table.
    if fmt in ("table", "md", "markdown") and len(df) > 1:
        cols = [c for c in cols if c not in ("k_bpv", "v_bpv") or df[c].nunique(dropna=False) > 1]
    if fmt == "json":
        console.print_json(json.dumps(df[cols].to_dict(orient="records"), default=str))
        return
    if fmt == "csv":
        console.print(df[cols].to_csv(index=False), end="", markup=False, highlight=False, soft_wrap=True)
        return
    cells = [[_fmt(c, row[c]) for c in cols] for _, row in df.iterrows()]
    if fmt in ("md", "markdown"):
        header = [columns[c] or "note" for c in cols]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=title)
    for c in cols:
        table.add_column(columns[c], justify="left" if c in ("configuration", "mark") else "right")
    for row in cells:
        style = "bold green" if "best" in row[-1] else None
        table.add_row(*row, style=style)
    console.print(table)
