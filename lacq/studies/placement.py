"""The layer-placement study (`lacq demo`): hand placements against llama.cpp's mixes and optimized recipes.

Build the CPU tools, get the model (dequantized to an F16 base where it is quantized), make its importance
matrix from the calibration part (cached; none where the caller turns it off), quantize the ten hand recipes
of the placement study (Q4_0 base, protected tensors Q8_0) and llama.cpp's own mixes (Q3_K_M, Q4_K_S, Q4_K_M,
Q5_K_M: stock llama-quantize ftypes, without and with the importance matrix), scan the model's blocks and
tensor groups (q4_k..q8_0 where every row splits into k-quant blocks, q4_0 vs q8_0 otherwise), let the
optimizer choose types at Q4_K_M's size and at first8_q8's size (where its search proposes more than one
choice, each is measured on the study's tokens and the best kept: studies/refine.pick_measured), and measure
every file by KL-divergence against the base on the same tokens (PPL beside). Everything is cached or
journaled: a rerun measures only what is missing, a row being reused only where everything that changes its
number is the same (`measured_rows`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from lacq import paths
from lacq.llama.build import Build
from lacq.measure.imatrix import DEFAULT_CHUNKS as IMATRIX_CHUNKS
from lacq.measure.imatrix import make_imatrix
from lacq.measure.kld import measure_kld
from lacq.model.info import ModelInfo, inspect_model
from lacq.plan.kv.config import KvConfig
from lacq.plan.llama_quant import allows_quantization
from lacq.plan.recipe import Plan, load_recipe, parse_recipe, resolve_recipe
from lacq.quantize import convert_ftype, quantize_with_plan
from lacq.results.store import Result, Store
from lacq.results.tables import placement_frame
from lacq.studies.artifact import Scan
from lacq.studies.optimize import optimize
from lacq.studies.optimize_out import ParetoPoint, plot_pareto, weights_recipe_toml
from lacq.studies.refine import pick_measured, weights_runner
from lacq.studies.scan import scan_weights
from lacq.studies.sensitivity import plot_scan

DEMO_RECIPES = ("uniform_q4_0", "first4_q8", "first8_q8", "last4_q8", "last8_q8", "middle8_q8",
                "first_last4_q8", "alternating_even_q8", "attention_q8", "ffn_q8")
LLAMA_MIXES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")
K_SCAN_TYPES = ("q4_k", "q5_k", "q6_k", "q8_0")  # llama.cpp's mixes' own family, beside q8_0
LEGACY_SCAN_TYPES = ("q4_0", "q8_0")  # the hand recipes' family: rows of any multiple of 32
SCAN_UNITS = ("block", "group")
SCAN_CHUNKS = 4

Step = Callable[[str, float, str], None]  # (stage, fraction, detail)
# (label, kind, plan, quantized file, origin): origin names what made the plan beyond the recipe (the scan's study
# for the optimized rows), None for the rest
Row = tuple[str, str, Plan, Path, str | None]


@dataclass(frozen=True)
class PlacementResult:
    study: str
    table: pd.DataFrame
    base: Path
    scan: Scan
    plots: tuple[Path, ...]
    imatrix: Path | None = None  # the importance matrix lacq's files and the +imatrix mixes were made with


def demo_scan_types(info: ModelInfo) -> tuple[str, ...]:
    """The scan's candidate types: the k-quants where every quantizable tensor's rows split into their 256-weight
    blocks (else llama.cpp writes q4_k as q5_0 and q6_k as q8_0, and the scan measures other types than it names,
    e.g. on SmolLM2's 576-wide rows); q4_0 and q8_0 otherwise."""
    rows = {t.shape[0] for t in info.tensors if allows_quantization(t)}
    return K_SCAN_TYPES if rows and all(n % 256 == 0 for n in rows) else LEGACY_SCAN_TYPES


def run_placement_study(build: Build, store: Store, model: Path, corpus: Path, *, ctx: int = 512, chunks: int = 20,
                        recipes: tuple[str, ...] = DEMO_RECIPES, mixes: tuple[str, ...] = LLAMA_MIXES,
                        scan_chunks: int = SCAN_CHUNKS, threads: int | None = None,
                        scan_corpus: Path | None = None, scan_types: tuple[str, ...] | None = None,
                        step: Step | None = None, imatrix: Path | None = None,
                        calibration: Path | None = None) -> PlacementResult:
    """`imatrix`: lacq's files (scan candidates, hand and optimized recipes) are quantized with it, and llama.cpp's
    mixes are made both without it and with it (labelled MIX+imatrix). `calibration` (where `imatrix` is None):
    the importance matrix is made from this text on the F16 base (`make_imatrix`, cached by base, text, chunks and
    build). Neither: no importance matrix, no +imatrix rows. `scan_types`: default `demo_scan_types` of the base."""
    sha = store.sha256(model)[:12]
    work = paths.sub("work") / sha
    work.mkdir(parents=True, exist_ok=True)
    info = inspect_model(model)
    if info.is_quantized:
        base = convert_ftype(build, store, model, work / f"{model.stem}.f16.gguf", "F16",
                             progress=lambda f, d: step and step("dequantize to F16", f, d), force=True)
        if step:
            step("dequantize to F16", 1.0, "done")
    else:
        base = model
    base_info = inspect_model(base)
    if imatrix is None and calibration is not None:
        # `lacq imatrix BASE`'s defaults (100 x 512 tokens), whatever the study's context: the same cached file
        imatrix = make_imatrix(build, store, base, calibration, chunks=IMATRIX_CHUNKS, ctx=512, threads=threads,
                               progress=(lambda f, d: step("imatrix", f, d)) if step else None).path
        if step:
            step("imatrix", 1.0, "done")
    tag = f".imatrix-{store.sha256(imatrix)[:12]}" if imatrix else ""
    study = f"demo2:{sha}:{build.key}:c{ctx}:n{chunks}" + tag.replace(".", ":")

    plans = [(name, "hand recipe", resolve_recipe(load_recipe(name), base_info, imatrix=imatrix is not None))
             for name in recipes]
    plans += [(mix, "llama.cpp mix", resolve_recipe(parse_recipe(
        {"name": mix, "description": f"stock llama-quantize {mix}", "base": mix.lower()}), base_info))
              for mix in mixes]
    if imatrix:  # the same mixes made with the same importance matrix, beside them
        plans += [(f"{mix}+imatrix", "llama.cpp mix + imatrix", resolve_recipe(parse_recipe(
            {"name": mix, "description": f"stock llama-quantize {mix}", "base": mix.lower()}), base_info, imatrix=True))
                  for mix in mixes]

    # the scan chooses on its own text (default: the judged one); `corpus` judges every file
    types = list(scan_types or demo_scan_types(base_info))
    scan = scan_weights(build, store, model, base, scan_corpus or corpus, types=types, units=SCAN_UNITS,
                        chunks=scan_chunks, ctx=ctx, threads=threads, step=step, imatrix=imatrix)
    sizes = {"Q4_K_M": None, "first8_q8": None}
    for i, (name, kind, plan) in enumerate(plans):
        if step:
            step("quantize", i / len(plans), name)
        # The work directory is lacq's own: a file made by another build is replaced.
        out = quantize_with_plan(build, store, base, base_info, plan, force=True,
                                 output=work / f"{model.stem}.{name}{tag if plan.imatrix else ''}.gguf",
                                 imatrix=imatrix if plan.imatrix else None)
        if name in sizes:
            sizes[name] = out.output.stat().st_size
        plans[i] = (name, kind, plan, out.output, None)
    measure = key = None
    for target, size in sizes.items():
        if size is None:
            continue
        solution = optimize(scan, size)
        if solution.alternatives:  # the search's proposals measured on the study's tokens, the best kept
            if measure is None:
                measure, key = weights_runner(build, store, scan, corpus, threads=threads, step=step, imatrix=imatrix)
            try:
                solution, _, _ = pick_measured(scan, solution, measure, key, chunks)
            finally:  # its engine stops: the next target's proposals are few, a restart costs one model load
                measure.close()
        name = f"optimized@{target}"
        toml = work / f"{name.replace('@', '_at_')}.toml"
        toml.write_text(weights_recipe_toml(solution, scan, name.replace("@", "_at_"), model=base_info))
        plan = resolve_recipe(load_recipe(toml), base_info, imatrix=imatrix is not None)
        out = quantize_with_plan(build, store, base, base_info, plan, force=True, imatrix=imatrix,
                                 output=work / f"{model.stem}.{toml.stem}{tag}.gguf")
        plans.append((name, "optimized", plan, out.output, scan.provenance.get("study")))
    if step:
        step("quantize", 1.0, "done")
    rows = measured_rows(build, store, plans, base, base_info, corpus, ctx=ctx, chunks=chunks, threads=threads,
                         study=study, step=step)
    table = placement_frame(rows, budget_label="first8_q8")
    plots = tuple(plot_scan(scan, work, "demo-scan"))
    points = [ParetoPoint(r.configuration, r.size_mb, r.kld_mean, r.kld_mean_error, r.kind) for r in table.itertuples()]
    plots += (plot_pareto(points, work / "demo-pareto.png",
                          title=f"{model.name}: size vs KLD, {chunks}×{ctx} tokens"),)
    return PlacementResult(study, table, base, scan, plots, imatrix)


def measured_rows(build: Build, store: Store, plans: list[Row], base: Path, base_info, corpus: Path, *, ctx: int,
                  chunks: int, threads: int | None, study: str, step: Step | None = None,
                  measure=measure_kld) -> list[Result]:
    """Each row's KLD result. One filed in `study` under the row's label is reused only where the plan, the file
    measured, its origin, the base, the corpus, the context, the chunks and the build are the same; anything
    else is measured (`measure`: measure_kld's signature)."""
    want = {"base": store.sha256(base), "corpus": store.sha256(corpus), "ctx": ctx, "chunks": chunks,
            "build": build.key}
    stored = store.results(kind="kld", study=study)
    out = []
    by_file: dict[str, Result] = {}  # this call's rows by the sha256 of the file measured
    for i, (label, kind, plan, path, origin) in enumerate(plans):
        key = {**want, "label": label, "plan": plan.plan_hash, "file": store.sha256(path), "origin": origin}
        hit = next((r for r in reversed(stored) if _row_key(r) == key), None)
        if hit is None and key["file"] in by_file:
            # The same bytes as a row already measured here (on the clean base's 8 blocks first8_q8, last8_q8,
            # middle8_q8 and first_last4_q8 are one file): its numbers, under this row's label, not filed again.
            same = by_file[key["file"]]
            hit = replace(same, label=label, recipe=plan.recipe, plan_hash=plan.plan_hash,
                          metrics={**same.metrics, "kind": kind, "origin": origin, "same_file_as": same.label})
        if hit is None:
            if step:
                step("KL-divergence", i / len(plans), label)
            rid = measure(build, store, path, inspect_model(path), base, base_info, KvConfig(), corpus, ctx=ctx,
                          chunks=chunks, threads=threads, label=label, study=study, recipe=plan.recipe,
                          plan_hash=plan.plan_hash, annotations={"kind": kind, "origin": origin}).result_id
            hit = store.get(rid)
        by_file.setdefault(key["file"], hit)
        out.append(hit)
    if step:
        step("KL-divergence", 1.0, "done")
    return out


def _row_key(r: Result) -> dict:
    return {"base": r.metrics.get("base_model_sha256"), "corpus": r.corpus_sha256, "ctx": r.ctx, "chunks": r.chunks,
            "build": (r.build or {}).get("build_key"), "label": r.label, "plan": r.plan_hash, "file": r.model_sha256,
            "origin": r.metrics.get("origin")}
