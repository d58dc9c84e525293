"""The package layout ARCHITECTURE.md describes: who may import whom, no cycles, a purpose line per module."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

LACQ = Path(__file__).resolve().parent.parent / "lacq"
FOUNDATION = {"lacq", "lacq.errors", "lacq.paths", "lacq.fsutil", "lacq.cache", "lacq.corpus"}
# stage -> the stages it may import (besides the foundation and itself); ARCHITECTURE.md's table
ALLOWED = {
    "llama": set(),
    "model": set(),
    "plan": {"model"},
    "results": set(),
    "quantize": {"llama", "model", "plan", "results"},
    "measure": {"llama", "model", "plan", "results"},
    "studies": {"llama", "model", "plan", "results", "quantize", "measure"},
    "cli": {"llama", "model", "plan", "results", "quantize", "measure", "studies"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in LACQ.rglob("*.py"):
        parts = path.relative_to(LACQ.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lacq"):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lacq"))
    return found


def _stage(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module == "lacq.__main__":
        return "cli"
    return module.split(".")[1]


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_and_says_what_it_is_for(module):
    if module == "lacq.__main__":  # importing it runs the CLI
        return
    mod = importlib.import_module(module)
    assert mod.__doc__ and mod.__doc__.strip(), f"{module} has no docstring"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_flow(module):
    stage = _stage(module)
    allowed = FOUNDATION | {m for m in MODULES if _stage(m) == stage or _stage(m) in ALLOWED.get(stage, set())}
    if stage == "foundation":
        allowed = FOUNDATION
    for imported in _imports(MODULES[module], top_level_only=False):
        target = next((m for m in sorted(MODULES, key=len, reverse=True)
                       if imported == m or imported.startswith(m + ".")), None)
        assert target is not None, f"{module} imports {imported}, which does not exist"
        assert target in allowed or stage == "cli", f"{module} ({stage}) may not import {target}"


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for imported in _imports(path, top_level_only=False):
            target = next((t for t in sorted(MODULES, key=len, reverse=True)
                           if imported == t or imported.startswith(t + ".")), None)
            if target and target != m and not (target == "lacq.cli" and m.startswith("lacq.cli.")) \
                    and not (m == "lacq.cli" and target.startswith("lacq.cli.")):
                graph[m].add(target)
    # the command modules register on lacq.cli's group, which imports them at the end: that pair is the
    # one intended back-edge and is left out above
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
