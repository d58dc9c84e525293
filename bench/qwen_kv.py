#!/usr/bin/env python3
"""KV-cache evidence on Qwen2.5-Coder-1.5B-Instruct Q4_K_M: KLD against the model's own f16-cache run.

    python bench/qwen_kv.py [--configs k8,k4,k4+l0,k8-l0,k4+l01,k4+l27,v4,turbo3,tql3,turbo2,turbo2+b2]
                            [--chunks 4] [--ctx 512] [--threads 2] [--model qwen2.5-coder-1.5b]

Each configuration runs `lacq kld MODEL --base MODEL` with its cache types (the K rows with V f16, the
V rows with K q8_0 and flash attention on), one at a time, and appends a markdown table to --out.
Per-layer K types (`l0`: KV layer 0, `l01`: layers 0 and 1, `l27`: the last) go through the per-layer patch
by KV-layer ordinal, as `lacq scan kv --cache k` sets them.
"""

from __future__ import annotations

import sys

from common import RESULTS, emit_table, kv_from_label, parser, results_header, run_script

from lacq import paths
from lacq.llama.build import BuildSpec, require_build
from lacq.measure.kld import measure_kld
from lacq.model.info import inspect_model
from lacq.model.resolve import resolve_model
from lacq.results.store import open_store
from lacq.studies.scan import kv_variant_config


def k_only(default: str, layers: dict[int, str]):
    return lambda: kv_variant_config("k", "f16", default, layers)


CONFIGS = {  # name -> (what it is, its KvConfig)
    "k8": ("K q8_0, V f16", k_only("q8_0", {})),
    "k4": ("K q4_0, V f16", k_only("q4_0", {})),
    "k4+l0": ("K q4_0 with layer 0's K at q8_0, V f16", k_only("q4_0", {0: "q8_0"})),
    "k8-l0": ("K q8_0 with layer 0's K at q4_0, V f16", k_only("q8_0", {0: "q4_0"})),
    "k4+l01": ("K q4_0 with layers 0-1 at q8_0, V f16", k_only("q4_0", {0: "q8_0", 1: "q8_0"})),
    "k4+l27": ("K q4_0 with the last layer (27) at q8_0, V f16", k_only("q4_0", {27: "q8_0"})),
    "v4": ("K q8_0, V q4_0", lambda: kv_from_label("q8_0/q4_0", fa="on")[1]),
    "turbo3": ("K q8_0, V turbo3", lambda: kv_from_label("q8_0/turbo3", fa="on")[1]),
    "tql3": ("K q8_0, V tql3", lambda: kv_from_label("q8_0/tql3", fa="on")[1]),
    "turbo2": ("K q8_0, V turbo2", lambda: kv_from_label("q8_0/turbo2", fa="on")[1]),
    "turbo2+b2": ("K q8_0, V turbo2, boundary 2 at q8_0", lambda: kv_from_label("q8_0/turbo2+b2", fa="on")[1]),
}


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "qwen_kv_cpu.md")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from: " + ", ".join(CONFIGS))
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    b = require_build(BuildSpec(backend=args.backend), args.source)
    store = open_store()
    model = resolve_model(args.model or "qwen2.5-coder-1.5b")
    info = inspect_model(model)
    lines = results_header(f"{model.name}: KV cache types by KLD against the f16-cache run, {args.backend}, "
                           f"{args.chunks} chunks of {args.ctx}", b, ["python", *sys.argv])
    lines += ["| config | what | mean KLD | ± | KLD p99 | same top % | PPL | ± | PPL f16 base | run s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        what, config = CONFIGS[name]
        out = measure_kld(b, store, model, info, model, info, config(), paths.default_corpus(), ctx=args.ctx,
                          chunks=args.chunks, threads=args.threads, label=f"{model.name} {name}",
                          study=f"bench-qwen-kv:{b.key}:{model.name}:c{args.ctx}:n{args.chunks}")
        r = out.result
        lines.append(f"| {name} | {what} | {r.kld_mean:.4f} | {r.kld_mean_error:.4f} | {r.kld_quantiles.get('p99'):.4f} "
                     f"| {r.same_top_p_pct:.2f} | {r.ppl_q:.4f} | {r.ppl_q_error:.4f} | {r.ppl_base:.4f} "
                     f"| {store.get(out.result_id).wall_seconds:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    emit_table(lines + [""], args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
