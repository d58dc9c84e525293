#!/usr/bin/env python3
"""KL-divergence of the layer-placement study's ten weight recipes against the F16 base.

    python bench/kld_recipes.py [--chunks 20] [--ctx 512] [--threads N] [--backend cuda --ngl 99]

Quantizes (or reuses) each recipe from the exact F16 base of SmolLM2 (or --model),
runs `lacq kld` for each, and prints a table sorted by mean KLD with the PPL of
the same chunks beside it, plus Spearman's rank correlation between the KLD and
PPL rankings. Appends it, with the exact command, to bench/results/kld_recipes.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import RESULTS, parser

from lacq import paths  # noqa: E402
from lacq.llama.build import BuildSpec, require_build  # noqa: E402
from lacq.model.info import inspect_model  # noqa: E402
from lacq.quantize import convert_ftype, default_output, quantize_with_plan  # noqa: E402
from lacq.plan.kv.config import KvConfig  # noqa: E402
from lacq.measure.kld import (  # noqa: E402
    results_header, measure_kld, spearman,
)
from lacq.model.resolve import resolve_model  # noqa: E402
from lacq.plan.recipe import list_recipes, load_recipe, resolve_recipe  # noqa: E402
from lacq.measure.kld import emit_table, run_script  # noqa: E402
from lacq.results.store import open_store  # noqa: E402


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "kld_recipes.md")
    ap.add_argument("--recipes", default=None, help="comma-separated (default: every shipped recipe)")
    ap.add_argument("--from-dir", type=Path, default=None,
                    help="reuse <stem>.<recipe>.gguf and <stem>.f16.gguf files there (e.g. a `lacq demo` work dir)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    args = ap.parse_args()
    b = require_build(BuildSpec(backend=args.backend), args.source)
    store = open_store()
    src = resolve_model(args.model)
    if args.from_dir:
        base = args.from_dir / f"{src.stem}.f16.gguf"
    else:
        base = convert_ftype(b, store, src, paths.sub("models") / f"{src.stem}.f16.gguf", force=True)
    base_info = inspect_model(base)
    work = paths.sub("bench-kld")
    corpus = paths.default_corpus()
    study = f"bench-kld:{args.backend}:{b.key}:c{args.ctx}:n{args.chunks}"
    rows = []
    for name in (args.recipes.split(",") if args.recipes else list_recipes()):
        plan = resolve_recipe(load_recipe(name), base_info, {})
        if args.from_dir:
            qpath = args.from_dir / f"{src.stem}.{name}.gguf"
        else:
            qpath = quantize_with_plan(b, store, base, base_info, plan,
                                       output=default_output(work / base.name, name)).output
        info = inspect_model(qpath)
        out = measure_kld(b, store, qpath, info, base, base_info, KvConfig(), corpus, ctx=args.ctx,
                          chunks=args.chunks, threads=args.threads, ngl=args.ngl, label=name, study=study,
                          recipe=name, plan_hash=plan.plan_hash)
        r = out.result
        rows.append((name, qpath.stat().st_size / 1e6, r))
        print(f"{name}: KLD {r.kld_mean:.5f}, PPL {r.ppl_q:.4f} ({out.seconds:.0f} s)", file=sys.stderr, flush=True)
    rows.sort(key=lambda x: x[2].kld_mean)
    rho = spearman([r.kld_mean for _, _, r in rows], [r.ppl_q for _, _, r in rows])
    lines = results_header(f"KLD vs F16, {base.name}, {args.backend}, {args.chunks} chunks of {args.ctx}",
                           b, ["python", *sys.argv])
    lines += ["| recipe | size (MB) | mean KLD | ± | KLD 99% | KLD max | RMS Δp % | same top p % | PPL | PPL rank |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ppl_rank = {n: i + 1 for i, (n, _, _) in enumerate(sorted(rows, key=lambda x: x[2].ppl_q))}
    for name, mb, r in rows:
        lines.append(f"| {name} | {mb:.1f} | {r.kld_mean:.5f} | {r.kld_mean_error:.5f} | "
                     f"{r.kld_quantiles.get('p99', float('nan')):.4f} | {r.kld_quantiles.get('max', float('nan')):.3f} | "
                     f"{r.dp_rms_pct:.3f} | {r.same_top_p_pct:.2f} | {r.ppl_q:.4f} | {ppl_rank[name]} |")
    lines += ["", f"F16 base PPL on the same chunks: {rows[0][2].ppl_base:.4f}. "
              f"Spearman's rank correlation between the KLD and PPL rankings: {rho:+.3f}.", ""]
    emit_table(lines, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
