#!/usr/bin/env python3
"""A weight scan measured in place by the evaluation engine against the former path (a file per variant).

    python bench/engine.py [--threads 2] [--chunks 4] [--units group] [--types q4_0,q8_0] [--bare 3]

On SmolLM2 (its F16 base): the same scan twice, `--no-engine` (each variant assembled into a file and
measured by its own llama-perplexity run) and with the engine (one process, variants in place), each into
a fresh results database; then --bare runs of one plain `llama-perplexity --kl-divergence` process on the
all-q4_0 candidate file over the same tokens. Prints the table (whole scan, per variant, per variant
against the bare process) and appends it, with the command, to bench/results/engine_cpu.md (--backend cuda
with --ngl: engine_cuda.md).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, emit_table, parser, results_header, run_script

from lacq import paths
from lacq.llama.build import BuildSpec, require_build
from lacq.llama.tools import kld
from lacq.model.resolve import resolve_model
from lacq.quantize import convert_ftype
from lacq.results.store import Store
from lacq.studies.scan import scan_weights


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = parser(__doc__, out=None)
    ap.add_argument("--base", default=None, help="F16 base (default: SmolLM2 dequantized by llama-quantize)")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--units", default="group")
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--bare", type=int, default=3, help="runs of the bare KLD process (median)")
    ap.add_argument("--skip-old", action="store_true", help="time only the engine's scan")
    args = ap.parse_args()
    out = args.out or RESULTS / ("engine_cuda.md" if args.backend == "cuda" else "engine_cpu.md")
    build = require_build(BuildSpec(backend=args.backend), args.source)
    model = resolve_model(args.model or "smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else convert_ftype(
            build, Store(Path(tmp) / "convert.sqlite"), model, paths.sub("models") / f"{model.stem}.f16.gguf")
        kw = {"types": args.types.split(","), "units": tuple(args.units.split(",")), "chunks": args.chunks,
              "ctx": args.ctx, "threads": args.threads}
        rows = {}
        for name, engine in (("assembled files (--no-engine)", False), ("engine", True)):
            if not engine and args.skip_old:
                continue
            store = Store(Path(tmp) / f"{engine}.sqlite")
            t0 = time.perf_counter()
            scan = scan_weights(build, store, model, base, paths.default_corpus(), engine=engine, **kw)
            wall = time.perf_counter() - t0
            variants = [r for r in store.results(kind="kld") if r.study == scan.provenance["study"]]
            rows[name] = (wall, variants, scan)
        scan = rows["engine"][2]
        q4 = Path(scan.provenance["files"][scan.lowest])
        logits = Path(scan.base["logits"])
        bare_argv = kld.argv(build.tool("llama-perplexity"), q4, logits, ctx=args.ctx, threads=args.threads,
                             ngl=args.ngl)
        timed(bare_argv)  # page cache
        bare = statistics.median(timed(bare_argv) for _ in range(args.bare))
    lines = results_header(f"Scan of {model.name} ({args.units}, {args.types}, {args.chunks}x{args.ctx}): "
                           "engine vs a file and a process per variant", build, sys.argv)
    lines += ["| path | variants | scan wall (s) | per variant (s) | per variant / bare KLD process |",
              "| --- | --- | --- | --- | --- |"]
    for name, (wall, variants, _) in rows.items():
        # from the first stored variant to the last: everything a variant costs (assembly, hashing, process
        # start and model load on the former path), without the scan's setup
        per = (variants[-1].created - variants[0].created) / (len(variants) - 1)
        lines.append(f"| {name} | {len(variants)} | {wall:.1f} | {per:.3f} | {per / bare:.2f}x |")
    lines += ["", (f"bare KLD process (`{' '.join(Path(a).name if os.sep in a else a for a in bare_argv)}`), "
              f"median of {args.bare}: {bare:.3f} s. Scan wall includes the scan's setup (candidate files, cached "
              "after the first path; base logits; the engine's start); per variant is the time from the first "
              "stored variant to the last over their number less one.")]
    emit_table(lines, out)


if __name__ == "__main__":
    sys.exit(run_script(main))
