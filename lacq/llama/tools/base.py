"""Running a llama.cpp tool: argv in, full log kept, clean failures out."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from lacq.errors import ToolError

log = logging.getLogger(__name__)

# common's logger prefixes lines with an optional timestamp and a level letter
# ("0.05.232 I ", "I "); parsers strip it so they read the message alone.
_PREFIX = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+ )?(?:[IWEDT] )?")

LineHook = Callable[[str], None]

# Tools running now, so a study running several at once on threads can stop them all.
_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()


def terminate_running() -> None:
    """Stop every tool `run_tool` has running (Ctrl-C on a thread pool reaches the main thread only)."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        stop_group(proc)


# Tying a tool's life to the process that runs it (Linux): PR_SET_PDEATHSIG asks the kernel to
# SIGKILL the tool when its parent dies, however it dies (SIGKILL, out of memory), which no handler
# in lacq can do. The kernel means the parent *thread*: the thread that forks the tool. That is
# safe here because the thread that starts a tool (run_tool, run_captured) blocks until the tool
# exits, so it cannot end first unless the whole process does. Elsewhere (macOS) the tool is
# stopped on every exit lacq handles (exceptions, Ctrl-C, SIGTERM/SIGHUP), not on SIGKILL.
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent thread exits (Linux; a no-op
    elsewhere). `parent`: the pid the caller expects as parent; if it is gone already (it died
    before this call), the signal is raised at once, since the kernel would never send it."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _tool_preexec():
    """The `preexec_fn` of a tool: die with the thread that starts it. It runs in the forked child
    before exec and calls only prctl and getppid (nothing that could wait on a lock held by another
    of the parent's threads); None where there is no prctl (then subprocess may also use vfork)."""
    if _prctl is None:
        return None
    parent = os.getpid()
    return lambda: die_with_parent(signal.SIGKILL, parent)


def strip_prefix(line: str) -> str:
    return _PREFIX.sub("", line, count=1)


def message_lines(text: str) -> list[str]:
    return [strip_prefix(line) for line in text.splitlines()]


_ERROR_LINE = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+ )?E ")
# "Final estimate: PPL = 27.8018 +/- 0.61" (llama-perplexity and llama-imatrix alike)
FINAL_PPL = re.compile(r"Final estimate: PPL = ([\d.]+|nan|inf) \+/- ([\d.]+|nan|inf)")


def error_lines(text: str) -> list[str]:
    """A tool's error-level log lines, without the log prefix."""
    return [strip_prefix(line) for line in text.splitlines() if _ERROR_LINE.match(line)]


@dataclass(frozen=True)
class ToolRun:
    argv: tuple[str, ...]
    returncode: int
    output: str  # stdout and stderr interleaved, as a person would see them
    seconds: float
    log_path: Path | None


_SYSTEM_INFO = re.compile(r"system_info: (.*)$", re.M)


def system_info(text: str) -> dict[str, list[str]] | None:
    """The features each ggml backend reports on the tools' `system_info:` line:
    "... | CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | ..." -> {"CPU": ["SSE3", "AVX2"]}."""
    m = _SYSTEM_INFO.search(text)
    if not m:
        return None
    out: dict[str, list[str]] = {}
    backend = None
    for part in m.group(1).split("|"):
        if " : " in part:
            backend, part = (p.strip() for p in part.split(" : ", 1))
            out.setdefault(backend, [])
        name, sep, value = part.partition("=")
        if backend and sep and value.strip() not in ("0", ""):
            out[backend].append(name.strip() if value.strip() == "1" else f"{name.strip()}={value.strip()}")
    return out


def thread_gpu_args(threads: int | None, ngl: int | None) -> list[str]:
    """The -t / -ngl arguments every llama.cpp tool lacq runs takes the same way."""
    args = ["-t", str(threads)] if threads else []
    return args + (["-ngl", str(ngl)] if ngl is not None else [])


def tail(text: str, n: int = 15) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    return "\n".join(lines[-n:])


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a tool started in its own session and its whole process group (worker threads,
    children): SIGTERM, then SIGKILL after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except ProcessLookupError:
        proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_captured(argv: list[str], *, env: Mapping[str, str]) -> tuple[str, str, int]:
    """Run argv with stdin closed and return (stdout, stderr, exit status), for tools whose
    stdout and stderr are read apart (llama-completion). Like `run_tool`, the tool gets its own
    session, Ctrl-C, SIGTERM or SIGHUP of lacq stops its process group before unwinding, and it
    dies with the process that runs it."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=dict(env), start_new_session=True,
                                preexec_fn=_tool_preexec())  # noqa: PLW1509 (see _tool_preexec)
    except OSError as exc:
        raise ToolError(f"could not start {Path(argv[0]).name}: {exc}") from None
    with _running_lock:
        _running.add(proc)
    try:
        out, err = proc.communicate()
    except BaseException:
        stop_group(proc)
        raise
    finally:
        with _running_lock:
            _running.discard(proc)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), proc.returncode


def run_tool(argv: list[str], *, env: Mapping[str, str] | None = None, log_path: Path | None = None,
             on_line: LineHook | None = None, what: str | None = None) -> ToolRun:
    """Run argv to completion, streaming lines to `on_line` and `log_path`.

    A non-zero exit raises ToolError with the last lines of the log. Ctrl-C
    stops the child before KeyboardInterrupt propagates, so callers' cleanup
    (temporary outputs) runs with no orphan still writing; a process killed
    outright takes the tool with it (`die_with_parent`).
    """
    name = what or Path(argv[0]).name
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    log.debug("running %s", " ".join(argv))
    t0 = time.monotonic()
    lines: list[str] = []
    logf = open(log_path, "w") if log_path else None
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=full_env, start_new_session=True,
                                preexec_fn=_tool_preexec())  # noqa: PLW1509 (see _tool_preexec)
    except OSError as exc:
        if logf:
            logf.close()
        raise ToolError(f"could not start {name}: {exc}") from None
    with _running_lock:
        _running.add(proc)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if logf:
                logf.write(line)
            if on_line:
                on_line(line.rstrip("\n"))
        rc = proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    finally:
        with _running_lock:
            _running.discard(proc)
        if logf:
            logf.close()
    output = "".join(lines)
    seconds = time.monotonic() - t0
    if rc != 0:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        where = f" (full log: {log_path})" if log_path else ""
        if not output.strip():
            # Seen with llama.cpp's asynchronous logger: a tool that fails early can
            # exit before its log thread writes anything (2 runs in 12 here).
            how += " and printed nothing"
        raise ToolError(f"{name} {how}{where}", log_tail=tail(output))
    return ToolRun(tuple(argv), rc, output, seconds, log_path)
