"""Measurement commands: `lacq ppl`, `lacq kld`, `lacq niah`, `lacq bench`."""

from __future__ import annotations

from pathlib import Path

import click

from lacq.cli import cli
from lacq.cli.common import (
    BuildChoice,
    RunOptions,
    allow_long_context_option,
    build_options,
    console,
    corpus_path,
    echo_result_json,
    err_console,
    format_option,
    handle_errors,
    int_list,
    kv_options,
    open_results,
    progress_bar,
    result_json_option,
    run_options,
    split_option,
)
from lacq.errors import LacqError
from lacq.plan.kv.config import KvConfig


def _model(model_spec: str, kv: KvConfig | None = None, backend: str = "cpu"):
    """The model and its info; with `kv`, a warning for K/V pairs the backend runs off the device."""
    from lacq.model.info import inspect_model
    from lacq.model.resolve import resolve_model
    model = resolve_model(model_spec)
    info = inspect_model(model)
    if kv is not None:
        n_kv = len(info.kv_blocks)
        for (k, v), ords in kv.slow_pairs(backend, n_kv).items() if n_kv else ():
            err_console.print(f"[yellow]warning[/yellow]: K {k} / V {v} (KV layers {', '.join(map(str, ords))}) has "
                              f"no {backend} flash-attention kernel in this build: ggml converts those layers' "
                              "K and V to f16 at every call (slow; the numbers are unaffected)")
    return model, info


def text_options(fn):
    """The text a perplexity or KLD run reads: corpus, context, chunks, and leave to exceed the model's context."""
    for opt in reversed([
        click.option("-f", "--corpus", type=click.Path(path_type=Path), default=None,
                     help="Text to evaluate (default: WikiText-2 raw test split)."),
        split_option,
        click.option("-c", "--ctx", "ctx_len", type=int, default=512, show_default=True),
        click.option("--chunks", type=int, default=20, show_default=True),
        allow_long_context_option,
    ]):
        fn = opt(fn)
    return fn


def _text(corpus: Path | None, split: str | None, chunks: int | None, ctx_len: int) -> Path:
    """The text of a run (--corpus, --split), refused before the build lookup when too short for the chunks."""
    from lacq.corpus import check_length
    text = corpus_path(corpus, split)
    if not text.is_file():
        raise LacqError(f"corpus {text} does not exist")
    check_length(text, chunks, ctx_len)
    return text


# ---------------------------------------------------------------- ppl
@cli.command(name="ppl")
@click.argument("model_spec", metavar="MODEL")
@text_options
@run_options
@result_json_option
@kv_options
@build_options
@click.pass_context
@handle_errors
def ppl_cmd(ctx, model_spec, corpus, split, ctx_len, chunks, allow_long_context, run: RunOptions, as_json,
            kv: KvConfig, build: BuildChoice):
    """Perplexity of MODEL (llama-perplexity), stored with its provenance."""
    from lacq.measure.common import check_context, check_kv
    from lacq.measure.ppl import measure_ppl
    model, info = _model(model_spec, kv, build.backend)
    resolved = check_kv(kv, info, build.backend)  # bad input fails before the build lookup
    check_context(ctx_len, info, allow_long_context)
    text = _text(corpus, split, chunks, ctx_len)
    if resolved.flash_attn != kv.flash_attn:
        err_console.print(f"[yellow]note[/yellow]: flash attention switched on: "
                          f"{', '.join(kv.needs_flash_attention())} need it")
    tools = build.require()
    store = open_results(ctx)
    with progress_bar() as progress:
        task = progress.add_task("perplexity", total=1.0, detail=kv.label())
        out = measure_ppl(tools, store, model, info, kv, text, ctx=ctx_len, chunks=chunks,
                          threads=run.threads, ngl=run.ngl, label=run.label, study=run.study,
                          progress=lambda f, d: progress.update(task, completed=f, detail=d),
                          allow_long_context=allow_long_context)
    if as_json:
        echo_result_json(store, out.result_id)
        return
    r = out.result
    console.print(f"PPL = {r.ppl:.4f} +/- {r.ppl_error:.5f}  ({len(r.chunks)} chunks of {r.n_ctx}, "
                  f"K {kv.k} {out.k_bits_per_value:.3f} bits/value, V {kv.v} {out.v_bits_per_value:.3f} bits/value, "
                  f"{out.seconds:.1f} s; result #{out.result_id})")
    if r.kv_layers:
        changed = [l for l in r.kv_layers if (l.k_type, l.v_type) != (kv.k, kv.v)]
        console.print("per-layer types: " + ", ".join(f"blk {l.block} (ord {l.ordinal}) K {l.k_type} V {l.v_type}"
                                                     for l in changed))


# ---------------------------------------------------------------- kld
@cli.command(name="kld")
@click.argument("model_spec", metavar="MODEL")
@click.option("--base", "base_spec", required=True, help="The unquantized (or higher-precision) base GGUF.")
@text_options
@run_options
@click.option("--recipe", default=None, help="Weight recipe name to record with the result.")
@result_json_option
@kv_options
@build_options
@click.pass_context
@handle_errors
def kld_cmd(ctx, model_spec, base_spec, corpus, split, ctx_len, chunks, allow_long_context, run: RunOptions, recipe,
            as_json, kv: KvConfig, build: BuildChoice):
    """KL-divergence of MODEL against BASE (llama-perplexity; base logits cached)."""
    from lacq.measure.common import check_context
    from lacq.measure.kld import measure_kld
    model, info = _model(model_spec, kv, build.backend)
    base, base_info = _model(base_spec)
    if chunks < 1:
        raise LacqError("--chunks must be at least 1")
    for i in (info, base_info):
        check_context(ctx_len, i, allow_long_context)
    text = _text(corpus, split, chunks, ctx_len)
    tools = build.require()
    store = open_results(ctx)
    with progress_bar() as progress:
        task = progress.add_task("kl-divergence", total=1.0, detail=kv.label())
        out = measure_kld(tools, store, model, info, base, base_info, kv, text, ctx=ctx_len,
                          chunks=chunks, threads=run.threads, ngl=run.ngl, label=run.label, study=run.study,
                          recipe=recipe, progress=lambda f, d: progress.update(task, completed=f, detail=d),
                          allow_long_context=allow_long_context)
    if as_json:
        echo_result_json(store, out.result_id)
        return
    r = out.result
    q = r.kld_quantiles
    console.print(f"Mean KLD = {r.kld_mean:.6f} ± {r.kld_mean_error:.6f}  (99.9% {q.get('p99.9', float('nan')):.5f}, "
                  f"99% {q.get('p99', float('nan')):.5f}, max {q.get('max', float('nan')):.4f}); RMS Δp "
                  f"{r.dp_rms_pct:.3f}%, same top p {r.same_top_p_pct:.2f} ± {r.same_top_p_error_pct:.2f}%; "
                  f"PPL {r.ppl_q:.4f} vs base {r.ppl_base:.4f} (ratio {r.ppl_ratio:.4f})")
    console.print(f"{r.n_chunks} chunks of {r.n_ctx}; base logits {'cached' if out.logits_cached else 'computed'} "
                  f"({out.logits}); {out.seconds:.1f} s; result #{out.result_id}", soft_wrap=True)


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
@format_option(("table", "md", "json"), json_alias=True)
@kv_options
@build_options
@click.pass_context
@handle_errors
def niah_cmd(ctx, model_spec, ctx_list, depths, trials, seed, haystack, chat_template, runner, n_predict,
             run: RunOptions, plot, fmt, kv: KvConfig, build: BuildChoice):
    """Needle-in-a-haystack pass rates (depth × context length) for MODEL and a KV configuration."""
    from lacq.measure.niah.grid import measure_niah
    from lacq.results.plots import plot_niah
    from lacq.results.render import niah_grid
    from lacq.results.tables import niah_grid_frame
    lengths, depth_list = int_list(ctx_list, "--ctx"), int_list(depths, "--depths")
    model, info = _model(model_spec, kv, build.backend)
    tools, store = build.require(), open_results(ctx)
    with progress_bar() as progress:
        task = progress.add_task("niah", total=1.0, detail=kv.label())
        out = measure_niah(tools, store, model, info, kv, lengths=lengths, depths=depth_list, trials=trials,
                           seed=seed, haystack=haystack, chat_template=chat_template, runner=runner,
                           n_predict=n_predict, threads=run.threads, ngl=run.ngl, label=run.label, study=run.study,
                           progress=lambda f, d: progress.update(task, completed=f, detail=d))
    res = store.get(out.result_id)
    df = niah_grid_frame(res.metrics)
    if plot:
        plot_niah({res.label: df}, plot)
        err_console.print(f"wrote {plot}")
    if fmt == "json":
        echo_result_json(store, out.result_id)
        return
    niah_grid(df, fmt, console, f"{res.label}: NIAH pass rate ({trials} trials per cell, {out.runner})")
    console.print(f"overall {res.metrics['pass_rate']:.0%} in {out.seconds:.0f} s; result #{out.result_id}",
                  markup=False, highlight=False)


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
@format_option(json_alias=True)
@kv_options
@build_options
@click.pass_context
@handle_errors
def bench_cmd(ctx, model_spec, pp, tg, depth_list, repetitions, run: RunOptions, plot, fmt, kv: KvConfig,
              build: BuildChoice):
    """Prefill and decode speed (llama-bench -o json) per KV configuration and depth."""
    from lacq.measure.bench import measure_bench
    from lacq.results.plots import plot_bench
    from lacq.results.render import render
    from lacq.results.tables import BENCH_COLUMNS, bench_frame
    depths = tuple(int_list(depth_list, "--depth"))
    model, info = _model(model_spec, kv, build.backend)
    tools, store = build.require(), open_results(ctx)
    with progress_bar() as progress:
        task = progress.add_task("llama-bench", total=1.0, detail=kv.label())
        out = measure_bench(tools, store, model, info, kv, pp=pp, tg=tg, depths=depths, repetitions=repetitions,
                            threads=run.threads, ngl=run.ngl, label=run.label, study=run.study,
                            progress=lambda f, d: progress.update(task, completed=f, detail=d))
    df = bench_frame([store.get(out.result_id)])
    if plot:
        plot_bench(df, plot)
        err_console.print(f"wrote {plot}")
    if fmt == "json":
        echo_result_json(store, out.result_id)
        return
    render(df, fmt, console, title=f"llama-bench pp{pp} / tg{tg} on {out.rows[0].device}", columns=BENCH_COLUMNS)
