"""Processes seen through /proc (Linux), for tests that check no tool outlives what started it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat(pid_dir: Path) -> tuple[str, str, int] | None:
    """(command name, state, parent pid) of one /proc entry, or None if it exited while we looked."""
    try:
        text = (pid_dir / "stat").read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, rest[0], int(rest[1])


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid` (children, their children, ...): pid -> command name."""
    table = {int(d.name): s for d in Path("/proc").glob("[0-9]*") if (s := _stat(d)) is not None}
    out, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for p, (name, state, ppid) in table.items():
            if ppid == parent and p not in out and state != "Z":
                out[p] = name
                frontier.append(p)
    return out


def alive(pid: int) -> bool:
    s = _stat(Path(f"/proc/{pid}"))
    return s is not None and s[1] != "Z"


def gone_within(pids, seconds: float) -> bool:
    """True once none of `pids` is alive, polling up to `seconds` (a death signal is delivered at once,
    but the process takes a moment to exit)."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_survivors(pids) -> None:
    """SIGKILL whichever of `pids` still runs (a survivor is the bug under test: it must not run on)."""
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
