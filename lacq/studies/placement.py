"""The layer-placement study (`lacq demo`): one model, end to end.

Build the CPU tools, get the model, dequantize it to an F16 base, quantize the
ten weight recipes, measure perplexity of each and of the base, and return the
comparison table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from lacq import paths
from lacq.llama.build import Build
from lacq.measure.ppl import measure_ppl
from lacq.model.info import inspect_model
from lacq.plan.kv.config import KvConfig
from lacq.plan.recipe import load_recipe, resolve_recipe
from lacq.quantize import convert_ftype, quantize_with_plan
from lacq.results.store import Store
from lacq.results.tables import ppl_frame

DEMO_RECIPES = ("uniform_q4_0", "first4_q8", "first8_q8", "last4_q8", "last8_q8", "middle8_q8",
                "first_last4_q8", "alternating_even_q8", "attention_q8", "ffn_q8")

Step = Callable[[str, float, str], None]  # (stage, fraction, detail)


@dataclass(frozen=True)
class PlacementResult:
    study: str
    table: pd.DataFrame
    base: Path


def run_placement_study(build: Build, store: Store, model: Path, corpus: Path, *, ctx: int = 512, chunks: int = 20,
             recipes: tuple[str, ...] = DEMO_RECIPES, threads: int | None = None,
             step: Step | None = None) -> PlacementResult:
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
    study = f"demo:{sha}:{build.key}:c{ctx}:n{chunks}"
    models = [("F16 base", base, None, None)]
    for i, name in enumerate(recipes):
        plan = resolve_recipe(load_recipe(name), base_info)
        if step:
            step("quantize", i / len(recipes), name)
        # The work directory is lacq's own: a file made by another build is replaced.
        out = quantize_with_plan(build, store, base, base_info, plan, output=work / f"{model.stem}.{name}.gguf",
                                 force=True)
        models.append((name, out.output, name, plan.plan_hash))
    if step:
        step("quantize", 1.0, "done")
    done = {r.label for r in store.results(kind="ppl", study=study)}
    for i, (label, path, recipe, plan_hash) in enumerate(models):
        if label in done:
            continue

        def on_chunk(frac: float, detail: str, i=i, label=label) -> None:
            if step:
                step("perplexity", (i + frac) / len(models), f"{label}: {detail}")

        measure_ppl(build, store, path, inspect_model(path), KvConfig(), corpus, ctx=ctx, chunks=chunks,
                    threads=threads, label=label, study=study, recipe=recipe, plan_hash=plan_hash,
                    progress=on_chunk)
    if step:
        step("perplexity", 1.0, "done")
    return PlacementResult(study, ppl_frame(store.results(kind="ppl", study=study), base_label="F16 base"), base)
