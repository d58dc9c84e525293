"""lacq's command line: the click group and `main`. Commands live in one module per area
(build, model, quantize, measure, report, study) and register themselves on `cli` when imported."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from lacq import __version__


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


def main() -> None:
    from lacq.cli.common import install_signal_handlers
    from lacq.errors import Terminated
    install_signal_handlers()
    try:
        cli(prog_name="lacq")
    except Terminated as exc:  # arrived outside a command's error handling (parsing, start-up)
        sys.exit(128 + exc.signum)


from lacq.cli import build, measure, model, parity, quantize, report, study, sweep  # noqa: E402,F401  (register the commands)
