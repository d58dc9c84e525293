"""Plots of stored results (PNG, written atomically): NIAH heatmaps, speed by depth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lacq.fsutil import atomic_output


def plot_niah(frames: dict[str, pd.DataFrame], out: Path) -> Path:
    """One heatmap per configuration, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(frames)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.4), squeeze=False)
    for ax, (name, df) in zip(axes[0], frames.items()):
        im = ax.imshow(df.values.astype(float), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(df.columns)), [str(c) for c in df.columns])
        ax.set_yticks(range(len(df.index)), [f"{d}%" for d in df.index] if ax is axes[0][0] else [])
        ax.set_xlabel("context (tokens)")
        ax.set_title(name, fontsize=9)
        for i in range(df.shape[0]):
            for j in range(df.shape[1]):
                v = df.values[i, j]
                ax.text(j, i, "-" if v is None else f"{v:.0%}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="pass rate")
    with atomic_output(out) as part:
        fig.savefig(part, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_bench(df: pd.DataFrame, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, col, sd, title in ((axes[0], "pp_ts", "pp_sd", "prefill"), (axes[1], "tg_ts", "tg_sd", "decode")):
        for name, g in df.groupby("configuration", sort=False):
            ax.errorbar(g["depth"], g[col], yerr=g[sd], marker="o", capsize=3, label=name)
        ax.set_xlabel("depth (tokens in the KV cache)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    with atomic_output(out) as part:
        fig.savefig(part, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
