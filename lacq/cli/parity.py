"""`lacq parity` (the backend parity suite on one backend) and `lacq compare` (parity documents
side by side, non-zero exit where backends disagree)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

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
from lacq.errors import LacqError
from lacq.llama.build import BuildSpec
from lacq.llama.build import build as run_build
from lacq.llama.tools.backend_ops import CHECK_TARGETS

# `lacq compare`'s exit status when the documents disagree or compared nothing, apart from bad
# input (1, or click's 2 for usage), so that CI can tell a parity failure from a broken step.
EXIT_DISAGREE = 3


@cli.command(name="parity")
@build_options
@click.option("--model", "model_spec", default=None, help="GGUF path or hf://OWNER/REPO/FILE (default: SmolLM2-135M).")
@click.option("--base-logits", type=click.Path(path_type=Path), default=None,
              help="The reference: f16-cache base logits of the model, made on the CPU (the path a CPU parity "
                   "document names). Default: made here with the CPU build (built if missing).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the parity document here (JSON). Default: print it.")
@click.option("--chunks", type=int, default=None, help="Chunks of 512 tokens (default 10; with --base-logits, the file's).")
@click.option("--no-backend-ops", is_flag=True, help="Skip test-backend-ops (counts recorded as not run).")
@click.option("-t", "--threads", type=int, default=None)
@click.option("-ngl", "--n-gpu-layers", "ngl", type=int, default=None, help="GPU layers (default: all on cuda/metal).")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.pass_context
@handle_errors
def parity_cmd(ctx, build: BuildChoice, model_spec, base_logits, out, chunks, no_backend_ops, threads, ngl, force):
    """The backend parity suite on one backend: PPL, KLD and same-top-p of a fixed set of KV
    configurations against one f16 reference made on the CPU, plus test-backend-ops counts for
    SET_ROWS, GET_ROWS, CPY and FLASH_ATTN_EXT; one JSON document for `lacq compare`."""
    from lacq import paths
    from lacq.fsutil import write_text_atomic
    from lacq.model.resolve import resolve_model
    from lacq.studies.parity import DEFAULT_CHUNKS, run_parity
    if out is not None and out.exists() and not force:
        raise LacqError(f"{out} exists; pass --force to replace it")
    if base_logits is not None and not base_logits.is_file():
        raise LacqError(f"base logits file {base_logits} does not exist; make it with `lacq parity --backend cpu` "
                        "(its document names the file) and copy it here")
    if base_logits is not None and chunks is not None:
        raise LacqError("--chunks comes from the --base-logits file; give one or the other")
    if chunks is not None and chunks < 1:
        raise LacqError(f"--chunks must be at least 1, got {chunks}")
    backend, source = build.backend, build.source
    if ngl is None and backend != "cpu":
        ngl = 99
    store = open_results(ctx)
    with progress_bar() as progress:
        step = stage_stepper(progress)

        targets = () if no_backend_ops else CHECK_TARGETS
        built = run_build(BuildSpec(backend=backend, extra_targets=targets), source,
                          progress=lambda f, d: step(f"build {backend}", f, d))
        reference = None
        if base_logits is None:
            reference = built if backend == "cpu" and not targets else run_build(
                BuildSpec(backend="cpu"), source, progress=lambda f, d: step("build cpu (reference)", f, d))
        model = resolve_model(model_spec)
        doc = run_parity(built, store, model, paths.default_corpus(), chunks=chunks or DEFAULT_CHUNKS,
                         logits=base_logits, reference_build=reference, threads=threads, ngl=ngl,
                         backend_ops_run=not no_backend_ops, argv=["lacq", *sys.argv[1:]], step=step)
    text = json.dumps(doc, indent=1) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        write_text_atomic(out, text)
    _print_summary(doc, out)


def _print_summary(doc: dict, out: Path | None) -> None:
    table = Table(title=f"parity v{doc['suite_version']} on {doc['backend']} ({doc['device']})")
    for col in ("configuration", "PPL", "KLD", "same top p %", "status"):
        table.add_column(col)
    for c in doc["configs"]:
        if c["status"] == "ok":
            table.add_row(c["name"], f"{c['ppl']:.4f} ± {c['ppl_error']:.4f}", f"{c['kld']:.6f}",
                          f"{c['same_top_p_pct']:.3f}", "ok")
        else:
            table.add_row(c["name"], "", "", "", f"{c['status']}: {c['reason'].splitlines()[0]}")
    err_console.print(table)
    ops = doc["backend_ops"]
    if ops.get("status") == "ran":
        for op, c in ops["ops"].items():
            err_console.print(f"  {op}: {c['passed']}/{c['ran']} passed, {c['skipped']} not supported "
                              f"(turbo {c['turbo passed']}/{c['turbo ran']}, {c['turbo skipped']} not supported)")
        if kvb := ops.get("kv_bytes"):
            err_console.print(f"  test-kv-bytes: {kvb['differ']} of {kvb['blocks']} blocks differ from the reference "
                              f"({kvb['cases']} cases over {', '.join(kvb['types'])}; "
                              f"{kvb['unsupported']} not supported)")
    ref = doc["reference"]
    err_console.print(f"reference: {ref['path']} (sha256 {ref['sha256'][:16]}…); give it to other backends "
                      "with --base-logits", soft_wrap=True)
    if out is not None:
        err_console.print(f"wrote {out}")


_COMPARE_HELP = """Compare parity documents (or stored studies) side by side.

Each SOURCE is a JSON file from `lacq parity`, or `db:STUDY` (a study in the results database:
its parity document, or its KLD/PPL rows by label). The first is the baseline; every other one is
compared with it, configuration by configuration.

Exit status 3 when the documents disagree: a configuration run on both sides differs beyond
tolerance, the test-backend-ops counts of turbo cases that ran or passed differ (whole-op counts are
shown but not gated: backends support different stock types by design), a case or a configuration
failed, the documents used different base logits, or measured different models, contexts or chunk
counts (a stored study's come from its rows). Also 3 when the comparison is partial: a
configuration ran on one side only (unsupported or absent on the other), or test-backend-ops ran on
one side only; --allow-partial accepts those as notes (Metal cannot run every configuration by
design). A document that shares no measured configuration with the first compared nothing: exit 3
even with --allow-partial. Exit 1 for bad input (a missing file, not a parity document, different
suite versions, a bad tolerance), 2 for a usage error, 0 when everything compared agrees.

Tolerances: a number is absolute, a percentage relative, both (comma-separated) pass when either
holds. Defaults: PPL 0.5% relative (CPU and CUDA differed by at most 0.31% on the README's 40-chunk
SmolLM2 runs with quantized caches); KLD 0.002 absolute or 5% relative (the absolute part because
KLD near zero, as with an f16 cache, has no useful relative scale; not yet calibrated on a GPU)."""


@cli.command(name="compare", help=_COMPARE_HELP)
@click.argument("sources", nargs=-1, required=True)
@click.option("--tolerance-ppl", default="0.5%", show_default=True, help="Allowed PPL difference.")
@click.option("--tolerance-kld", default="0.002,5%", show_default=True, help="Allowed mean-KLD difference.")
@click.option("--format", "fmt", type=click.Choice(["table", "md"]), default="table", show_default=True,
              help="md: a markdown table (for a CI job summary).")
@click.option("--allow-partial", is_flag=True,
              help="Accept configurations or test-backend-ops run on one side only (shown as notes).")
@click.pass_context
@handle_errors
def compare_cmd(ctx, sources, tolerance_ppl, tolerance_kld, fmt, allow_partial):
    from lacq.studies.compare import compare, load_document, parse_tolerance
    tol_ppl = parse_tolerance(tolerance_ppl, "--tolerance-ppl")
    tol_kld = parse_tolerance(tolerance_kld, "--tolerance-kld")
    if len(sources) < 2:
        raise LacqError("give at least two documents to compare")
    store = None if all(Path(s).is_file() for s in sources) else open_results(ctx)
    docs = [load_document(s, store) for s in sources]
    result = compare(docs, tol_ppl, tol_kld, allow_partial=allow_partial)
    header, lines = _compare_rows(result)
    ops_header, ops_lines = _ops_rows(result)
    if fmt == "md":
        out = ["### lacq compare: " + " vs ".join(result.names), ""]
        out += _md(header, lines)
        if ops_lines:
            out += ["", "#### test-backend-ops (a case not supported on a device is not a pass)", ""]
            out += _md(ops_header, ops_lines)
        out += ["", f"Tolerances: PPL {tol_ppl.describe()}, KLD {tol_kld.describe()}.", ""]
        out += [f"- {n}" for n in result.notes]
        out += [f"- **{p}**" for p in result.problems] or ["- every configuration agrees within tolerance"]
        click.echo("\n".join(out))
    else:
        table = Table(title="lacq compare: " + " vs ".join(result.names))
        for col in header:
            table.add_column(col)
        for line in lines:
            table.add_row(*line)
        console.print(table)
        if ops_lines:
            ops = Table(title="test-backend-ops (a case not supported on a device is not a pass)")
            for col in ops_header:
                ops.add_column(col)
            for line in ops_lines:
                ops.add_row(*line)
            console.print(ops)
        console.print(f"tolerances: PPL {tol_ppl.describe()}, KLD {tol_kld.describe()}")
        for n in result.notes:
            console.print(f"note: {escape(n)}", soft_wrap=True)
        for p in result.problems:
            console.print(f"[red]problem[/red]: {escape(p)}", soft_wrap=True)
    if result.problems:
        sys.exit(EXIT_DISAGREE)


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _compare_rows(result) -> tuple[list[str], list[list[str]]]:
    header = ["configuration"]
    for i, n in enumerate(result.names):
        header += [f"PPL {n}", f"KLD {n}", f"same top p % {n}"]
        if i:
            header += [f"ΔPPL % {n}", f"ΔKLD {n}"]
    header.append("verdict")
    lines = []
    for row in result.rows:
        line = [row["config"]]
        for i, c in enumerate(row["values"]):
            if c and c.get("status") == "ok":
                line += [_num(c.get("ppl"), ".4f"), _num(c.get("kld"), ".6f"), _num(c.get("same_top_p_pct"), ".3f")]
            else:
                line += [c.get("status", "?") if c else "absent", "", ""]
            if i:
                d = row["diffs"][i - 1]
                line += [_num(d.get("ppl_pct"), "+.3f"), _num(d.get("kld"), "+.6f")]
        line.append(row["verdict"])
        lines.append(line)
    return header, lines


def _ops_rows(result) -> tuple[list[str], list[list[str]]]:
    if not result.ops_rows:
        return [], []
    names = list(result.ops_rows[0]["counts"])
    header = ["op", *(f"passed/ran (not supported) {n}" for n in names),
          *(f"turbo passed/ran {n}" for n in names), "verdict"]
    lines = []
    for row in result.ops_rows:
        cs = [row["counts"][n] for n in names]
        lines.append([row["op"], *(f"{c.get('passed', 0)}/{c.get('ran', 0)} ({c.get('skipped', 0)})" for c in cs),
                      *(f"{c.get('turbo passed', 0)}/{c.get('turbo ran', 0)}" for c in cs), row["verdict"]])
    return header, lines


def _md(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(line) + " |" for line in lines]
