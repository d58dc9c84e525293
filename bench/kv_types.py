#!/usr/bin/env python3
"""KV-cache V types by KLD against the same model's f16-cache run, with PPL and CPU time.

    python bench/kv_types.py [--models smollm2:8,gemma3-270m:4] [--k q8_0]
                             [--vtypes f16,q8_0,q5_0,q4_0,turbo4,tqs4,turbo3,tqs3,tql3,turbo2,tqs2,tql2]
                             [--time-vtypes f16,q4_0,turbo3,tqs4,tqs3,tqs2,tql3,tql2] [--time-reps 3]

For each model (NAME:CHUNKS, a named model or a path) every V type runs `lacq kld MODEL --base
MODEL --ctk K --ctv V --fa on`: the base logits come from llama-perplexity with its default f16
K/V cache, so the KLD is the damage the cache types alone do. Then plain llama-perplexity runs
(same chunks, -fa on) of --time-vtypes, interleaved --time-reps times, give the wall time of each
V type against q4_0's (best of the repetitions: the machine may be shared). Prints markdown
tables and appends them, with the exact commands, to --out.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time

from common import RESULTS, emit_table, kv_from_label, parser, results_header, run_script

from lacq import paths
from lacq.llama.build import BuildSpec, require_build
from lacq.llama.tools import perplexity
from lacq.measure.common import prepare_kv
from lacq.measure.kld import measure_kld
from lacq.model.info import inspect_model
from lacq.model.resolve import resolve_model
from lacq.plan.kv.types import kv_type
from lacq.results.store import open_store
from lacq.studies.scan import stored_kld
from lacq.studies.sensitivity import diff_error

VTYPES = "f16,q8_0,q5_0,q4_0,turbo4,tqs4,turbo3,tqs3,tql3,turbo2,tqs2,tql2"
TIME_VTYPES = "f16,q4_0,turbo3,tqs4,tqs3,tqs2,tql3,tql2"


def kld_rows(b, store, name: str, chunks: int, k: str, vtypes: list[str], ctx: int, threads) -> list[dict]:
    model = resolve_model(name)
    info = inspect_model(model)
    corpus = paths.default_corpus()
    rows = []
    for v in vtypes:
        label, kv = kv_from_label(f"{k}/{v}", fa="on")
        out = measure_kld(b, store, model, info, model, info, kv, corpus, ctx=ctx, chunks=chunks,
                          threads=threads, label=f"{model.name} {label}",
                          study=f"bench-kv-types:{b.key}:{model.name}:c{ctx}:n{chunks}")
        r = out.result
        rows.append({"model": model.name, "v": v, "bpv": kv_type(v).bits_per_value, "kld": r.kld_mean,
                     "kld_err": r.kld_mean_error, "p99": r.kld_quantiles.get("p99"), "top": r.same_top_p_pct,
                     "ppl": r.ppl_q, "ppl_err": r.ppl_q_error, "ppl_base": r.ppl_base,
                     "seconds": store.get(out.result_id).wall_seconds, "per": stored_kld(store, out.result_id)})
        print(f"{model.name} {label}: KLD {r.kld_mean:.5f} PPL {r.ppl_q:.4f}", file=sys.stderr, flush=True)
    return rows


def paired(r: dict, rows: list[dict]) -> str:
    """A tql row's KLD less the tqs row of the same bits on the same tokens, with the paired ± over chunks."""
    if not r["v"].startswith("tql"):
        return ""
    other = next((o for o in rows if o["model"] == r["model"] and o["v"] == "tqs" + r["v"][3:]), None)
    if other is None:
        return ""
    return f"{r['kld'] - other['kld']:+.5f} ± {diff_error(r['per'], other['per']):.5f}"


def kld_table(rows: list[dict]) -> list[str]:
    q4 = {r["model"]: r["kld"] for r in rows if r["v"] == "q4_0"}
    t2 = {r["model"]: r["kld"] for r in rows if r["v"] == "turbo2"}
    lines = ["| model | V type | V bits/value | mean KLD | ± | KLD p99 | same top % | × q4_0 KLD | × turbo2 KLD "
             "| tql − tqs, paired | PPL | ± | PPL f16 base | run s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['kld'] / q4[r['model']]:.2f}" if r["model"] in q4 else ""
        ratio2 = f"{r['kld'] / t2[r['model']]:.2f}" if r["model"] in t2 and r["bpv"] <= 2.5 else ""
        lines.append(f"| {r['model']} | {r['v']} | {r['bpv']:g} | {r['kld']:.5f} | {r['kld_err']:.5f} "
                     f"| {r['p99']:.4f} | {r['top']:.2f} | {ratio} | {ratio2} | {paired(r, rows)} | {r['ppl']:.4f} "
                     f"| {r['ppl_err']:.4f} | {r['ppl_base']:.4f} | {r['seconds']:.1f} |")
    return lines


PROMPT_EVAL = re.compile(r"prompt eval time =\s+([\d.]+) ms")


def time_rows(b, name: str, chunks: int, k: str, vtypes: list[str], ctx: int, threads, reps: int):
    """Wall time of plain llama-perplexity runs on the first 200 kB of the corpus (the whole file
    takes longer to tokenize than 8 chunks take to evaluate here), and llama.cpp's own prompt-eval
    time (the forward passes alone)."""
    model = resolve_model(name)
    info = inspect_model(model)
    corpus = paths.sub("bench-kv-types") / "wiki.test.head200k.raw"
    corpus.write_bytes(paths.default_corpus().read_bytes()[:200_000])
    times: dict[str, list[float]] = {v: [] for v in vtypes}
    evals: dict[str, list[float]] = {v: [] for v in vtypes}
    commands = {}
    for rep in range(reps):
        order = vtypes if rep % 2 == 0 else vtypes[::-1]
        for v in order:
            _, kv = kv_from_label(f"{k}/{v}", fa="on")
            kv = prepare_kv(b, kv, info)
            args = perplexity.argv(b.tool("llama-perplexity"), model, corpus, ctx=ctx,
                                   chunks=chunks, threads=threads, kv_args=kv.argv())
            commands[v] = " ".join(shlex.quote(a) for a in args)
            t0 = time.monotonic()
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{commands[v]} failed:\n{proc.stderr[-2000:]}")
            times[v].append(time.monotonic() - t0)
            # gemma3 (iSWA) leaves llama_perf's prompt-eval counter near 0: no figure then
            ev = float(PROMPT_EVAL.search(proc.stdout + proc.stderr).group(1)) / 1000
            evals[v].append(ev if ev > 0.1 else float("nan"))
            print(f"{model.name} {k}/{v} rep {rep}: {times[v][-1]:.1f} s, prompt eval {evals[v][-1]:.1f} s",
                  file=sys.stderr, flush=True)
    return model.name, times, evals, commands


def time_table(model: str, times: dict[str, list[float]], evals: dict[str, list[float]]) -> list[str]:
    best = {v: min(t) for v, t in times.items()}
    ebest = {v: min(t) for v, t in evals.items()}
    n = len(next(iter(times.values())))
    lines = [f"| model | V type | wall s, best of {n} | all runs | × q4_0 | prompt eval s, best of {n} | all runs "
             "| × q4_0 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, t in times.items():
        ratio = f"{best[v] / best['q4_0']:.3f}" if "q4_0" in best else ""
        eratio = f"{ebest[v] / ebest['q4_0']:.3f}" if "q4_0" in ebest else ""
        lines.append(f"| {model} | {v} | {best[v]:.1f} | {', '.join(f'{x:.1f}' for x in t)} | {ratio} "
                     f"| {ebest[v]:.1f} | {', '.join(f'{x:.1f}' for x in evals[v])} | {eratio} |")
    return lines


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "kv_types_cpu.md")
    ap.add_argument("--models", default="smollm2:8,gemma3-270m:4", help="NAME:CHUNKS,...")
    ap.add_argument("--k", default="q8_0")
    ap.add_argument("--vtypes", default=VTYPES, help="empty: no KLD runs")
    ap.add_argument("--time-vtypes", default=TIME_VTYPES, help="empty: no timing runs")
    ap.add_argument("--time-reps", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    b = require_build(BuildSpec(backend=args.backend), args.source)
    store = open_store()
    models = [(m.rpartition(":")[0], int(m.rpartition(":")[2])) for m in args.models.split(",")]
    rows = []
    for name, chunks in models if args.vtypes else ():
        rows += kld_rows(b, store, name, chunks, args.k, args.vtypes.split(","), args.ctx, args.threads)
    lines = results_header(f"V cache types by KLD against the f16-cache run, K {args.k}, {args.backend}, "
                           f"{args.models} chunks of {args.ctx}", b, ["python", *sys.argv])
    emit_table(lines + (kld_table(rows) if rows else []) + [""], args.out)
    if not args.time_vtypes:
        return
    for name, chunks in models:
        model, times, evals, commands = time_rows(b, name, chunks, args.k, args.time_vtypes.split(","),
                                                  args.ctx, args.threads, args.time_reps)
        lines = [f"#### llama-perplexity wall time, {model}, {chunks} chunks of {args.ctx}, K {args.k}", ""]
        lines += time_table(model, times, evals) + ["", "Commands (one per V type):", ""]
        lines += [f"- `{c}`" for c in commands.values()] + [""]
        emit_table(lines, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
