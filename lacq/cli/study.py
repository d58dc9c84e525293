"""Studies built from measurements: `lacq demo` (the layer-placement study)."""

from __future__ import annotations

import time

import click

from lacq import paths
from lacq.cli import cli
from lacq.cli.common import (
    BuildChoice,
    build_options,
    console,
    format_option,
    handle_errors,
    open_results,
    progress_bar,
)
from lacq.llama.build import BuildSpec
from lacq.llama.build import build as run_build


@cli.command(name="demo")
@click.option("--model", "model_spec", default=None, help="GGUF path or hf://OWNER/REPO/FILE (default: SmolLM2-135M).")
@click.option("--chunks", type=int, default=20, show_default=True)
@click.option("-c", "--ctx", "ctx_len", type=int, default=512, show_default=True)
@format_option()
@build_options
@click.pass_context
@handle_errors
def demo_cmd(ctx, model_spec, chunks, ctx_len, fmt, build: BuildChoice):
    """The layer-placement study end to end: build, quantize ten recipes, measure, compare."""
    from lacq.model.resolve import resolve_model
    from lacq.results.render import render
    from lacq.studies.placement import run_placement_study
    t0 = time.monotonic()
    store = open_results(ctx)
    with progress_bar() as progress:
        btask = progress.add_task(f"build {build.backend}", total=1.0, detail="")
        tools = run_build(BuildSpec(backend=build.backend), build.source,
                          progress=lambda f, d: progress.update(btask, completed=f, detail=d))
        progress.update(btask, completed=1.0, detail=tools.key)
        mtask = progress.add_task("model", total=1.0, detail=model_spec or "SmolLM2-135M-Instruct Q4_1")
        model = resolve_model(model_spec)
        progress.update(mtask, completed=1.0)
        tasks: dict[str, int] = {}

        def step(stage: str, frac: float, detail: str) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=1.0, detail="")
            progress.update(tasks[stage], completed=frac, detail=detail)

        result = run_placement_study(tools, store, model, paths.default_corpus(), ctx=ctx_len, chunks=chunks,
                                     step=step)
    render(result.table, fmt, console,
           title=f"{model.name}: Q4_0 base, protected layers Q8_0 — WikiText-2, {chunks}×{ctx_len} tokens")
    console.print(f"study {result.study}; {time.monotonic() - t0:.0f} s. "
                  f"★ = most perplexity gained per extra MB over the smallest configuration, on the Pareto front.")
