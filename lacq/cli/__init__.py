"""lacq's command line. Wiring and formatting only; the work lives in the modules."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lacq import __version__
from lacq import paths
from lacq.llama.build import BACKENDS, BuildSpec, build as run_build, find_build, prepared_source, require_build
from lacq.errors import LacqError
from lacq.plan.kv.config import KvConfig, boundary, check_type

# Tables are wide: when output is not a terminal (a pipe, a log file, CI), do not
# squeeze them into rich's default 80 columns.
console = Console() if Console().is_terminal else Console(width=160)
err_console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=err_console, transient=False)


def handle_errors(fn):
    """Turn lacq's errors and Ctrl-C into a short message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LacqError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]: stopped; no partial output was kept")
            sys.exit(130)

    return wrapper


def source_options(fn):
    fn = click.option("--source", default=None, metavar="PATH|git+URL@REF",
                      help="llama.cpp source (default: the pinned llama-cpp-python 0.3.36 tree).")(fn)
    fn = click.option("--backend", type=click.Choice(BACKENDS), default="cpu", show_default=True,
                      help="Which build of llama.cpp to use.")(fn)
    return fn


def run_options(fn):
    """Threads, GPU layers and where the result is filed: shared by every measurement command."""
    fn = click.option("--study", default=None, help="Group results for `lacq report --study`.")(fn)
    fn = click.option("--label", default=None, help="Row name in reports.")(fn)
    fn = click.option("-ngl", "--n-gpu-layers", "ngl", type=int, default=None)(fn)
    fn = click.option("-t", "--threads", type=int, default=None)(fn)
    return fn


def output_format(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON.")(fn)
    return fn


@click.group()
@click.version_option(__version__)
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="LACQ_DB",
              help="Results database (default: under lacq's home).")
@click.option("-v", "--verbose", is_flag=True, help="Log what lacq does.")
@click.pass_context
def cli(ctx, db, verbose):
    """Layer-adaptive quantization studies for llama.cpp and GGUF."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    ctx.obj = {"db": db}


def _store(ctx):
    from lacq.results.store import open_store
    return open_store(ctx.obj["db"])


# ---------------------------------------------------------------- build
@cli.command(name="build")
@source_options
@click.option("--cuda-arch", default=None, help="CMAKE_CUDA_ARCHITECTURES for --backend cuda (default native).")
@click.option("--target", "targets", multiple=True, help="Extra cmake target to build (e.g. test-backend-ops).")
@click.option("--no-patches", is_flag=True, help="Build the stock tree, without patches/series.")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel build jobs (default: all cores).")
@click.option("--print-path", is_flag=True, help="Print only the bin/ directory of the build (builds if needed).")
@click.option("--print-source", is_flag=True,
              help="Prepare the patched source tree and print its path (for the top-level CMakeLists.txt).")
@handle_errors
def build_cmd(source, backend, cuda_arch, targets, no_patches, jobs, print_path, print_source):
    """Build the patched llama.cpp tools (cached by source, patches, backend and flags)."""
    spec = BuildSpec(backend=backend, cuda_arch=cuda_arch, extra_targets=tuple(targets), patches=not no_patches)
    if print_source:
        click.echo(str(prepared_source(spec, source)))
        return
    t0 = time.monotonic()
    existing = find_build(spec, source)
    if existing is not None:
        result = existing
    elif print_path:
        result = run_build(spec, source, jobs=jobs)
    else:
        with _progress() as progress:
            task = progress.add_task(f"build {backend}", total=1.0, detail="")
            result = run_build(spec, source, jobs=jobs,
                               progress=lambda f, d: progress.update(task, completed=f, detail=d))
    if print_path:
        click.echo(str(result.bin_dir))
        return
    state = "up to date" if existing is not None else "built"
    console.print(f"[green]{state}[/green] {backend} build {result.key} in {time.monotonic() - t0:.2f} s")
    console.print(f"  bin: {result.bin_dir}", soft_wrap=True)
    console.print(f"  patches: {', '.join(result.patches) or 'none'}")


# ---------------------------------------------------------------- inspect
@cli.command(name="inspect")
@click.argument("model", type=click.Path(path_type=Path))
@output_format
@click.option("--tensors/--no-tensors", default=True, help="List every tensor grouped by block.")
@handle_errors
def inspect_cmd(model, as_json, tensors):
    """Architecture, blocks, KV-layer ordinals and tensors of a GGUF model."""
    from lacq.model.info import inspect_model
    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=1))
        return
    console.print(f"[bold]{model}[/bold]  {info.architecture}  {info.file_type or ''}")
    console.print(f"blocks {info.n_blocks}, heads {info.n_head}, KV heads {info.n_head_kv}, head size {info.head_dim}, "
                  f"context {info.n_ctx_train}, {info.total_bytes / 1e6:.1f} MB, {info.bpw:.2f} bits/weight")
    ordinals = info.kv_ordinal_map()
    console.print(f"KV layers: {len(ordinals)} of {info.n_blocks} blocks")
    kv_table = Table("KV ordinal", "block", title="KV-layer ordinal map")
    for block, ordinal in ordinals.items():
        kv_table.add_row(str(ordinal), str(block))
    if len(ordinals) != info.n_blocks:
        console.print(kv_table)
    else:
        console.print("  (pure attention: ordinal = block index)")
    if not tensors:
        return
    table = Table("block", "tensor", "type", "shape", "elements", "bytes")
    for block, items in info.tensors_by_block().items():
        for t in items:
            table.add_row("-" if block is None else str(block), t.name, t.type, "x".join(map(str, t.shape)),
                          f"{t.n_elements:,}", f"{t.n_bytes:,}")
    console.print(table)


# ---------------------------------------------------------------- recipes
@cli.group(name="recipes")
def recipes_group():
    """Weight recipes (recipes/*.toml)."""


@recipes_group.command(name="list")
@output_format
@handle_errors
def recipes_list(as_json):
    """List the shipped weight recipes."""
    from lacq.plan.recipe import list_recipes, load_recipe
    rows = [load_recipe(n) for n in list_recipes()]
    if as_json:
        click.echo(json.dumps([{"name": r.name, "description": r.description} for r in rows], indent=1))
        return
    table = Table("recipe", "description")
    for r in rows:
        table.add_row(r.name, r.description)
    console.print(table)


@recipes_group.command(name="show")
@click.argument("name")
@click.option("--model", "model_spec", default=None, help="Resolve against this model and show the plan.")
@click.option("--set", "sets", multiple=True, metavar="PARAM=VALUE", help="Override a recipe parameter.")
@handle_errors
def recipes_show(name, model_spec, sets):
    """Show a recipe, and with --model its resolved plan."""
    from lacq.model.info import inspect_model
    from lacq.plan.recipe import load_recipe, resolve_recipe
    recipe = load_recipe(name)
    console.print(recipe.path.read_text() if getattr(recipe, "path", None) else recipe)
    if model_spec:
        plan = resolve_recipe(recipe, inspect_model(Path(model_spec)), _parse_sets(sets))
        console.print(f"base ftype {plan.base_ftype}; {len(plan.rules)} rules; predicted "
                      f"{plan.predicted_bytes / 1e6:.1f} MB, {plan.predicted_bpw:.2f} bits/weight")
        click.echo(plan.tensor_type_file_text())


def _parse_sets(sets) -> dict[str, str]:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected PARAM=VALUE, got {item!r}", param_hint="--set")
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------- quantize
@cli.command(name="quantize")
@click.argument("model_spec", metavar="MODEL")
@click.option("--recipe", "recipe_name", required=True, help="Recipe name (lacq recipes list) or a .toml path.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output GGUF (default: <stem>.<recipe>.gguf beside the input).")
@click.option("--set", "sets", multiple=True, metavar="PARAM=VALUE", help="Override a recipe parameter.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--dry-run", is_flag=True, help="Resolve and verify the plan with llama-quantize --dry-run only.")
@click.option("--strict", is_flag=True, help="Fail if llama-quantize would not give a tensor its planned type.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@source_options
@click.pass_context
@handle_errors
def quantize_cmd(ctx, model_spec, recipe_name, output, sets, imatrix, dry_run, strict, force, source, backend):
    """Quantize MODEL with a recipe's per-tensor plan."""
    from lacq.model.info import inspect_model
    from lacq.quantize import quantize_with_plan
    from lacq.model.resolve import resolve_model
    from lacq.plan.recipe import load_recipe, resolve_recipe
    model = resolve_model(model_spec)
    info = inspect_model(model)
    plan = resolve_recipe(load_recipe(recipe_name), info, _parse_sets(sets))
    build = require_build(BuildSpec(backend=backend), source)
    store = _store(ctx)
    with _progress() as progress:
        task = progress.add_task(f"quantize {plan.recipe}", total=1.0, detail="")
        out = quantize_with_plan(build, store, model, info, plan, output=output, force=force, imatrix=imatrix,
                                 strict=strict, dry_run=dry_run,
                                 progress=lambda f, d: progress.update(task, completed=f, detail=d))
        progress.update(task, completed=1.0, detail="")
    for m in out.mismatches:
        err_console.print(f"[yellow]note[/yellow]: {m.name}: planned {m.predicted}, llama-quantize chose {m.actual}")
    verb = "would write" if dry_run else ("up to date" if out.skipped else "wrote")
    console.print(f"{verb} {out.output}: predicted {out.predicted_bytes / 1e6:.2f} MB, "
                  f"{'dry-run' if dry_run else 'actual'} {out.actual_bytes / 1e6:.2f} MB "
                  f"({len(plan.rules)} rules, {out.seconds:.1f} s)")


# ---------------------------------------------------------------- ppl
def kv_options(fn):
    opts = [
        click.option("--ctk", default=None, help="K cache type (default f16, or the KV policy's)."),
        click.option("--ctv", default=None, help="V cache type (default f16, or the KV policy's)."),
        click.option("--fa", "flash_attn", type=click.Choice(["on", "off", "auto"]), default="auto",
                     show_default=True, help="Flash attention (a quantized V cache switches it on)."),
        click.option("--boundary", "boundary_n", type=int, default=None,
                     help="Put V of the first and last N KV layers (by KV-layer ordinal) at --boundary-type."),
        click.option("--boundary-type", default="q8_0", show_default=True),
        click.option("--boundary-k", is_flag=True, help="Apply --boundary to K as well."),
        click.option("--kv-policy", "kv_policy", default=None,
                     help="A KV policy: a name from recipes/kv/ or a .toml path."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def kv_config(ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy) -> KvConfig:
    if kv_policy:
        from lacq.plan.kv.policy import load_kv_policy
        if boundary_n is not None:
            raise LacqError("give either --boundary or --kv-policy, not both")
        return load_kv_policy(kv_policy).config(ctk=ctk, ctv=ctv, flash_attn=flash_attn)
    ctk, ctv = ctk or "f16", ctv or "f16"
    if boundary_n is None:
        return KvConfig(ctk, ctv, flash_attn)
    high = check_type(boundary_type)
    over = boundary(boundary_n, high)
    return KvConfig(ctk, ctv, flash_attn, over if boundary_k else (), over, policy_name=f"boundary {boundary_n} {high}")


@cli.command(name="ppl")
@click.argument("model_spec", metavar="MODEL")
@click.option("-f", "--corpus", type=click.Path(path_type=Path), default=None,
              help="Text to evaluate (default: WikiText-2 raw test split).")
@click.option("-c", "--ctx", "ctx_len", type=int, default=512, show_default=True)
@click.option("--chunks", type=int, default=20, show_default=True)
@run_options
@kv_options
@source_options
@click.pass_context
@handle_errors
def ppl_cmd(ctx, model_spec, corpus, ctx_len, chunks, threads, ngl, label, study, ctk, ctv, flash_attn,
            boundary_n, boundary_type, boundary_k, kv_policy, source, backend):
    """Perplexity of MODEL (llama-perplexity), stored with its provenance."""
    from lacq.model.info import inspect_model
    from lacq.quantize import check_kv, measure_ppl
    from lacq.model.resolve import resolve_model
    kv = kv_config(ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy)
    model = resolve_model(model_spec)
    info = inspect_model(model)
    resolved = check_kv(kv, info, backend)  # bad input fails before the build lookup
    if resolved.flash_attn != kv.flash_attn:
        err_console.print(f"[yellow]note[/yellow]: flash attention switched on: "
                          f"{', '.join(kv.needs_flash_attention())} need it")
    build = require_build(BuildSpec(backend=backend), source)
    store = _store(ctx)
    with _progress() as progress:
        task = progress.add_task("perplexity", total=1.0, detail=kv.label())
        out = measure_ppl(build, store, model, info, kv, corpus or paths.default_corpus(), ctx=ctx_len,
                          chunks=chunks, threads=threads, ngl=ngl, label=label, study=study,
                          progress=lambda f, d: progress.update(task, completed=f, detail=d))
    r = out.result
    console.print(f"PPL = {r.ppl:.4f} +/- {r.ppl_error:.5f}  ({len(r.chunks)} chunks of {r.n_ctx}, "
                  f"K {kv.k} {out.k_bits_per_value:.3f} bits/value, V {kv.v} {out.v_bits_per_value:.3f} bits/value, "
                  f"{out.seconds:.1f} s; result #{out.result_id})")
    if r.kv_layers:
        changed = [l for l in r.kv_layers if (l.k_type, l.v_type) != (kv.k, kv.v)]
        console.print("per-layer types: " + ", ".join(f"blk {l.block} (ord {l.ordinal}) K {l.k_type} V {l.v_type}"
                                                     for l in changed))


# ---------------------------------------------------------------- report
@cli.command(name="report")
@click.option("--study", default=None, help="Only results of this study (default: the latest study).")
@click.option("--base", "base_label", default=None, help="Configuration the deltas are against.")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json"]), default="table",
              show_default=True)
@click.option("--list-studies", is_flag=True, help="List the studies in the database.")
@click.pass_context
@handle_errors
def report_cmd(ctx, study, base_label, fmt, list_studies):
    """Comparison table of stored results: PPL, and KLD and NIAH where the study has them."""
    from lacq.results.tables import combined_frame, render
    store = _store(ctx)
    results = [r for r in store.results() if r.kind in ("ppl", "kld", "niah")]
    studies = list(dict.fromkeys(r.study for r in results if r.study))
    if list_studies:
        for s in studies:
            click.echo(s)
        return
    if not results:
        raise LacqError(f"no perplexity results in {store.path}; run `lacq ppl` or `lacq demo` first")
    if study is None and studies:
        study = studies[-1]
    rows = [r for r in results if r.study == study] if study else results
    if not rows:
        raise LacqError(f"no results for study {study!r}; known studies: {', '.join(studies) or 'none'}")
    df, columns = combined_frame(rows, base_label)
    render(df, fmt, console, title=study, columns=columns)


# ---------------------------------------------------------------- demo
@cli.command(name="demo")
@click.option("--model", "model_spec", default=None, help="GGUF path or hf://OWNER/REPO/FILE (default: SmolLM2-135M).")
@click.option("--chunks", type=int, default=20, show_default=True)
@click.option("-c", "--ctx", "ctx_len", type=int, default=512, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json"]), default="table")
@source_options
@click.pass_context
@handle_errors
def demo_cmd(ctx, model_spec, chunks, ctx_len, fmt, source, backend):
    """The layer-placement study end to end: build, quantize ten recipes, measure, compare."""
    from lacq.studies.placement import run_demo
    from lacq.model.resolve import resolve_model
    t0 = time.monotonic()
    store = _store(ctx)
    with _progress() as progress:
        btask = progress.add_task(f"build {backend}", total=1.0, detail="")
        build = run_build(BuildSpec(backend=backend), source,
                          progress=lambda f, d: progress.update(btask, completed=f, detail=d))
        progress.update(btask, completed=1.0, detail=build.key)
        mtask = progress.add_task("model", total=1.0, detail=model_spec or "SmolLM2-135M-Instruct Q4_1")
        model = resolve_model(model_spec)
        progress.update(mtask, completed=1.0)
        tasks: dict[str, int] = {}

        def step(stage: str, frac: float, detail: str) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=1.0, detail="")
            progress.update(tasks[stage], completed=frac, detail=detail)

        result = run_demo(build, store, model, paths.default_corpus(), ctx=ctx_len, chunks=chunks, step=step)
    from lacq.results.tables import render
    render(result.table, fmt, console,
           title=f"{model.name}: Q4_0 base, protected layers Q8_0 — WikiText-2, {chunks}×{ctx_len} tokens")
    console.print(f"study {result.study}; {time.monotonic() - t0:.0f} s. "
                  f"★ = most perplexity gained per extra MB over the smallest configuration, on the Pareto front.")


def main() -> None:
    cli(prog_name="lacq")


if __name__ == "__main__":
    main()


# Commands defined in other modules register themselves on `cli` when imported.
from lacq.cli import measure as cli_measure  # noqa: E402,F401
