"""Studies built from measurements: `lacq demo` (the layer-placement study), `lacq scan` (sensitivity scans) and
`lacq optimize` (recipes and KV policies from a scan)."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import click

from lacq.cli import cli
from lacq.cli.common import (
    BuildChoice,
    build_options,
    console,
    err_console,
    format_option,
    handle_errors,
    message_console,
    open_results,
    progress_bar,
    stage_stepper,
)
from lacq.corpus import judge_text, scan_text
from lacq.errors import LacqError
from lacq.llama.build import BuildSpec
from lacq.llama.build import build as run_build

DEMO_MODEL = "clean-base"  # weight claims are made on the clean base (docs/clean-base.md)


@cli.command(name="demo")
@click.option("--model", "model_spec", default=DEMO_MODEL, show_default=True,
              help="A named model (clean-base, smollm2, ...), GGUF path or hf://OWNER/REPO/FILE.")
@click.option("--chunks", type=int, default=20, show_default=True)
@click.option("-c", "--ctx", "ctx_len", type=int, default=512, show_default=True)
@click.option("--scan-chunks", type=int, default=4, show_default=True, help="Chunks of the sensitivity scan's runs.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Importance matrix to use instead of the one the demo makes (lacq imatrix's: 100×512 tokens of "
                   "the calibration part, cached).")
@click.option("--no-imatrix", is_flag=True, help="No importance matrix: lacq's files are quantized without one and "
              "llama.cpp's mixes appear only without one.")
@format_option()
@build_options
@click.pass_context
@handle_errors
def demo_cmd(ctx, model_spec, chunks, ctx_len, scan_chunks, imatrix, no_imatrix, fmt, build: BuildChoice):
    """The layer-placement study end to end: hand recipes, llama.cpp's mixes (without and with the importance
    matrix) and optimized recipes from a block and group scan, by KLD."""
    from lacq.corpus import calibration_text, check_length
    from lacq.measure.imatrix import DEFAULT_CHUNKS
    from lacq.model.resolve import resolve_model
    from lacq.results.render import render
    from lacq.studies.placement import run_placement_study
    if imatrix and no_imatrix:
        raise LacqError("--imatrix and --no-imatrix: give one")
    calibration = None if imatrix or no_imatrix else calibration_text()
    if calibration:
        check_length(calibration, DEFAULT_CHUNKS, 512)  # before the build: the text holds the matrix's chunks
    t0 = time.monotonic()
    store = open_results(ctx)
    with progress_bar() as progress:
        btask = progress.add_task(f"build {build.backend}", total=1.0, detail="")
        tools = run_build(BuildSpec(backend=build.backend), build.source,
                          progress=lambda f, d: progress.update(btask, completed=f, detail=d))
        progress.update(btask, completed=1.0, detail=tools.key)
        mtask = progress.add_task("model", total=1.0, detail=model_spec)
        model = resolve_model(model_spec)
        progress.update(mtask, completed=1.0)
        result = run_placement_study(tools, store, model, judge_text(), scan_corpus=scan_text(), ctx=ctx_len,
                                     chunks=chunks, scan_chunks=scan_chunks, step=stage_stepper(progress),
                                     imatrix=imatrix, calibration=calibration)
    from lacq.results.tables import PLACEMENT_COLUMNS
    from lacq.studies.sensitivity import classify, partitions
    render(result.table, fmt, console, columns=PLACEMENT_COLUMNS,
           title=f"{model.name} from its F16 base: KL-divergence on WikiText-2, {chunks}×{ctx_len} tokens")
    notes = message_console(fmt)  # json and csv: the table alone on stdout, these sentences on stderr
    for kinds in partitions(result.scan):
        pattern, advice = classify(result.scan, kinds)
        notes.print(f"scan ({result.scan.chunks} chunks), {kinds[0]}s: [bold]{pattern}[/bold]. {advice}.")
    for note in result.scan.notes:
        notes.print(f"[yellow]note[/yellow]: {note}")
    notes.print(f"importance matrix: {result.imatrix or 'none (--no-imatrix)'}", markup=False, highlight=False,
                soft_wrap=True)
    for plot in result.plots:
        notes.print(f"wrote {plot}", markup=False, highlight=False, soft_wrap=True)
    notes.print(f"study {result.study}; {time.monotonic() - t0:.0f} s. Sorted by mean KLD (± its standard error); "
                f"★ = lowest KLD at ≤ first8_q8's size, only where it leads by more than 2× the combined ±.")


def comma_list(text: str) -> list[str]:
    """A comma-separated option's items, stripped, empty ones dropped ("q4_0, q8_0" is q4_0 and q8_0)."""
    return [t.strip() for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------- scan
@cli.group(name="scan")
def scan_group():
    """Per-unit sensitivity scans (weights, KV cache): which units deserve the bits."""


def _show_scan(scan, out: Path | None, plot_dir: Path | None, fmt: str, rid: int) -> None:
    """The scan's units by partition (a table each for people; json and csv: one document on stdout,
    the sentences on stderr)."""
    import json

    import pandas as pd

    from lacq.results.render import records, render
    from lacq.studies.sensitivity import COLUMNS, KV_COLUMNS, classify, partitions, plot_scan, unit_frame
    cols = KV_COLUMNS if scan.kind == "kv" else COLUMNS
    notes = message_console(fmt)
    lo, hi = scan.uniform[scan.lowest], scan.uniform[scan.highest]
    notes.print(f"all {scan.lowest}: {kld_columns(lo)} (PPL {lo.ppl:.3f}); all {scan.highest}: "
                f"{kld_columns(hi)} (PPL {hi.ppl:.3f}); {scan.chunks} chunks of {scan.ctx} of the scan's text",
                highlight=False)
    parts = []
    for kinds in partitions(scan):
        df = unit_frame(scan, kinds)
        pattern, advice = classify(scan, kinds)
        parts.append((kinds, df, pattern, advice))
        if fmt not in ("json", "csv"):
            render(df, fmt, console, title=f"{kinds[0]} units, sorted by recovery per unit of cost", columns=cols)
        notes.print(f"[bold]{kinds[0]}s: {pattern}[/bold]. {advice}.", highlight=False)
    if fmt == "csv":  # one table: the partition names the rows' own
        frames = [df.assign(partition=kinds[0]) for kinds, df, _, _ in parts]
        render(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), fmt, console,
               columns={"partition": "Partition", **cols})
    for note in scan.notes:
        notes.print(f"[yellow]note[/yellow]: {note}", highlight=False)
    if out:
        scan.write(out)
        notes.print(f"wrote {out}", markup=False, highlight=False, soft_wrap=True)
    if plot_dir:
        stem = (out.stem if out else f"scan-{scan.kind}")
        for p in plot_scan(scan, plot_dir, stem):
            notes.print(f"wrote {p}", markup=False, highlight=False, soft_wrap=True)
    notes.print(f"scan stored as result #{rid} (study {scan.provenance['study']}), "
                f"{scan.provenance['seconds']:.0f} s", markup=False, highlight=False)
    if fmt == "json":
        uniform = {t: {"kld": k.kld, "kld_error": k.kld_error, "kld_p99.9": k.kld_p999, "kld_p99": k.kld_p99,
                       "same_top_p_pct": k.same_top_p, "same_top_p_error_pct": k.same_top_p_error, "ppl": k.ppl}
                   for t, k in scan.uniform.items()}
        console.print_json(json.dumps({
            "result_id": rid, "study": scan.provenance["study"], "kind": scan.kind, "types": list(scan.types),
            "chunks": scan.chunks, "ctx": scan.ctx, "uniform": uniform, "notes": list(scan.notes),
            "partitions": [{"kinds": list(kinds), "pattern": pattern, "advice": advice,
                            "units": records(df, [c for c in cols if c in df.columns])}
                           for kinds, df, pattern, advice in parts]}, default=str))


def _store_scan(store, scan, model: Path, tools) -> int:
    import json
    import sys
    return store.add(kind="scan", label=f"{scan.kind} scan {scan.provenance['study']}", model=model,
                     build=tools.provenance(), command=sys.argv, metrics=json.loads(scan.to_json()),
                     study=scan.provenance["study"], ctx=scan.ctx, chunks=scan.chunks,
                     wall_seconds=scan.provenance.get("seconds"))


scan_common = [
    click.option("--chunks", type=int, default=4, show_default=True, help="Chunks of the KLD runs."),
    click.option("-c", "--ctx", "ctx_len", type=int, default=512, show_default=True),
    click.option("--jobs", "workers", type=int, default=None,
                 help="Variants measured at once, each by its own engine with --threads (default 1; with --gpus one "
                 "per GPU; with --executor ray one actor per GPU of the cluster, or 1 on the CPU). Several engines "
                 "may share one GPU, each with its own copy of the model: worth it for small models."),
    click.option("--gpus", default=None, metavar="LIST|all",
                 help="An engine per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES): ids as "
                 "CUDA_VISIBLE_DEVICES takes them, comma-separated, or all (every visible GPU)."),
    click.option("--executor", "executor_name", type=click.Choice(["local", "ray"]), default="local",
                 show_default=True, help="ray: the engines on Ray actors (one per --jobs, each loading the model "
                 "once); results are filed here, and a lost actor costs only its variant in flight."),
    click.option("--ray-address", default=None,
                 help="Ray cluster to join (`auto`, `ray://HOST:10001`); default: start a local one."),
    click.option("-t", "--threads", type=int, default=None),
    click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write the scan as JSON (for `lacq optimize`)."),
    click.option("--plot-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Write a bar chart per unit kind here."),
    click.option("--no-engine", is_flag=True, help="Measure each variant with its own llama-perplexity run (weights: "
                 "on a file assembled for it) instead of in place in one engine process; for comparison."),
]


def _note(text: str) -> None:
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _sharding(build: BuildChoice, workers, gpus, executor_name, ray_address, no_engine) -> dict:
    """The scan's workers, GPUs and Ray engines from --jobs, --gpus, --executor and --ray-address (checked before
    any work)."""
    from lacq.studies.engine import engine_workers
    if ray_address and executor_name != "ray":
        raise LacqError("--ray-address is for --executor ray")
    ray = executor_name == "ray"
    workers, gpu_list = engine_workers(build.backend, workers, gpus, engine=not no_engine, ray=ray)
    if not ray:
        return {"workers": workers, "gpus": gpu_list}
    from lacq.studies.engine_ray import RayEngines
    return {"workers": 1, "ray": RayEngines(ray_address, workers, gpu=build.backend != "cpu")}


def _scan_options(fn):
    for opt in reversed(scan_common):
        fn = opt(fn)
    return fn


@scan_group.command(name="weights")
@click.argument("model_spec", metavar="MODEL")
@click.option("--base", "base_spec", required=True, help="The unquantized parent (F16/BF16/F32) of MODEL.")
@click.option("--types", default="q4_0,q8_0", show_default=True, help="Candidate types, comma-separated.")
@click.option("--unit", "unit_list", default="block,group", show_default=True,
              help="Units: block, group (a tensor kind across blocks), tensor; comma-separated.")
@click.option("--include-source-type", is_flag=True, help="Keep the model file's own block type as a candidate.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Importance matrix (lacq imatrix BASE) the candidate files are quantized with.")
@_scan_options
@format_option()
@build_options
@click.pass_context
@handle_errors
def scan_weights_cmd(ctx, model_spec, base_spec, types, unit_list, include_source_type, imatrix, chunks, ctx_len,
                     workers, gpus, executor_name, ray_address,
                     threads, out, plot_dir, no_engine, fmt, build: BuildChoice):
    """KLD per unit when only it is raised to each higher type, and only it lowered from the highest."""
    from lacq.model.resolve import resolve_model
    from lacq.studies.scan import scan_weights
    shards = _sharding(build, workers, gpus, executor_name, ray_address, no_engine)
    model, base = resolve_model(model_spec), resolve_model(base_spec)
    tools, store = build.require(), open_results(ctx)
    with progress_bar() as progress:
        scan = scan_weights(tools, store, model, base, scan_text(), types=comma_list(types),
                            units=tuple(comma_list(unit_list)), chunks=chunks, ctx=ctx_len,
                            threads=threads, include_source_type=include_source_type,
                            imatrix=imatrix, **shards,
                            step=stage_stepper(progress), engine=not no_engine, note=_note)
    _show_scan(scan, out, plot_dir, fmt, _store_scan(store, scan, model, tools))


@scan_group.command(name="kv")
@click.argument("model_spec", metavar="MODEL")
@click.option("--types", default="turbo2,turbo3,turbo4,q8_0", show_default=True, help="Candidate KV types.")
@click.option("--cache", type=click.Choice(["v", "k", "both"]), default="v", show_default=True)
@click.option("--other", default="q8_0", show_default=True, help="Type of the cache not scanned.")
@_scan_options
@format_option()
@build_options
@click.pass_context
@handle_errors
def scan_kv_cmd(ctx, model_spec, types, cache, other, chunks, ctx_len, workers, gpus, executor_name, ray_address,
                threads, out, plot_dir, no_engine, fmt, build: BuildChoice):
    """KLD per KV layer (by ordinal) raised alone from the cheapest type and lowered alone from the dearest."""
    from lacq.model.resolve import resolve_model
    from lacq.studies.scan import scan_kv
    shards = _sharding(build, workers, gpus, executor_name, ray_address, no_engine)
    model = resolve_model(model_spec)
    tools, store = build.require(), open_results(ctx)
    with progress_bar() as progress:
        scan = scan_kv(tools, store, model, scan_text(), types=comma_list(types), cache=cache, other=other,
                       chunks=chunks, ctx=ctx_len, threads=threads, **shards,
                       step=stage_stepper(progress), engine=not no_engine, note=_note)
    _show_scan(scan, out, plot_dir, fmt, _store_scan(store, scan, model, tools))


# ---------------------------------------------------------------- optimize
@cli.group(name="optimize")
def optimize_group():
    """A recipe (weights) or KV policy from a scan, for a size or bits budget."""


def _load_scan(ctx, spec: str):
    """A scan JSON file, or a stored scan by its study name or result id."""
    from lacq.studies.artifact import Scan
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return Scan.read(path)
    store = open_results(ctx)
    for r in reversed(store.results(kind="scan")):
        if spec in (r.study, str(r.id)):
            import json
            return Scan.from_json(json.dumps(r.metrics), f"result #{r.id}")
    raise LacqError(f"no scan file or stored scan {spec!r}; give the JSON `lacq scan … -o` wrote, or a scan study")


def _check_model(ctx, scan, model_spec: str | None) -> None:
    if model_spec:
        from lacq.model.resolve import resolve_model
        from lacq.studies.optimize import check_scan_matches
        check_scan_matches(scan, open_results(ctx).sha256(resolve_model(model_spec)))


def _preflight(ctx, build: BuildChoice, scan, measuring: bool, strict: bool, outputs, force: bool,
               imatrix: Path | None = None):
    """Everything that can refuse the command, checked before any search, measurement or write: the outputs named
    on the command line and, where it measures (--verify, --refine), the judge text, the build and the scan's
    files. The build (None when nothing is measured)."""
    from lacq.studies.optimize_out import check_outputs
    from lacq.studies.verify import check_verify_inputs
    check_outputs([p for p in outputs if p], force=force)
    if not measuring:
        return None
    _check_judge(scan, strict)
    tools = build.require()
    check_verify_inputs(open_results(ctx), scan, imatrix)
    return tools


@contextlib.contextmanager
def _staged(path: Path, text: str):
    """`text` in a temporary file named like `path`, for --verify to measure before anything is written."""
    with tempfile.TemporaryDirectory(prefix="lacq-optimize-") as tmp:
        staged = Path(tmp) / path.name
        staged.write_text(text)
        yield staged


def _report_solution(s, scan) -> None:
    where = (f"{s.size_mb:.2f} MB" + ("" if s.bpw is None else f" ({s.bpw:.3f} bpw)") if s.kind == "weights"
             else f"{s.bits_per_value:.3f} bits/value")
    ends = ", ".join(f"from the {t} end {v:.5f}" for t, v in ((scan.lowest, s.kld_low), (scan.highest, s.kld_high))
                     if v is not None)
    console.print(f"{s.partition} partition, {where}: predicted KLD {s.kld:.5f} ± {s.kld_error:.5f} on the scan's "
                  f"{s.chunks}×{scan.ctx} tokens ({ends}); "
                  f"{s.method}{'' if s.gap is None else f', greedy−DP gap {s.gap:+.2e}'}")
    changed = {u: t for u, t in s.choice.items() if t != s.lowest}
    console.print(f"{len(changed)} of {len(s.choice)} units above {s.lowest}: "
                  + ", ".join(f"{u}={t}" for u, t in changed.items()), soft_wrap=True)
    for note in s.notes:
        console.print(f"[yellow]note[/yellow]: {note}")


def _judgements(s, scan) -> str:
    """The prediction and the judgement of a solution, each with the tokens it rests on."""
    out = f"predicted {s.kld:.5f} on the scan's {s.chunks}×{scan.ctx}"
    if s.judged is not None:
        out += f"; judged {s.judged.kld:.5f} ± {s.judged.kld_error:.5f} on {s.judged.chunks}×{scan.ctx}"
    return out


def kld_columns(k) -> str:
    """A KLD measurement as every KLD table shows it: mean ± error, 99.9% quantile, same top p ± error."""
    out = f"KLD {k.kld:.5f} ± {k.kld_error:.5f}"
    if k.kld_p999 is not None:
        out += f", 99.9% {k.kld_p999:.4f}"
    if k.same_top_p is not None:
        out += f", same top p {k.same_top_p:.2f} ± {(k.same_top_p_error or 0):.2f}%"
    return out


def _check_judge(scan, strict: bool) -> None:
    """Warn (refuse with --strict) when the judge text may share tokens with the scan's text."""
    from lacq.corpus import judge_overlap
    problem = judge_overlap(judge_text(), sha256=scan.provenance.get("corpus_sha256"))
    if problem and strict:
        raise LacqError(f"{problem}; --strict refuses to judge on it")
    if problem:
        err_console.print(f"[yellow]warning[/yellow]: {problem}", highlight=False)


def _judged(ctx, rid: int) -> str:
    """A stored KLD result as `kld_columns` shows it, with the tokens it was measured on."""
    from lacq.studies.scan import stored_kld
    store = open_results(ctx)
    r = store.get(rid)
    return f"{kld_columns(stored_kld(store, rid))} on the judge text's {r.chunks}×{r.ctx} tokens"


def _refine_options(fn):
    fn = click.option("--no-engine", is_flag=True, help="Measure each of --verify's proposals and --refine's choices "
                      "with its own llama-perplexity run (weights: on a file assembled for it) instead of in place in "
                      "one engine process per chunk count; for comparison.")(fn)
    fn = click.option("--strict", is_flag=True, help="Refuse to judge (--verify, --refine) on text that may "
                      "share tokens with the scan's, instead of warning.")(fn)
    fn = click.option("--judge-chunks", type=click.IntRange(min=1), default=20, show_default=True,
                      help="Chunks that --verify and --refine judge proposals and the answer on (at least the "
                           "scan's; more, so that the scan's noise does not choose what is kept).")(fn)
    fn = click.option("-t", "--threads", type=int, default=None,
                      help="Threads per llama.cpp run (--verify's proposals, --refine).")(fn)
    fn = click.option("--jobs", "workers", type=int, default=1, show_default=True,
                      help="Measurements at a time (--verify's proposals, --refine).")(fn)
    return click.option("--refine", "refine_rounds", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Rounds of measured refinement around the answer (each measures every single-unit "
                             "move on the scan's tokens; see lacq/studies/refine.py).")(fn)


def _measured(ctx, tools, scan, s, verify: bool, rounds: int, workers: int, threads: int | None,
              judge: int, imatrix: Path | None = None, engine: bool = True):
    """--verify: the search's distinct proposals measured, the best kept; --refine: then measured rounds."""
    from lacq.studies.refine import kv_runner, pick_measured, refine, refined_solution, summary, weights_runner
    if not rounds and not (verify and s.alternatives):
        return s
    store = open_results(ctx)
    runner = weights_runner if scan.kind == "weights" else kv_runner
    table, kept, r = [], None, None
    with progress_bar() as progress:
        step = stage_stepper(progress)
        extra = {"imatrix": imatrix} if scan.kind == "weights" else {}
        measure, key = runner(tools, store, scan, judge_text(), threads=threads, workers=workers, step=step,
                              engine=engine, note=_note, **extra)
        with measure:  # its engines stop here, on an error or Ctrl-C too
            if s.alternatives:
                s, table, kept = pick_measured(scan, s, measure, key, judge)
            if rounds:
                r = refine(scan, s, measure, key, rounds=rounds, judge_chunks=judge, step=step)
    for what, quoted, k in table:
        console.print(f"proposal of {what}: quoted {quoted:.5f}, measured {kld_columns(k)} "
                      f"on the judge text's {max(judge, scan.chunks)}×{scan.ctx} tokens")
    if table:
        console.print(f"kept: {table[kept][0]}")
    if r is None:
        return s
    for line in summary(r):
        console.print(line)
    console.print(f"refined: measured KLD {r.start.kld:.5f} → {r.kld.kld:.5f} ± {r.kld.kld_error:.5f} on "
                  f"{r.chunks}×{scan.ctx} tokens")
    return refined_solution(s, scan, r)


@optimize_group.command(name="weights")
@click.argument("scan_spec", metavar="SCAN")
@click.option("--size-mb", type=float, default=None, help="Budget: the whole file's size in MB (1e6 bytes).")
@click.option("--bpw", type=float, default=None,
              help="Budget: tensor bits per weight, as llama.cpp and `lacq inspect` count them (tensor bytes × 8 / "
                   "weights).")
@click.option("--types", default=None, help="Only these scanned types (comma-separated).")
@click.option("--name", default=None, help="Recipe name (default: opt_<size>mb).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Recipe TOML to write (default: <name>.toml here).")
@click.option("--tensor-type-file", "ttf", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the plain --tensor-type-file for stock llama-quantize.")
@click.option("--verify", is_flag=True,
              help="Measure the search's distinct proposals (the best measured is kept), then quantize with the "
                   "recipe and measure its KLD on the judge text (--judge-chunks).")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Importance matrix the measured files (--verify, --refine) are quantized with: the scan's own, "
                   "where its candidates were made with one.")
@_refine_options
@click.option("--model", "model_spec", default=None, help="Check that the scan was made on this model.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@build_options
@click.pass_context
@handle_errors
def optimize_weights_cmd(ctx, scan_spec, size_mb, bpw, types, name, out, ttf, verify, refine_rounds, judge_chunks,
                         workers, threads, model_spec, force, strict, no_engine, imatrix, build: BuildChoice):
    """Least predicted KLD within a size budget: one candidate type per scanned unit."""
    from lacq.model.info import inspect_model
    from lacq.studies.optimize import bpw_budget, optimize
    from lacq.studies.optimize_out import check_outputs, tensor_type_file, weights_recipe_toml, write_outputs
    scan = _load_scan(ctx, scan_spec)
    _check_model(ctx, scan, model_spec)
    if scan.kind != "weights":
        raise LacqError(f"{scan_spec} is a {scan.kind} scan; use `lacq optimize {scan.kind}`")
    if (size_mb is None) == (bpw is None):
        raise LacqError("give exactly one budget: --size-mb or --bpw")
    measuring = verify or refine_rounds > 0
    tools = _preflight(ctx, build, scan, measuring, strict, (out, ttf), force, imatrix)
    budget = size_mb * 1e6 if size_mb is not None else bpw_budget(scan, bpw)
    s = optimize(scan, budget, types=comma_list(types) if types else None)
    _report_solution(s, scan)
    s = _measured(ctx, tools, scan, s, verify, refine_rounds, workers, threads, judge_chunks, imatrix=imatrix,
                  engine=not no_engine)
    name = name or f"opt_{s.size_mb:.1f}mb".replace(".", "_")
    base = Path(scan.base["path"]) if scan.base.get("path") else None
    text = weights_recipe_toml(s, scan, name, model=inspect_model(base) if base and base.exists() else None)
    out = out or Path(f"{name}.toml")
    t = tensor_type_file(s, scan) if ttf else None
    files = {out: text, **({ttf: t.text} if t else {})}
    check_outputs(files, force=force)  # the default name is known only now
    measured = None
    if verify:  # measured before anything is written: a failure leaves no recipe behind
        from lacq.studies.verify import verify_weights
        with _staged(out, text) as staged:
            measured = verify_weights(tools, open_results(ctx), scan, s, staged, judge_text(), label=name,
                                      study=f"optimize:{scan.provenance.get('study')}", imatrix=imatrix,
                                      judge_chunks=judge_chunks)
    write_outputs(files, force=force)
    console.print(f"wrote {out}")
    if t:
        console.print(f"wrote {ttf} (llama-quantize --tensor-type-file {ttf} BASE.gguf OUT.gguf {t.ftype})")
    if measured:
        rid, _, path = measured
        console.print(f"measured {_judged(ctx, rid)} ({_judgements(s, scan)}); "
                      f"{path}; result #{rid}")


@optimize_group.command(name="kv")
@click.argument("scan_spec", metavar="SCAN")
@click.option("--bits", type=float, required=True, help="Budget: mean bits/value of the scanned cache.")
@click.option("--types", default=None, help="Only these scanned types (comma-separated).")
@click.option("--name", default=None, help="Policy name (default: opt_<bits>bpv).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="KV policy TOML to write (default: <name>.toml here).")
@click.option("--verify", is_flag=True,
              help="Measure the search's distinct proposals (the best measured is kept), then run the policy "
                   "and measure its KLD on the judge text (--judge-chunks).")
@_refine_options
@click.option("--model", "model_spec", default=None, help="Check that the scan was made on this model.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@build_options
@click.pass_context
@handle_errors
def optimize_kv_cmd(ctx, scan_spec, bits, types, name, out, verify, refine_rounds, judge_chunks, workers, threads,
                    model_spec, force, strict, no_engine, build: BuildChoice):
    """Least predicted KLD within a bits/value budget: one candidate type per KV layer."""
    from lacq.studies.optimize import optimize
    from lacq.studies.optimize_out import check_outputs, kv_policy_toml, write_outputs
    scan = _load_scan(ctx, scan_spec)
    _check_model(ctx, scan, model_spec)
    if scan.kind != "kv":
        raise LacqError(f"{scan_spec} is a {scan.kind} scan; use `lacq optimize {scan.kind}`")
    measuring = verify or refine_rounds > 0
    tools = _preflight(ctx, build, scan, measuring, strict, (out,), force)
    s = optimize(scan, bits, types=comma_list(types) if types else None)
    _report_solution(s, scan)
    s = _measured(ctx, tools, scan, s, verify, refine_rounds, workers, threads, judge_chunks, engine=not no_engine)
    name = name or f"opt_{s.bits_per_value:.2f}bpv".replace(".", "_")
    out = out or Path(f"{name}.toml")
    text = kv_policy_toml(s, scan, name)
    check_outputs([out], force=force)  # the default name is known only now
    rid = None
    if verify:  # measured before anything is written: a failure leaves no policy behind
        from lacq.studies.verify import verify_kv
        with _staged(out, text) as staged:
            rid, _ = verify_kv(tools, open_results(ctx), scan, s, staged, judge_text(), label=name,
                               study=f"optimize:{scan.provenance.get('study')}", judge_chunks=judge_chunks)
    write_outputs({out: text}, force=force)
    console.print(f"wrote {out}")
    if rid is not None:
        console.print(f"measured {_judged(ctx, rid)} ({_judgements(s, scan)}); "
                      f"result #{rid}")
