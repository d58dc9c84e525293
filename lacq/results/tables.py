"""Every table lacq shows, built from stored results: one pandas frame and one column map each.

A column map gives the display order and header of a frame's columns; `render`
(results/render.py) turns any frame and map into a rich table, markdown, csv or
json. Frames keep one row per configuration (its latest result).
"""

from __future__ import annotations

import pandas as pd

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
    "kld_p999": "KLD 99.9%", "kld_p99": "KLD 99%", "same_top_p_pct": "Same top p %", "same_top_p_error_pct": "±",
    "ppl": "PPL", "ppl_error": "±", "ppl_delta_pct": "PPL Δ%", "compression": "Compression ×",
    "k_bpv": "K bits/value", "v_bpv": "V bits/value",
    "niah_pass_pct": "NIAH %", "niah_by_length": "NIAH by length", "mark": "",
}


def combined_frame(results: list[Result], base_label: str | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """PPL rows joined with KLD and NIAH results of the same configurations.

    Returns the frame and the columns to show: PPL's table alone when the study
    has no KLD or NIAH results; sorted by mean KLD when it has KLD.
    """
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


def niah_grid_frame(metrics: dict) -> pd.DataFrame:
    """Depth rows × length columns of pass rates (0..1) from a stored NIAH result."""
    cells = {(c["depth"], c["length"]): c["passed"] / c["n"] for c in metrics["grid"]}
    depths = sorted({d for d, _ in cells})
    lengths = sorted({l for _, l in cells})
    return pd.DataFrame([[cells.get((d, l)) for l in lengths] for d in depths],
                        index=pd.Index(depths, name="depth %"), columns=pd.Index(lengths, name="context"))


def niah_summary_frame(results: list[Result]) -> pd.DataFrame:
    """Per configuration (latest NIAH result): overall pass rate and pass rate per context length.

    For `lacq report`: join on `configuration` to put a NIAH column beside PPL/KLD.
    """
    latest = latest_by_label(results, "niah")
    rows = []
    for r in latest.values():
        by_len: dict[int, list[int]] = {}
        for c in r.metrics["grid"]:
            p, n = by_len.setdefault(c["length"], [0, 0])
            by_len[c["length"]] = [p + c["passed"], n + c["n"]]
        rows.append({"configuration": r.label, "niah_pass_pct": 100 * r.metrics["pass_rate"],
                     "niah_by_length": " ".join(f"{l}:{p / n:.0%}" for l, (p, n) in sorted(by_len.items())),
                     "niah_trials": r.metrics["trials"]})
    return pd.DataFrame(rows, columns=["configuration", "niah_pass_pct", "niah_by_length", "niah_trials"])


def tail_columns(m: dict) -> dict:
    """The columns every KLD table shows beside the mean ± error, from a stored KLD result's metrics: the 99.9%
    and 99% quantiles and how often the top token is the base's (± its error)."""
    return {"kld_p999": m["kld_quantiles"].get("p99.9"), "kld_p99": m["kld_quantiles"].get("p99"),
            "same_top_p_pct": m["same_top_p_pct"], "same_top_p_error_pct": m.get("same_top_p_error_pct")}


# Columns of the KL-divergence table (bench/kld_recipes.py), with their headers.
KLD_COLUMNS = {
    "configuration": "Configuration", "size_mb": "Size (MB)", "kld_mean": "Mean KLD", "kld_mean_error": "±",
    "kld_p999": "KLD 99.9%", "kld_p99": "KLD 99%", "kld_max": "KLD max", "dp_rms_pct": "RMS Δp %",
    "same_top_p_pct": "Same top p %", "same_top_p_error_pct": "±", "ppl_q": "PPL", "ppl_ratio": "PPL ratio",
}


def kld_frame(results: list[Result]) -> pd.DataFrame:
    latest = latest_by_label(results, "kld")
    rows = []
    for r in latest.values():
        m = r.metrics
        rows.append({"configuration": r.label, "size_mb": r.model_bytes / 1e6, "kld_mean": m["kld_mean"],
                     "kld_mean_error": m["kld_mean_error"], **tail_columns(m),
                     "kld_max": m["kld_quantiles"].get("max"), "dp_rms_pct": m["dp_rms_pct"], "ppl_q": m["ppl_q"],
                     "ppl_ratio": m["ppl_ratio"],
                     "recipe": r.recipe})
    df = pd.DataFrame(rows, columns=list(KLD_COLUMNS) + ["recipe"])
    df = df.round({"kld_mean": 6, "kld_mean_error": 6, "kld_p999": 5, "kld_p99": 5, "kld_max": 4, "dp_rms_pct": 3,
                   "same_top_p_pct": 3, "same_top_p_error_pct": 3, "ppl_q": 4, "ppl_ratio": 5})
    return df.sort_values("kld_mean").reset_index(drop=True)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    ra, rb = pd.Series(a).rank(), pd.Series(b).rank()
    return float(ra.corr(rb))


# Columns of the llama-bench table.
BENCH_COLUMNS = {"configuration": "Configuration", "depth": "Depth", "pp_ts": "Prefill t/s", "pp_sd": "±",
                 "tg_ts": "Decode t/s", "tg_sd": "±", "device": "Device", "build_key": "Build"}


def bench_frame(results: list[Result]) -> pd.DataFrame:
    rows = {}
    for r in results:
        if r.kind != "bench":
            continue
        for b in r.metrics["rows"]:
            row = rows.setdefault((r.label, b["n_depth"]), {
                "configuration": r.label, "depth": b["n_depth"], "device": r.metrics.get("device"),
                "build_key": r.metrics.get("build_key")})
            kind = "pp" if b["n_prompt"] and not b["n_gen"] else "tg"
            row[f"{kind}_ts"], row[f"{kind}_sd"] = round(b["avg_ts"], 2), round(b["stddev_ts"], 2)
    return pd.DataFrame(list(rows.values()), columns=list(BENCH_COLUMNS))


# The placement study (`lacq demo`): every file by KL-divergence against the base, PPL beside.
PLACEMENT_COLUMNS = {
    "configuration": "Configuration", "kind": "Kind", "size_mb": "Size (MB)", "kld_mean": "Mean KLD",
    "kld_mean_error": "KLD ±", "kld_p999": "KLD 99.9%", "kld_p99": "KLD 99%", "same_top_p_pct": "Same top p %",
    "same_top_p_error_pct": "±", "ppl": "PPL", "ppl_error": "±", "ppl_delta_pct": "PPL Δ%", "mark": "",
}
NOISE_SIGMAS = 2.0  # a lead smaller than this many combined ± is not called a win


def placement_frame(results: list[Result], budget_label: str | None = None) -> pd.DataFrame:
    """Rows sorted by mean KLD, with PPL beside (the same chunks) and marks.

    `pareto`: no other row is both smaller and lower in KLD. `★`: the lowest KLD among the rows no
    larger than `budget_label`'s file, marked only where it leads the runner-up by more than
    NOISE_SIGMAS × their ± combined (else the runner-up is named as a tie).
    """
    latest = latest_by_label(results, "kld")
    rows = []
    for r in latest.values():
        m = r.metrics
        rows.append({"configuration": r.label, "kind": m.get("kind", ""), "size_mb": r.model_bytes / 1e6,
                     "kld_mean": m["kld_mean"], "kld_mean_error": m["kld_mean_error"],
                     **tail_columns(m), "ppl": m["ppl_q"], "ppl_error": m["ppl_q_error"], "ppl_base": m["ppl_base"]})
    df = pd.DataFrame(rows, columns=[*PLACEMENT_COLUMNS, "ppl_base"])
    if df.empty:
        return df
    df["ppl_delta_pct"] = (df.ppl / df.ppl_base - 1) * 100
    df = df.sort_values("kld_mean").reset_index(drop=True)
    marks = ["" for _ in range(len(df))]
    for i, r in df.iterrows():
        if not (((df.size_mb <= r.size_mb) & (df.kld_mean < r.kld_mean)) |
                ((df.size_mb < r.size_mb) & (df.kld_mean <= r.kld_mean))).any():
            marks[i] = "pareto"
    if budget_label is not None and budget_label in set(df.configuration):
        limit = df.loc[df.configuration == budget_label, "size_mb"].iloc[0] + 1e-9
        within = df[df.size_mb <= limit]  # sorted by KLD
        best = within.iloc[0]
        if len(within) > 1:
            second = within.iloc[1]
            noise = NOISE_SIGMAS * (best.kld_mean_error ** 2 + second.kld_mean_error ** 2) ** 0.5
            i = within.index[0]
            if second.kld_mean - best.kld_mean > noise:
                marks[i] = f"★ best at ≤ {limit:.1f} MB" + (", pareto" if marks[i] else "")
            else:
                marks[i] = f"≈ {second.configuration} (within noise)" + (", pareto" if marks[i] else "")
    df["mark"] = marks
    return df


def machine_lines(results: list[Result]) -> list[str]:
    """A report's footer: the machines its rows were measured on (CPU model, ggml CPU features).

    The same commit and flags give slightly different PPL/KLD on CPUs with different features
    (a native build picks other SIMD kernels), so a table mixing machines says so.
    """
    seen: dict[tuple, list[str]] = {}
    unknown = 0
    for r in results:
        if not r.machine:
            unknown += 1
            continue
        key = (r.machine.get("cpu") or "unknown CPU", tuple(r.machine.get("ggml_cpu") or ()))
        seen.setdefault(key, []).append(r.label)
    lines = []
    for (cpu, features), labels in seen.items():
        where = f"measured on {cpu}"
        if features:
            where += f" (ggml CPU: {' '.join(features)})"
        if len(seen) > 1:
            where += f": {', '.join(dict.fromkeys(labels))}"
        lines.append(where)
    if len(seen) > 1:
        lines.append(f"rows come from {len(seen)} machines: CPU results agree across machines only to a few "
                     "tenths of a percent; compare rows measured on one machine")
    if unknown:
        lines.append(f"{unknown} result(s) carry no machine record (stored by an older lacq)")
    return lines
