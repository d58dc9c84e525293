"""`lacq report`: the comparison table of stored results."""

from __future__ import annotations

import click

from lacq.cli import cli
from lacq.cli.common import console, format_option, handle_errors, message_console, open_results
from lacq.errors import LacqError


@cli.command(name="report")
@click.option("--study", default=None, help="Only results of this study (default: the latest study).")
@click.option("--base", "base_label", default=None, help="Configuration the deltas are against.")
@format_option()
@click.option("--list-studies", is_flag=True, help="List the studies in the database.")
@click.pass_context
@handle_errors
def report_cmd(ctx, study, base_label, fmt, list_studies):
    """Comparison table of stored results: PPL, and KLD and NIAH where the study has them."""
    from lacq.results.render import render
    from lacq.results.tables import combined_frame, machine_lines
    store = open_results(ctx)
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
    notes = message_console(fmt)
    for line in machine_lines(rows):
        notes.print(line, markup=False, highlight=False, soft_wrap=True)
    _sweep_progress(store, study, notes)


def _sweep_progress(store, study: str | None, out) -> None:
    """A sweep study's progress under its table: runs stored of runs planned, and which are missing."""
    from lacq.studies.sweep import progress_of
    state = progress_of(store, study) if study else None
    if state is None:
        return
    stored, planned, missing = state
    out.print(f"sweep {study}: {stored} of {planned} runs stored" + (
        f"; missing: {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''} "
        "(run the same `lacq sweep` command to finish)" if missing else "; complete"), markup=False, highlight=False,
        soft_wrap=True)
