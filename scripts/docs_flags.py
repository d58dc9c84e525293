#!/usr/bin/env python3
"""Regenerate the "Flags" blocks in docs/*.md from `lacq CMD --help`, so each command's flags are
written once, by the command itself.

A block sits between two markers; everything between them is replaced:

    <!-- flags: lacq scan weights -->
    ...
    <!-- /flags -->

    python3 scripts/docs_flags.py            # rewrite stale blocks in place
    python3 scripts/docs_flags.py --check    # exit 1 naming the stale blocks (tests/test_docs_flags.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from lacq.cli import cli

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BLOCK = re.compile(r"(<!-- flags: (?P<cmd>lacq(?: [a-z]+)*) -->\n)(?P<body>.*?)(<!-- /flags -->)", re.DOTALL)
WIDTH = 80  # click's own cap on help width: the text is the same in any terminal


def help_text(command: str) -> str:
    """`COMMAND --help` (`lacq scan weights --help`) as a fixed-width terminal would show it."""
    args = [*command.split()[1:], "--help"]
    result = CliRunner().invoke(cli, args, prog_name="lacq", terminal_width=WIDTH)
    if result.exit_code != 0:
        raise SystemExit(f"lacq {command} --help failed: {result.output.strip()}")
    return result.output


def block(command: str) -> str:
    return f"```text\n$ {command} --help\n{help_text(command).rstrip()}\n```\n"


def leaf_commands(group: click.Group = cli, prefix: str = "lacq ") -> list[str]:
    """Every runnable command (`lacq scan weights`), and `lacq` itself for the global options."""
    names = [prefix.strip()] if group is cli else []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            names += leaf_commands(command, path + " ")
        else:
            names.append(path)
    return names


def blocks(docs: Path = DOCS) -> dict[str, list[Path]]:
    """Command -> the pages that hold a flags block for it."""
    found: dict[str, list[Path]] = {}
    for page in sorted(docs.glob("*.md")):
        for match in BLOCK.finditer(page.read_text()):
            found.setdefault(match["cmd"], []).append(page)
    return found


def refresh(page: Path, write: bool) -> list[str]:
    """The commands whose block in PAGE differs from their --help; rewritten when WRITE."""
    text = page.read_text()
    stale = [m["cmd"] for m in BLOCK.finditer(text) if m["body"] != block(m["cmd"])]
    if stale and write:
        page.write_text(BLOCK.sub(lambda m: m[1] + block(m["cmd"]) + m[4], text))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale = {page: cmds for page in sorted(DOCS.glob("*.md")) if (cmds := refresh(page, write=not args.check))}
    for page, cmds in stale.items():
        verb = "stale" if args.check else "rewritten"
        print(f"{page.relative_to(REPO)}: {verb}: " + ", ".join(cmds), file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
