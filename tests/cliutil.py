"""Driving lacq's CLI in tests: run a command in process, and check that bad input ended cleanly."""

from __future__ import annotations

from click.testing import CliRunner, Result

from lacq.cli import cli


def run_cli(*args) -> Result:
    return CliRunner().invoke(cli, list(map(str, args)))


def assert_clean_error(result: Result, *needles: str) -> None:
    """A non-zero exit with a message, no traceback, and each needle in the output."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for needle in needles:
        assert needle in result.output, result.output
