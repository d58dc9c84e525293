#!/usr/bin/env python3
"""What lacq costs on top of llama.cpp: `lacq inspect` wall time, and `lacq ppl` against raw llama-perplexity.

    python bench/overhead.py [--models smollm2,gemma3-270m] [--pairs 5] [--chunks 4]

For each model: the median wall time of `lacq inspect MODEL` (a fresh process each time, as a user
runs it), and the median ratio of `lacq ppl MODEL --chunks N` to the same llama-perplexity command
lacq runs (its argv, taken from the stored result), over --pairs interleaved pairs. Appends the
table, with the command, to bench/results/overhead.md.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import pandas as pd
from common import RESULTS, emit_table, parser, results_header, run_script

from lacq.llama.build import BuildSpec, require_build
from lacq.model.resolve import resolve_model
from lacq.results.render import markdown_lines
from lacq.results.store import open_store

COLUMNS = {"model": "model", "inspect_s": "lacq inspect (s)", "raw_s": "llama-perplexity (s)",
           "lacq_s": "lacq ppl (s)", "ratio": "lacq / raw"}


def timed(argv: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "overhead.md")
    ap.add_argument("--models", default="smollm2,gemma3-270m", help="models whose `lacq inspect` is timed")
    ap.add_argument("--ppl-models", default="smollm2", help="models whose `lacq ppl` overhead is timed")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()
    build = require_build(BuildSpec(backend=args.backend), args.source)
    lacq = [sys.executable, "-m", "lacq"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LACQ_DB": os.path.join(tmp, "overhead.sqlite")}
        for spec in args.models.split(","):
            model = resolve_model(spec)
            inspect = [timed([*lacq, "inspect", str(model)]) for _ in range(args.pairs)]
            if spec not in args.ppl_models.split(","):
                rows.append({"model": model.name, "inspect_s": statistics.median(inspect)})
                continue
            ppl = [*lacq, "ppl", str(model), "--chunks", str(args.chunks), "--label", "overhead"]
            if args.threads:
                ppl += ["-t", str(args.threads)]
            timed(ppl, env)  # warm the page cache and lacq's file-hash cache, and learn the raw argv
            raw = open_store(os.path.join(tmp, "overhead.sqlite")).results(kind="ppl")[-1].command
            pairs = [(timed(raw), timed(ppl, env)) for _ in range(args.pairs)]
            rows.append({"model": model.name, "inspect_s": statistics.median(inspect),
                         "raw_s": statistics.median(r for r, _ in pairs),
                         "lacq_s": statistics.median(l for _, l in pairs),
                         "ratio": statistics.median(l / r for r, l in pairs)})
            print(f"{model.name}: {rows[-1]}; pairs {[(round(r, 2), round(l, 2)) for r, l in pairs]}", file=sys.stderr, flush=True)
    lines = results_header(f"lacq's overhead, medians of {args.pairs} runs ({args.chunks}-chunk ppl), {args.backend}",
                           build, ["python", *sys.argv])
    emit_table(lines + markdown_lines(pd.DataFrame(rows).round(3), COLUMNS) + [""], args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
