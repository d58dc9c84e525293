#!/usr/bin/env python3
"""Prefill and decode speed (llama-bench) per KV configuration and depth.

    python bench/speed.py --backend cuda --ngl 99 [--source PATH] \
        [--configs f16/f16,q8_0/q4_0,q8_0/q4_0+b2] [--pp 512] [--tg 128] [--depth 0,7680] [-r 5]

Per-layer policies (+bN) reach llama-bench through the patch's environment
variables. Prints a markdown table (tokens/s ± stddev, device, build key) and
appends it, with the exact command, to bench/results/speed.md; --plot writes a chart.
"""

from __future__ import annotations

import sys

from common import RESULTS, emit_table, kv_from_label, parser, results_header, run_script

from lacq.llama.build import BuildSpec, require_build
from lacq.measure.bench import measure_bench
from lacq.model.info import inspect_model
from lacq.model.resolve import resolve_model
from lacq.results.plots import plot_bench
from lacq.results.render import markdown_lines
from lacq.results.store import open_store
from lacq.results.tables import bench_frame

COLUMNS = {"configuration": "K/V", "depth": "depth", "pp_ts": "prefill t/s", "pp_sd": "±", "tg_ts": "decode t/s",
           "tg_sd": "±"}
DEFAULT = "f16/f16,q8_0/q4_0,q8_0/q4_0+b2"


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "speed.md", fa="on", plot=True)
    ap.add_argument("--configs", default=DEFAULT)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--depth", default="0,7680", help="tokens already in the cache; depth + pp must fit the "
                    "model's context (SmolLM2: 8192)")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    args = ap.parse_args()
    b = require_build(BuildSpec(backend=args.backend), args.source)
    store = open_store()
    model = resolve_model(args.model)
    info = inspect_model(model)
    study = f"bench-speed:{args.backend}:{b.key}"
    results = []
    for text in args.configs.split(","):
        label, kv = kv_from_label(text, args.fa)
        out = measure_bench(b, store, model, info, kv, pp=args.pp, tg=args.tg,
                            depths=tuple(int(d) for d in args.depth.split(",")), repetitions=args.repetitions,
                            threads=args.threads, ngl=args.ngl, label=label, study=study)
        results.append(store.get(out.result_id))
        print(f"{label}: done ({out.seconds:.0f} s)", file=sys.stderr, flush=True)
    df = bench_frame(results)
    device = df.device.iloc[0]
    lines = results_header(f"llama-bench, {model.name}, {args.backend} ({device}), pp{args.pp} / tg{args.tg}, "
                   f"{args.repetitions} repetitions",
                           b, ["python", *sys.argv])
    lines += markdown_lines(df, COLUMNS)
    emit_table(lines + [""], args.out)
    if args.plot:
        plot_bench(df, args.plot)


if __name__ == "__main__":
    sys.exit(run_script(main))
