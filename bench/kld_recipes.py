#!/usr/bin/env python3
"""KL-divergence of the layer-placement study's ten weight recipes (and llama.cpp's mixes) against the F16 base.

    python bench/kld_recipes.py [--chunks 20] [--ctx 512] [--threads N] [--backend cuda --ngl 99]
                                [--mixes Q4_K_M,Q5_K_M] [--imatrix FILE]

With --imatrix (`lacq imatrix BASE`), every recipe and mix is also quantized with that importance matrix and
measured beside the plain one (labelled NAME+imatrix); --recipes none measures the mixes alone.

Quantizes (or reuses) each recipe from the exact F16 base of SmolLM2 (or --model),
runs `lacq kld` for each, and prints a table sorted by mean KLD with the PPL of
the same chunks beside it, plus Spearman's rank correlation between the KLD and
PPL rankings. Appends it, with the exact command, to bench/results/kld_recipes.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import RESULTS, emit_table, parser, results_header, run_script

from lacq import paths
from lacq.llama.build import BuildSpec, require_build
from lacq.measure.kld import measure_kld
from lacq.model.info import inspect_model
from lacq.model.resolve import resolve_model
from lacq.plan.kv.config import KvConfig
from lacq.plan.recipe import Recipe, list_recipes, load_recipe, parse_recipe, resolve_recipe
from lacq.quantize import convert_ftype, default_output, quantize_with_plan
from lacq.results.render import markdown_lines
from lacq.results.store import open_store
from lacq.results.tables import KLD_COLUMNS, kld_frame, spearman


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "kld_recipes.md")
    ap.add_argument("--recipes", default=None, help="comma-separated (default: every shipped recipe)")
    ap.add_argument("--from-dir", type=Path, default=None,
                    help="reuse <stem>.<recipe>.gguf and <stem>.f16.gguf files there (e.g. a `lacq demo` work dir)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--mixes", default="", help="llama.cpp mixes (stock llama-quantize ftypes), comma-separated")
    ap.add_argument("--imatrix", type=Path, default=None,
                    help="also quantize every recipe and mix with this importance matrix, measured beside")
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
    recipes: list[tuple[str, Recipe]] = [
        (name, load_recipe(name)) for name in (args.recipes.split(",") if args.recipes else list_recipes())
        if name != "none"]
    recipes += [(mix, parse_recipe({"name": mix, "description": f"stock llama-quantize {mix}", "base": mix.lower()}))
                for mix in args.mixes.split(",") if mix]
    variants = [(name, recipe, None) for name, recipe in recipes]
    if args.imatrix:
        variants += [(f"{name}+imatrix", recipe, args.imatrix) for name, recipe in recipes]
    ids = []
    for name, recipe, imatrix in variants:
        plan = resolve_recipe(recipe, base_info, {}, imatrix=imatrix is not None)
        if args.from_dir:
            qpath = args.from_dir / f"{src.stem}.{name}.gguf"
        else:
            qpath = quantize_with_plan(b, store, base, base_info, plan, imatrix=imatrix,
                                       output=default_output(work / base.name, name)).output
        info = inspect_model(qpath)
        out = measure_kld(b, store, qpath, info, base, base_info, KvConfig(), corpus, ctx=args.ctx,
                          chunks=args.chunks, threads=args.threads, ngl=args.ngl, label=name, study=study,
                          recipe=recipe.name, plan_hash=plan.plan_hash)
        ids.append(out.result_id)
        r = out.result
        print(f"{name}: KLD {r.kld_mean:.5f}, PPL {r.ppl_q:.4f} ({out.seconds:.0f} s)", file=sys.stderr, flush=True)
    df = kld_frame([store.get(i) for i in ids])  # sorted by mean KLD
    df["ppl_rank"] = df.ppl_q.rank(method="min").astype(int)
    rho = spearman(list(df.kld_mean), list(df.ppl_q))
    lines = results_header(f"KLD vs F16, {base.name}, {args.backend}, {args.chunks} chunks of {args.ctx}",
                           b, ["python", *sys.argv])
    columns = {c: h for c, h in KLD_COLUMNS.items() if c != "ppl_ratio"} | {"ppl_rank": "PPL rank"}
    lines += markdown_lines(df.rename(columns={"ppl_q": "ppl"}), {("ppl" if c == "ppl_q" else c): h
                                                                  for c, h in columns.items()})
    lines += ["", f"F16 base PPL on the same chunks: {store.get(ids[0]).metrics['ppl_base']:.4f}. "
              f"Spearman's rank correlation between the KLD and PPL rankings: {rho:+.3f}.", ""]
    emit_table(lines, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
