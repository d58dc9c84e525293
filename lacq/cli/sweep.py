"""`lacq sweep`: a declared grid of runs on a local process pool or a Ray cluster, resumable."""

from __future__ import annotations

import time
from pathlib import Path

import click

from lacq.cli import cli
from lacq.cli.common import (
    BuildChoice,
    build_options,
    console,
    err_console,
    handle_errors,
    open_results,
    progress_bar,
    stage_stepper,
)


@cli.command(name="sweep")
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option("--executor", "executor_name", default="local", show_default=True, metavar="local|ray",
              help="local: a process pool here (one run per GPU on a CUDA host); ray: one Ray task per run.")
@click.option("--address", default=None,
              help="Ray cluster to join (`auto`, `ray://HOST:10001`); default: start a local one.")
@click.option("--jobs", type=int, default=None,
              help="Runs at once (local: default 1, or one per visible GPU; ray: CPUs of the local cluster).")
@click.option("--no-engine", is_flag=True, help="Measure each KLD run with its own llama-perplexity process instead "
              "of in the evaluation engine each worker keeps per model; for comparison.")
@build_options
@click.pass_context
@handle_errors
def sweep_cmd(ctx, sweep_file, executor_name, address, jobs, no_engine, build: BuildChoice):
    """Run a sweep: models × weight recipes × KV configurations × contexts × measurements (ppl, kld,
    niah, bench) declared in SWEEP_FILE (TOML). Results are filed under the sweep's name (see
    `lacq report --study NAME`); runs already stored are skipped, so the same command resumes.
    --backend and --source, where given, override the file's `backend` and `source`."""
    from lacq import paths
    from lacq.llama.build import BuildSpec
    from lacq.llama.build import build as run_build
    from lacq.studies.engine import engine_available
    from lacq.studies.sweep import WorkerSetup, check_failures, load_sweep, plan_runs, run_sweep, stored_keys
    from lacq.studies.sweep_exec import make_executor
    given = ctx.get_parameter_source("backend") is not click.core.ParameterSource.DEFAULT
    sweep = load_sweep(sweep_file, backend=build.backend if given else None, source=build.source)
    executor = make_executor(executor_name, address=address, jobs=jobs, backend=sweep.backend)
    store = open_results(ctx)
    t0 = time.monotonic()
    with progress_bar() as progress:
        step = stage_stepper(progress)
        built = run_build(BuildSpec(backend=sweep.backend), sweep.source,
                          progress=lambda f, d: step(f"build {sweep.backend}", f, d))
        corpus = paths.default_corpus()
        runs = plan_runs(sweep, built, store, _model_preparer(built, store, step, sweep.imatrix),
                         _logits_preparer(built, store, corpus, sweep.threads, step))
        labels = {r.key: f"{r.label} {r.measurement}" for r in runs}
        total = progress.add_task(f"sweep {sweep.name}", total=len(runs), detail="")
        run_step = stage_stepper(progress)  # a bar per run, named by its label

        def on_run_done(run, error) -> None:
            run_step(labels[run.key], 1.0, "failed: " + error if error else "stored")
            progress.advance(total)

        progress.update(total, completed=len(set(stored_keys(store, sweep.name)) & set(labels)))
        setup = WorkerSetup(home=str(paths.home()), build=built, corpus=str(corpus), threads=sweep.threads,
                            ngl=99 if sweep.backend != "cpu" else None,
                            engine=not no_engine and "kld" in sweep.measurements and engine_available(built, _note))
        outcome = run_sweep(sweep, runs, setup, store, executor, on_run_done=on_run_done,
                            on_progress=lambda key, frac, detail: run_step(labels[key], frac, detail))
    console.print(f"sweep {sweep.name}: {len(outcome.ran)} run(s) done now, {outcome.skipped} already stored, "
                  f"{len(outcome.failed)} failed, of {outcome.total}; {time.monotonic() - t0:.0f} s "
                  f"({executor.name} executor). `lacq report --study {sweep.name}` shows the results.")
    check_failures(outcome, runs)


def _note(text: str) -> None:
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _model_preparer(build, store, step, imatrix: str | None = None):
    """Resolve a model spec; with a recipe, dequantize to F16 when needed and quantize (both cached; with the
    sweep's `imatrix` where it names one).
    Returns the model to measure and its unquantized parent (KLD's base)."""
    from lacq import paths
    from lacq.model.info import inspect_model
    from lacq.model.resolve import resolve_model
    from lacq.plan.recipe import load_recipe, resolve_recipe
    from lacq.quantize import convert_ftype, quantize_with_plan

    def prepare(spec: str, recipe: str | None) -> tuple[Path, Path]:
        model = resolve_model(spec)
        if recipe is None:
            return model, model
        info = inspect_model(model)
        work = paths.sub("work") / store.sha256(model)[:12]
        work.mkdir(parents=True, exist_ok=True)
        base = model
        if info.is_quantized:
            base = convert_ftype(build, store, model, work / f"{model.stem}.f16.gguf", "F16", force=True)
        base_info = inspect_model(base)
        plan = resolve_recipe(load_recipe(recipe), base_info, imatrix=imatrix is not None)
        tag = f".imatrix-{store.sha256(Path(imatrix))[:12]}" if imatrix else ""
        step("quantize", 0.0, recipe)
        out = quantize_with_plan(build, store, base, base_info, plan, output=work / f"{model.stem}.{recipe}{tag}.gguf",
                                 force=True, imatrix=Path(imatrix) if imatrix else None)
        step("quantize", 1.0, recipe)
        return out.output, base

    return prepare


def _logits_preparer(build, store, corpus, threads, step):
    """The base logits of a model (f16 cache) for a context and chunk count, made once (cached)."""
    from lacq.measure.kld import base_logits
    from lacq.model.info import inspect_model

    def prepare(model: Path, ctx: int, chunks: int) -> Path:
        logits, _ = base_logits(build, store, model, inspect_model(model), corpus, ctx=ctx, chunks=chunks,
                                threads=threads, progress=lambda f, d: step("base logits", f, f"{model.name} c{ctx}"))
        return logits

    return prepare
