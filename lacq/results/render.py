"""Rendering a table: a pandas frame and its column map -> rich table, markdown, csv or json.

The only module besides the CLI that prints (through a rich Console it is given);
`markdown_lines` gives bench/ scripts the same markdown without printing.
"""

from __future__ import annotations

import json
import math

import pandas as pd
from rich.console import Console
from rich.table import Table

from lacq.results.tables import PPL_COLUMNS

FORMATS = ("table", "md", "csv", "json")


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
    if col in ("kld_p99", "same_top_p_pct"):
        return f"{value:.2f}" if col == "same_top_p_pct" else f"{value:.4f}"
    if col == "niah_pass_pct":
        return f"{value:.0f}%"
    if col in ("pp_ts", "pp_sd", "tg_ts", "tg_sd"):
        return f"{value:.1f}"
    if col == "kld_max":
        return f"{value:.3f}"
    if col == "dp_rms_pct":
        return f"{value:.3f}"
    if col == "seconds":
        return f"{value:.0f}"
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
    if fmt in ("md", "markdown"):
        console.print("\n".join(markdown_lines(df, {c: columns[c] for c in cols})), markup=False, highlight=False,
                      soft_wrap=True)
        return
    cells = [[_fmt(c, row[c]) for c in cols] for _, row in df.iterrows()]
    table = Table(title=title)
    for c in cols:
        table.add_column(columns[c], justify="left" if c in ("configuration", "mark") else "right")
    for row in cells:
        style = "bold green" if "best" in row[-1] else None
        table.add_row(*row, style=style)
    console.print(table)


def markdown_lines(df: pd.DataFrame, columns: dict[str, str]) -> list[str]:
    """A markdown table of `df`'s columns named in `columns` (in that order), formatted as everywhere."""
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(columns[c] or "note" for c in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(c, row[c]) for c in cols) + " |" for _, row in df.iterrows()]
    return lines


def niah_grid(df: pd.DataFrame, fmt: str, console: Console, title: str) -> None:
    """A depth × context-length grid of NIAH pass rates (`tables.niah_grid_frame`)."""
    cells = lambda v: "-" if v is None or v != v else f"{v:.0%}"
    if fmt == "json":
        console.print_json(data={str(d): {str(l): df.loc[d, l] for l in df.columns} for d in df.index})
        return
    if fmt == "md":
        console.print("\n".join(niah_grid_lines(df)), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table("depth", *[str(c) for c in df.columns], title=title)
    for d in df.index:
        table.add_row(f"{d}%", *[cells(df.loc[d, c]) for c in df.columns])
    console.print(table)


def niah_grid_lines(df: pd.DataFrame, all_depths: bool = False) -> list[str]:
    """The NIAH grid as markdown; `all_depths` adds the mean pass rate of each context length."""
    cells = lambda v: "-" if v is None or v != v else f"{v:.0%}"
    lines = ["| depth \\ context | " + " | ".join(str(c) for c in df.columns) + " |",
             "|" + " --- |" * (len(df.columns) + 1)]
    lines += [f"| {d}% | " + " | ".join(cells(df.loc[d, c]) for c in df.columns) + " |" for d in df.index]
    if all_depths:
        lines.append("| all depths | " + " | ".join(cells(df[c].mean()) for c in df.columns) + " |")
    return lines
