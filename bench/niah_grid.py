#!/usr/bin/env python3
"""Needle-in-a-haystack grids (depth × context) for KV configurations, f16 baseline first.

    python bench/niah_grid.py [--configs f16/f16,q8_0/q4_0,q8_0/q4_0+b2] [--ctx 1024,2048,4096,8192]
                              [--depths 0,25,50,75,100] [--trials 5] [--threads N] [--backend cuda --ngl 99]

Prints one markdown grid per configuration and appends them, with the exact
command, to bench/results/niah_grid.md (or --out); --plot writes all heatmaps.
"""

from __future__ import annotations

import sys
import time

from common import RESULTS, emit_table, kv_from_label, parser, results_header, run_script

from lacq.llama.build import BuildSpec, require_build
from lacq.measure.niah.grid import measure_niah
from lacq.model.info import inspect_model
from lacq.model.resolve import resolve_model
from lacq.results.plots import plot_niah
from lacq.results.render import niah_grid_lines
from lacq.results.store import open_store
from lacq.results.tables import niah_grid_frame

DEFAULT = "f16/f16,q8_0/q4_0,q8_0/q4_0+b2"


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "niah_grid.md", fa="auto", plot=True)
    ap.add_argument("--configs", default=DEFAULT, help="K/V or K/V+bN, comma-separated; the first is the baseline")
    ap.add_argument("--ctx", default="1024,2048,4096,8192")
    ap.add_argument("--depths", default="0,25,50,75,100")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runner", default="bindings", choices=["bindings", "completion"])
    args = ap.parse_args()
    lengths = [int(x) for x in args.ctx.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    b = require_build(BuildSpec(backend=args.backend), args.source)
    store = open_store()
    model = resolve_model(args.model)
    info = inspect_model(model)
    study = f"bench-niah:{args.backend}:{b.key}:t{args.trials}:s{args.seed}"
    lines = results_header(f"NIAH, {model.name}, {args.backend}, {args.trials} trials per cell, seed {args.seed}",
                           b, ["python", *sys.argv])
    frames = {}
    for text in args.configs.split(","):
        label, kv = kv_from_label(text, args.fa)
        t0 = time.monotonic()
        out = measure_niah(b, store, model, info, kv, lengths=lengths, depths=depths, trials=args.trials,
                           seed=args.seed, runner=args.runner, threads=args.threads, ngl=args.ngl, label=label,
                           study=study,
                           progress=lambda f, d: print(f"\r{label}: {f:4.0%} {d:40}", end="", file=sys.stderr))
        print(file=sys.stderr)
        res = store.get(out.result_id)
        df = niah_grid_frame(res.metrics)
        frames[label] = df
        lines += [f"**{label}** ({res.metrics['pass_rate']:.0%} overall, {time.monotonic() - t0:.0f} s, "
                  f"{out.runner})", ""]
        lines += niah_grid_lines(df, all_depths=True) + [""]
    emit_table(lines, args.out)
    if args.plot:
        plot_niah(frames, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_script(main))
