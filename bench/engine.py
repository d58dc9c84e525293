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
from lacq.measure.kld import base_logits
from lacq.model.info import inspect_model
from lacq.model.resolve import resolve_model
from lacq.plan.kv.config import KvConfig
from lacq.quantize import convert_ftype
from lacq.results.store import Store
from lacq.studies.engine import EngineSession
from lacq.studies.scan import (
    WeightVariant,
    candidate_files,
    engine_tensors,
    measure_assembled,
    scan_weights,
    weight_units,
    work_dir,
)


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def interleaved(build, base: Path, kw: dict, pairs: int, bare_argv_for) -> tuple[list[str], dict]:
    """`pairs` group variants, each measured the former way, then by the engine, then one bare KLD process, in turn
    (a shared machine's load moves; each ratio compares neighbours). Returns table lines."""
    store = Store(Path(kw.pop("db")))
    info = inspect_model(base)
    cands = kw["types"]
    work = work_dir(store.sha256(base))
    files = candidate_files(build, store, base, info, cands, work)
    cinfo = {t: inspect_model(p) for t, p in files.items()}
    corpus = paths.default_corpus()
    logits, _ = base_logits(build, store, base, info, corpus, ctx=kw["ctx"], chunks=kw["chunks"], threads=kw["threads"])
    lowest, highest = cands[0], cands[-1]
    units = weight_units(info, "group")[:pairs]
    session = EngineSession(build, files[lowest], cinfo[lowest], logits, {t: files[t] for t in cands[1:]},
                            ctx=kw["ctx"], threads=kw["threads"])
    bare_argv = bare_argv_for(files[lowest], logits)
    rows = []
    try:
        session.evaluate("warm", {}, KvConfig())
        timed(bare_argv)
        for uid, _, names, _ in units:
            v = WeightVariant(lowest, names, highest)
            t0 = time.perf_counter()
            measure_assembled(build, store, files, cinfo, v.default, {n: v.type for n in v.tensors}, base, info, corpus,
                              work, ctx=kw["ctx"], chunks=kw["chunks"], threads=kw["threads"], label=f"old {uid}",
                              study="bench-engine")
            old = time.perf_counter() - t0
            t0 = time.perf_counter()
            session.measure(store, label=f"engine {uid}", study="bench-engine",
                            tensors=engine_tensors(v, cinfo, lowest), kv=KvConfig(), corpus=corpus,
                            record_model=files[v.default], base=base, base_sha256=store.sha256(base))
            eng = time.perf_counter() - t0
            rows.append((uid, old, eng, timed(bare_argv)))
    finally:
        session.close()
    lines = ["| variant (raise to " + highest + ") | former path (s) | engine (s) | bare KLD process (s) | engine / bare | "
             "former / bare |", "| --- | --- | --- | --- | --- | --- |"]
    for uid, old, eng, bare in rows:
        lines.append(f"| {uid} | {old:.2f} | {eng:.2f} | {bare:.2f} | {eng / bare:.2f}x | {old / bare:.2f}x |")
    med = {k: statistics.median(r[i] for r in rows) for i, k in ((1, "old"), (2, "engine"), (3, "bare"))}
    ratio = statistics.median(r[2] / r[3] for r in rows)
    lines.append(f"| median | {med['old']:.2f} | {med['engine']:.2f} | {med['bare']:.2f} | {ratio:.2f}x | "
                 f"{statistics.median(r[1] / r[3] for r in rows):.2f}x |")
    return lines, {"bare": " ".join(Path(a).name if os.sep in a else a for a in bare_argv)}


def main() -> None:
    ap = parser(__doc__, out=None)
    ap.add_argument("--base", default=None, help="F16 base (default: SmolLM2 dequantized by llama-quantize)")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--units", default="group")
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--bare", type=int, default=3, help="runs of the bare KLD process (median)")
    ap.add_argument("--skip-old", action="store_true", help="time only the engine's scan")
    ap.add_argument("--pairs", type=int, default=0,
                    help="instead of whole scans: this many group variants, former path, engine and a bare process "
                         "in turn (for a shared machine whose load moves)")
    args = ap.parse_args()
    out = args.out or RESULTS / ("engine_cuda.md" if args.backend == "cuda" else "engine_cpu.md")
    build = require_build(BuildSpec(backend=args.backend), args.source)
    model = resolve_model(args.model or "smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else convert_ftype(
            build, Store(Path(tmp) / "convert.sqlite"), model, paths.sub("models") / f"{model.stem}.f16.gguf")
        kw = {"types": args.types.split(","), "units": tuple(args.units.split(",")), "chunks": args.chunks,
              "ctx": args.ctx, "threads": args.threads}
        if args.pairs:
            def bare_for(q4, logits):
                return kld.argv(build.tool("llama-perplexity"), q4, logits, ctx=args.ctx, threads=args.threads,
                                ngl=args.ngl)
            kw.pop("units")
            table, info = interleaved(build, base, {**kw, "db": Path(tmp) / "pairs.sqlite"}, args.pairs, bare_for)
            lines = results_header(f"{model.name}, {args.chunks}x{args.ctx}, candidates {args.types}: one variant at "
                                   "a time, former path, engine and a bare KLD process in turn", build, sys.argv)
            lines += table + ["", (f"bare KLD process: `{info['bare']}` (the lowest candidate's file, the same tokens); "
                              f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")]
            emit_table(lines, out)
            return
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
