"""Measurement commands beyond perplexity (niah, kld, bench), registered on lacq's CLI group."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from lacq import paths
from lacq.llama.build import BuildSpec, require_build
from lacq.cli import _progress, _store, cli, console, handle_errors, kv_config, kv_options, run_options, source_options
from lacq.errors import LacqError


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=what) from None
    if not values:
        raise click.BadParameter("give at least one value", param_hint=what)
    return values


def _prepare(ctx, model_spec: str, kv_args: tuple, backend: str, source: str | None):
    """What every measurement starts from: (KV config, model, its info, the build, the store)."""
    from lacq.model.info import inspect_model
    from lacq.model.resolve import resolve_model
    kv = kv_config(*kv_args)
    model = resolve_model(model_spec)
    info = inspect_model(model)
    return kv, model, info, require_build(BuildSpec(backend=backend), source), _store(ctx)


def _fmt_table(fmt: str, df, columns: dict, title: str) -> None:
    from lacq.results.tables import render
    render(df, fmt, console, title=title, columns=columns)


# ---------------------------------------------------------------- niah
@cli.command(name="niah")
@click.argument("model_spec", metavar="MODEL")
@click.option("--ctx", "ctx_list", default="1024,2048,4096,8192", show_default=True,
              help="Context lengths in tokens (prompt + answer), comma-separated.")
@click.option("--depths", default="0,25,50,75,100", show_default=True,
              help="Needle depths in percent of the haystack, comma-separated.")
@click.option("--trials", type=int, default=5, show_default=True, help="Trials (needle and haystack) per cell.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--haystack", type=click.Path(path_type=Path), default=None,
              help="Haystack text (default: WikiText-2 raw test split).")
@click.option("--chat-template", default="auto", show_default=True,
              help="auto (the model's own), chatml, none (plain prompt) or a .jinja file.")
@click.option("--runner", type=click.Choice(["bindings", "completion"]), default="bindings", show_default=True,
              help="In process through llama-cpp-python, or llama-completion in a subprocess.")
@click.option("-n", "--n-predict", type=int, default=16, show_default=True)
@run_options
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a PNG heatmap.")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "json"]), default="table")
@kv_options
@source_options
@click.pass_context
@handle_errors
def niah_cmd(ctx, model_spec, ctx_list, depths, trials, seed, haystack, chat_template, runner, n_predict, threads,
             ngl, label, study, plot, fmt, ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy,
             source, backend):
    """Needle-in-a-haystack pass rates (depth × context length) for MODEL and a KV configuration."""
    from lacq.measure.kld import measure_niah, niah_grid_frame, plot_niah
    lengths, depth_list = _int_list(ctx_list, "--ctx"), _int_list(depths, "--depths")
    kv, model, info, build, store = _prepare(
        ctx, model_spec, (ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy), backend, source)
    with _progress() as progress:
        task = progress.add_task("niah", total=1.0, detail=kv.label())
        out = measure_niah(build, store, model, info, kv, lengths=lengths, depths=depth_list, trials=trials,
                           seed=seed, haystack=haystack, chat_template=chat_template, runner=runner,
                           n_predict=n_predict, threads=threads, ngl=ngl, label=label, study=study,
                           progress=lambda f, d: progress.update(task, completed=f, detail=d))
    (res,) = [r for r in store.results(kind="niah") if r.id == out.result_id]
    df = niah_grid_frame(res.metrics)
    title = f"{res.label}: NIAH pass rate ({trials} trials per cell, {out.runner})"
    print_niah_grid(df, fmt, title)
    if plot:
        plot_niah({res.label: df}, plot)
        console.print(f"wrote {plot}")
    console.print(f"overall {res.metrics['pass_rate']:.0%} in {out.seconds:.0f} s; result #{out.result_id}")


def print_niah_grid(df, fmt: str, title: str) -> None:
    cells = lambda v: "-" if v is None or v != v else f"{v:.0%}"
    if fmt == "json":
        console.print_json(data={str(d): {str(l): df.loc[d, l] for l in df.columns} for d in df.index})
        return
    if fmt == "md":
        lines = ["| depth \\ context | " + " | ".join(str(c) for c in df.columns) + " |",
                 "|" + " --- |" * (len(df.columns) + 1)]
        lines += [f"| {d}% | " + " | ".join(cells(df.loc[d, c]) for c in df.columns) + " |" for d in df.index]
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table("depth", *[str(c) for c in df.columns], title=title)
    for d in df.index:
        table.add_row(f"{d}%", *[cells(df.loc[d, c]) for c in df.columns])
    console.print(table)


# ---------------------------------------------------------------- kld
@cli.command(name="kld")
@click.argument("model_spec", metavar="MODEL")
@click.option("--base", "base_spec", required=True, help="The unquantized (or higher-precision) base GGUF.")
@click.option("-f", "--corpus", type=click.Path(path_type=Path), default=None,
              help="Text to evaluate (default: WikiText-2 raw test split).")
@click.option("-c", "--ctx", "ctx_len", type=int, default=512, show_default=True)
@click.option("--chunks", type=int, default=20, show_default=True)
@run_options
@click.option("--recipe", default=None, help="Weight recipe name to record with the result.")
@kv_options
@source_options
@click.pass_context
@handle_errors
def kld_cmd(ctx, model_spec, base_spec, corpus, ctx_len, chunks, threads, ngl, label, study, recipe, ctk, ctv,
            flash_attn, boundary_n, boundary_type, boundary_k, kv_policy, source, backend):
    """KL-divergence of MODEL against BASE (llama-perplexity; base logits cached)."""
    from lacq.model.info import inspect_model
    from lacq.measure.kld import measure_kld
    from lacq.model.resolve import resolve_model
    kv = kv_config(ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy)
    model, base = resolve_model(model_spec), resolve_model(base_spec)
    info, base_info = inspect_model(model), inspect_model(base)
    if chunks < 1:
        raise LacqError("--chunks must be at least 1")
    build = require_build(BuildSpec(backend=backend), source)
    store = _store(ctx)
    with _progress() as progress:
        task = progress.add_task("kl-divergence", total=1.0, detail=kv.label())
        out = measure_kld(build, store, model, info, base, base_info, kv, corpus or paths.default_corpus(),
                          ctx=ctx_len, chunks=chunks, threads=threads, ngl=ngl, label=label, study=study,
                          recipe=recipe, progress=lambda f, d: progress.update(task, completed=f, detail=d))
    r = out.result
    q = r.kld_quantiles
    console.print(f"Mean KLD = {r.kld_mean:.6f} ± {r.kld_mean_error:.6f}  (99% {q.get('p99', float('nan')):.5f}, "
                  f"max {q.get('max', float('nan')):.4f}); RMS Δp {r.dp_rms_pct:.3f}%, same top p "
                  f"{r.same_top_p_pct:.2f}%; PPL {r.ppl_q:.4f} vs base {r.ppl_base:.4f} (ratio {r.ppl_ratio:.4f})")
    console.print(f"{r.n_chunks} chunks of {r.n_ctx}; base logits {'cached' if out.logits_cached else 'computed'} "
                  f"({out.logits}); {out.seconds:.1f} s; result #{out.result_id}", soft_wrap=True)


# ---------------------------------------------------------------- bench
@cli.command(name="bench")
@click.argument("model_spec", metavar="MODEL")
@click.option("--pp", type=int, default=512, show_default=True, help="Prompt tokens of the prefill test.")
@click.option("--tg", type=int, default=128, show_default=True, help="Tokens of the decode test.")
@click.option("--depth", "depth_list", default="0", show_default=True,
              help="Tokens already in the KV cache, comma-separated (e.g. 0,8192).")
@click.option("-r", "--repetitions", type=int, default=5, show_default=True)
@run_options
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a PNG chart.")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json"]), default="table")
@kv_options
@source_options
@click.pass_context
@handle_errors
def bench_cmd(ctx, model_spec, pp, tg, depth_list, repetitions, threads, ngl, label, study, plot, fmt, ctk, ctv,
              flash_attn, boundary_n, boundary_type, boundary_k, kv_policy, source, backend):
    """Prefill and decode speed (llama-bench -o json) per KV configuration and depth."""
    from lacq.measure.kld import BENCH_COLUMNS, bench_frame, measure_bench, plot_bench
    kv, model, info, build, store = _prepare(
        ctx, model_spec, (ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy), backend, source)
    with _progress() as progress:
        task = progress.add_task("llama-bench", total=1.0, detail=kv.label())
        out = measure_bench(build, store, model, info, kv, pp=pp, tg=tg,
                            depths=tuple(_int_list(depth_list, "--depth")), repetitions=repetitions,
                            threads=threads, ngl=ngl, label=label, study=study)
        progress.update(task, completed=1.0)
    df = bench_frame([r for r in store.results(kind="bench") if r.id == out.result_id])
    _fmt_table(fmt, df, BENCH_COLUMNS, f"llama-bench pp{pp} / tg{tg} on {out.rows[0].device}")
    if plot:
        plot_bench(df, plot)
        console.print(f"wrote {plot}")
