"""The documentation stays true: every command's flags block in docs/ equals its --help (once per command),
the README's commands are the ones CI runs, and the README stays a short front door."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _docs_flags():
    spec = importlib.util.spec_from_file_location("docs_flags", REPO / "scripts" / "docs_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_flags_block_equals_the_commands_help():
    docs_flags = _docs_flags()
    stale = {page.name: docs_flags.refresh(page, write=False) for page in sorted(docs_flags.DOCS.glob("*.md"))}
    assert not any(stale.values()), f"run python3 scripts/docs_flags.py: stale blocks {stale}"


def test_each_command_has_its_flags_block_exactly_once():
    docs_flags = _docs_flags()
    where = docs_flags.blocks()
    assert {cmd: len(pages) for cmd, pages in where.items() if len(pages) > 1} == {}
    assert sorted(where) == sorted(docs_flags.leaf_commands())


def test_a_stale_block_is_found_and_rewritten(tmp_path, monkeypatch):
    docs_flags = _docs_flags()
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- flags: lacq report -->\nold text\n<!-- /flags -->\nafter\n")
    assert docs_flags.refresh(page, write=False) == ["lacq report"]
    assert "old text" in page.read_text()
    assert docs_flags.refresh(page, write=True) == ["lacq report"]
    text = page.read_text()
    assert text.startswith("intro\n<!-- flags: lacq report -->\n```text\n$ lacq report --help\nUsage: lacq report")
    assert text.endswith("```\n<!-- /flags -->\nafter\n") and "--list-studies" in text
    assert docs_flags.refresh(page, write=False) == []


def test_readme_holds_the_install_and_demo_command_and_the_command_ci_runs():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.DOTALL)
    assert ci_command in blocks
    assert "python3 -m pip install -e . && lacq demo" in blocks


def test_readme_is_a_front_door_and_its_links_resolve():
    lines = README.splitlines()
    assert len(lines) <= 160
    assert max(len(line) for line in lines if line.startswith("|")) <= 240  # a table cell is a line or two
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", README):
        assert (REPO / target).is_file(), target
