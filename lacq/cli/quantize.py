"""`lacq quantize`: a model quantized with a recipe's per-tensor plan; `lacq imatrix`: the importance matrix
it may be quantized with."""

from __future__ import annotations

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
    parse_sets,
    progress_bar,
)


@cli.command(name="quantize")
@click.argument("model_spec", metavar="MODEL")
@click.option("--recipe", "recipe_name", required=True, help="Recipe name (lacq recipes list) or a .toml path.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output GGUF (default: <stem>.<recipe>.gguf beside the input).")
@click.option("--set", "sets", multiple=True, metavar="PARAM=VALUE", help="Override a recipe parameter.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Importance matrix (lacq imatrix MODEL) passed to llama-quantize.")
@click.option("--dry-run", is_flag=True, help="Resolve and verify the plan with llama-quantize --dry-run only.")
@click.option("--strict", is_flag=True, help="Fail if llama-quantize would not give a tensor its planned type.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@build_options
@click.pass_context
@handle_errors
def quantize_cmd(ctx, model_spec, recipe_name, output, sets, imatrix, dry_run, strict, force, build: BuildChoice):
    """Quantize MODEL with a recipe's per-tensor plan."""
    from lacq.model.info import inspect_model
    from lacq.model.resolve import resolve_model
    from lacq.plan.recipe import load_recipe, resolve_recipe
    from lacq.quantize import check_plan_imatrix, quantize_with_plan
    model = resolve_model(model_spec)
    info = inspect_model(model)
    plan = resolve_recipe(load_recipe(recipe_name), info, parse_sets(sets), imatrix=imatrix is not None)
    check_plan_imatrix(plan, info, imatrix, model.name)  # before anything runs (quantize_with_plan checks again)
    tools = build.require()
    store = open_results(ctx)
    with progress_bar() as progress:
        task = progress.add_task(f"quantize {plan.recipe}", total=1.0, detail="")
        out = quantize_with_plan(tools, store, model, info, plan, output=output, force=force, imatrix=imatrix,
                                 strict=strict, dry_run=dry_run,
                                 progress=lambda f, d: progress.update(task, completed=f, detail=d))
        progress.update(task, completed=1.0, detail="")
    for m in out.mismatches:
        err_console.print(f"[yellow]note[/yellow]: {m.name}: planned {m.predicted}, llama-quantize chose {m.actual}")
    verb = "would write" if dry_run else ("up to date" if out.skipped else "wrote")
    # the plan predicts tensor bytes; the file adds the input's header, metadata (the tokenizer) and padding
    overhead = max(0, model.stat().st_size - info.total_bytes)
    actual = (f"dry-run {out.actual_bytes / 1e6:.2f} MB of tensors" if dry_run
              else f"actual {out.actual_bytes / 1e6:.2f} MB")
    console.print(f"{verb} {out.output}: predicted {(out.predicted_bytes + overhead) / 1e6:.2f} MB "
                  f"({out.predicted_bytes / 1e6:.2f} MB of tensors), {actual} "
                  f"({len(plan.rules)} rules, {out.seconds:.1f} s)")


@cli.command(name="imatrix")
@click.argument("model_spec", metavar="MODEL")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration text (default: the calibration part of the default corpus, never judged on).")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Chunks of --ctx tokens to collect over [default: 100].")
@click.option("-c", "--ctx", "ctx_len", type=click.IntRange(min=16), default=512, show_default=True,
              help="Tokens per chunk.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output GGUF (default: under lacq's home, named by model and cache key).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--strict", is_flag=True, help="Refuse a --text that shares lines with the judge or scan part of "
              "the corpus, instead of warning.")
@click.option("-t", "--threads", type=int, default=None)
@build_options
@click.pass_context
@handle_errors
def imatrix_cmd(ctx, model_spec, text, chunks, ctx_len, output, force, strict, threads, build: BuildChoice):
    """Make MODEL's importance matrix with llama-imatrix (cached by model, text, chunks and build)."""
    from lacq.corpus import calibration_overlap, calibration_text, check_length
    from lacq.errors import LacqError
    from lacq.measure.imatrix import DEFAULT_CHUNKS, make_imatrix
    from lacq.model.resolve import resolve_model
    model = resolve_model(model_spec)
    text = text or calibration_text()
    check_length(text, chunks or DEFAULT_CHUNKS, ctx_len)  # before the build: llama-imatrix starts slowly
    problem = calibration_overlap(text)
    if problem and strict:
        raise LacqError(f"{problem}; --strict refuses to calibrate on it")
    if problem:
        err_console.print(f"[yellow]warning[/yellow]: {problem}", highlight=False)
    tools = build.require()
    store = open_results(ctx)
    with progress_bar() as progress:
        task = progress.add_task("imatrix", total=1.0, detail="")
        out = make_imatrix(tools, store, model, text, chunks=chunks or DEFAULT_CHUNKS, ctx=ctx_len,
                           output=output, force=force, threads=threads,
                           progress=lambda f, d: progress.update(task, completed=f, detail=d))
        progress.update(task, completed=1.0, detail="")
    ppl = f", PPL estimate {out.ppl:.4f}" if out.ppl is not None else ""
    console.print(f"{'up to date' if out.skipped else 'wrote'} {out.path}: {out.chunks} chunks of {text.name}"
                  f"{ppl}, sha256 {out.sha256[:16]} ({out.seconds:.1f} s)")
