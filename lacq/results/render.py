"""Rendering a table: a pandas frame and its column map -> rich table, markdown, csv or json.

The only module besides the CLI that prints (through a rich Console it is given);
`markdown_lines` gives bench/ scripts the same markdown without printing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from lacq.results.tables import PPL_COLUMNS

FORMATS = ("table", "md", "csv", "json")
SIGNIFICANT = 4  # digits of a number shown without an error beside it
ERROR_DIGITS = 2  # significant digits of an error; its value is rounded to the same decimal place
# A value column -> the column holding its ± (one standard error): both shown to the error's precision.
ERRORS = {"recovery": "recovery_err", "damage": "damage_err"}


def significant(value: float, digits: int = SIGNIFICANT) -> str:
    """`value` to `digits` significant digits ("0.06715"); whole numbers up to 1e6 in full ("12346");
    scientific notation below 1e-4 and from 1e6 on ("3.2e-05")."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if not 1e-4 <= abs(value) < 1e6:
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        return (mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa) + "e" + exponent
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    if decimals <= 0:
        return f"{value:.0f}"
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def with_error(value: float, error: float) -> tuple[str, str]:
    """A value and its ±, the error to ERROR_DIGITS significant digits and the value to the same decimal place
    (never more than 6 significant digits): 0.067145, 0.0095009 -> ("0.0671", "0.0095")."""
    if not (math.isfinite(error) and error > 0 and math.isfinite(value)):
        return significant(value), "-" if math.isnan(error) else significant(error)
    decimals = ERROR_DIGITS - 1 - math.floor(math.log10(error))
    if value:
        decimals = min(decimals, 5 - math.floor(math.log10(abs(value))))
    decimals = max(decimals, 0)
    shown = f"{error:.{decimals}f}"
    return f"{value:.{decimals}f}", shown if float(shown) else significant(error, ERROR_DIGITS)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(col: str, value, row=None) -> str:
    """One cell for people; `row` (the cell's row) gives a value its error where ERRORS names one."""
    if _missing(value):
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
    if col in ("kld_p99", "kld_p999"):
        return f"{value:.4f}"
    if col in ("same_top_p_pct", "same_top_p_error_pct"):
        return f"{value:.2f}"
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
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return str(value)
    if isinstance(value, (int, np.integer)) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if row is not None:
        pair = ERRORS.get(col) or next((v for v, e in ERRORS.items() if e == col), None)
        value_col, error_col = (col, pair) if col in ERRORS else (pair, col)
        if pair is not None and error_col in row and value_col in row and not _missing(row[value_col]) \
                and not _missing(row[error_col]):
            shown = with_error(float(row[value_col]), float(row[error_col]))
            return shown[0] if col == value_col else shown[1]
    return significant(float(value))


def _cells(df: pd.DataFrame, cols: list[str]) -> list[list[str]]:
    return [[_fmt(c, row[c], row) for c in cols] for _, row in df.iterrows()]


def _json_value(value):
    """Full precision, and null for a missing number (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_value(value.item())
    return value


def records(df: pd.DataFrame, cols: list[str]) -> list[dict]:
    """The rows of `df`'s columns `cols` for JSON: full floats, null where a number is missing."""
    return [{c: _json_value(v) for c, v in r.items()} for r in df[cols].to_dict(orient="records")]


def render(df: pd.DataFrame, fmt: str, console: Console, title: str | None = None,
           columns: dict[str, str] = PPL_COLUMNS) -> None:
    cols = [c for c in columns if c in df.columns]
    # A column that is the same on every row (KV bits/value in a weight study) says nothing in a table.
    if fmt in ("table", "md", "markdown") and len(df) > 1:
        cols = [c for c in cols if c not in ("k_bpv", "v_bpv") or df[c].nunique(dropna=False) > 1]
    if fmt == "json":
        console.print_json(json.dumps(records(df, cols), default=str))
        return
    if fmt == "csv":
        # The same cells as the table (numbers for people), a missing value left empty.
        cells = pd.DataFrame([["" if v == "-" else v for v in r] for r in _cells(df, cols)], columns=cols)
        console.print(cells.to_csv(index=False), end="", markup=False, highlight=False, soft_wrap=True)
        return
    if fmt in ("md", "markdown"):
        console.print("\n".join(markdown_lines(df, {c: columns[c] for c in cols})), markup=False, highlight=False,
                      soft_wrap=True)
        return
    table = Table(title=title)
    for c in cols:
        table.add_column(columns[c], justify="left" if c in ("configuration", "mark") else "right")
    for row in _cells(df, cols):
        style = "bold green" if "best" in row[-1] else None
        table.add_row(*row, style=style)
    console.print(table)


def markdown_lines(df: pd.DataFrame, columns: dict[str, str]) -> list[str]:
    """A markdown table of `df`'s columns named in `columns` (in that order), formatted as everywhere."""
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(columns[c] or "note" for c in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _cells(df, cols)]
    return lines


def niah_grid(df: pd.DataFrame, fmt: str, console: Console, title: str) -> None:
    """A depth × context-length grid of NIAH pass rates (`tables.niah_grid_frame`)."""
    cells = lambda v: "-" if v is None or v != v else f"{v:.0%}"
    if fmt == "json":
        console.print_json(data={str(d): {str(l): _json_value(df.loc[d, l]) for l in df.columns} for d in df.index})
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
