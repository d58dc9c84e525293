"""What every command shares: consoles, progress bars, error handling and option groups.

An option group adds a few click options and hands the command one value built
from them: `kv_options` a `KvConfig`, `run_options` a `RunOptions`,
`build_options` a `BuildChoice`. Commands stay short and their bad input fails
through one path: a `LacqError` becomes a one-paragraph message and exit 1,
Ctrl-C a note and exit 130, SIGTERM/SIGHUP a note and exit 128 + the signal.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lacq.errors import LacqError, Terminated
from lacq.llama.build import BACKENDS, Build, BuildSpec, require_build
from lacq.plan.kv.flags import kv_from_flags

# Tables are wide: when output is not a terminal (a pipe, a log file, CI), do not
# squeeze them into rich's default 80 columns.
console = Console() if Console().is_terminal else Console(width=160)
err_console = Console(stderr=True)


class PlainProgress:
    """`progress_bar()`'s interface for logs: plain lines, no redrawing. One line when a stage
    starts and one when it finishes; in between at most one line every `every` seconds."""

    def __init__(self, console: Console, every: float = 30.0, clock=time.monotonic):
        self.console, self.every, self.clock = console, every, clock
        self.t0 = self.last = clock()
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = 1.0, detail: str = "", **_) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = {"description": description, "total": total or 1.0, "completed": 0.0,
                               "detail": detail, "done": False}
        self._line(task_id)
        return task_id

    def update(self, task_id: int, completed: float | None = None, detail: str | None = None, **_) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task["completed"] = completed
        if detail is not None:
            task["detail"] = detail
        finished = task["completed"] >= task["total"] and not task["done"]
        if finished:
            task["done"] = True
        if finished or self.clock() - self.last >= self.every:
            self._line(task_id)

    def advance(self, task_id: int, advance: float = 1.0) -> None:
        self.update(task_id, completed=self.tasks[task_id]["completed"] + advance)

    def _line(self, task_id: int) -> None:
        task = self.tasks[task_id]
        now = self.last = self.clock()
        pct = 100 * task["completed"] / task["total"]
        text = f"[{now - self.t0:5.0f} s] {task['description']}: {pct:.0f}%"
        if task["detail"]:
            text += f" {task['detail']}"
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def stage_stepper(progress):
    """A `step(stage, fraction, detail)` callback that gives each stage its own task on `progress`."""
    tasks: dict[str, int] = {}

    def step(stage: str, frac: float, detail: str) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=1.0, detail="")
        progress.update(tasks[stage], completed=frac, detail=detail)

    return step


def progress_bar() -> Progress | PlainProgress:
    """A rich progress bar on a terminal; plain lines where stderr is a log file or a pipe."""
    if not err_console.is_terminal:
        return PlainProgress(err_console)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=err_console, transient=False)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum, frame):
    # Once: a second SIGTERM/SIGHUP must not cut short the cleanup the first one started
    # (stopping the tool's process group takes at most a few seconds; SIGKILL still works).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP stop lacq as Ctrl-C does: the running tool's process group is
    terminated, temporary outputs removed, nothing stored.

    A signal that was ignored when lacq started stays ignored, as is the Unix convention
    (`nohup` ignores SIGHUP; a shell starts background jobs with SIGINT ignored so that the
    terminal's Ctrl-C does not reach them). Python already keeps an inherited ignored SIGINT
    ignored, so such a lacq is not interrupted by SIGINT either; its tools inherit the same
    dispositions.
    """
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise_terminated)


@contextlib.contextmanager
def user_errors():
    """lacq's errors as a short message and exit 1; Ctrl-C as a note and exit 130;
    SIGTERM/SIGHUP as a note and exit 128 + the signal number (143, 129)."""
    try:
        yield
    except LacqError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]: stopped; no partial output was kept")
        sys.exit(130)
    except Terminated as exc:
        err_console.print(f"[red]terminated[/red] by {signal.Signals(exc.signum).name}: stopped; "
                          "no partial output was kept")
        sys.exit(128 + exc.signum)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with user_errors():
            return fn(*args, **kwargs)

    return wrapper


def _group(options: list, build):
    """An option group: `options` are added to the command; `build(**their values)` returns
    (parameter name, value), and the command receives that one value instead."""
    names = [p.name for opt in options for p in _params_of(opt)]

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            with user_errors():
                key, value = build(**values)
            kwargs[key] = value
            return fn(*args, **kwargs)

        for opt in reversed(options):
            wrapper = opt(wrapper)
        return wrapper

    return decorate


def _params_of(option_decorator) -> list[click.Parameter]:
    """The click parameters one option decorator declares (applied to a throwaway function)."""
    def f():
        pass

    option_decorator(f)
    return f.__click_params__


# ---------------------------------------------------------------- KV configuration
def _kv(ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy):
    return "kv", kv_from_flags(ctk, ctv, flash_attn, boundary_n, boundary_type, boundary_k, kv_policy)


kv_options = _group([
    click.option("--ctk", default=None, help="K cache type (default f16, or the KV policy's)."),
    click.option("--ctv", default=None, help="V cache type (default f16, or the KV policy's)."),
    click.option("--fa", "flash_attn", type=click.Choice(["on", "off", "auto"]), default="auto",
                 show_default=True, help="Flash attention (a quantized V cache switches it on)."),
    click.option("--boundary", "boundary_n", type=int, default=None,
                 help="Put V of the first and last N KV layers (by KV-layer ordinal) at --boundary-type."),
    click.option("--boundary-type", default="q8_0", show_default=True),
    click.option("--boundary-k", is_flag=True, help="Apply --boundary to K as well."),
    click.option("--kv-policy", "kv_policy", default=None, help="A KV policy: a name from recipes/kv/ or a .toml path."),
], _kv)


# ---------------------------------------------------------------- run options
@dataclass(frozen=True)
class RunOptions:
    """Threads, GPU layers and where the result is filed: shared by every measurement command."""

    threads: int | None = None
    ngl: int | None = None
    label: str | None = None
    study: str | None = None


run_options = _group([
    click.option("-t", "--threads", type=int, default=None),
    click.option("-ngl", "--n-gpu-layers", "ngl", type=int, default=None),
    click.option("--label", default=None, help="Row name in reports."),
    click.option("--study", default=None, help="Group results for `lacq report --study`."),
], lambda threads, ngl, label, study: ("run", RunOptions(threads, ngl, label, study)))


# ---------------------------------------------------------------- which build
@dataclass(frozen=True)
class BuildChoice:
    backend: str = "cpu"
    source: str | None = None

    def require(self) -> Build:
        """The finished build of this backend and source (never builds)."""
        return require_build(BuildSpec(backend=self.backend), self.source)


build_options = _group([
    click.option("--backend", type=click.Choice(BACKENDS), default="cpu", show_default=True,
                 help="Which build of llama.cpp to use."),
    click.option("--source", default=None, metavar="PATH|git+URL@REF",
                 help="llama.cpp source (default: the pinned llama-cpp-python 0.3.36 tree)."),
], lambda backend, source: ("build", BuildChoice(backend, source)))


# ---------------------------------------------------------------- small parsers
def parse_sets(sets) -> dict[str, str]:
    """`--set PARAM=VALUE` items -> a dict."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected PARAM=VALUE, got {item!r}", param_hint="--set")
        out[key.strip()] = value.strip()
    return out


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=what) from None
    if not values:
        raise click.BadParameter("give at least one value", param_hint=what)
    return values


def open_results(ctx: click.Context):
    from lacq.results.store import open_store
    return open_store(ctx.obj["db"])


MACHINE_FORMATS = ("json", "csv")  # stdout holds the document alone; every other line goes to stderr


def format_option(choices=("table", "md", "csv", "json"), default="table", json_alias: bool = False):
    """`--format`; with `json_alias`, `--json` as another name for `--format json` (the measurement
    commands' flag), so that one option says what stdout holds."""
    fmt = click.option("--format", "fmt", type=click.Choice(list(choices)), default=None,
                       help=f"What stdout holds [default: {default}]; json and csv: the document alone.")
    if not json_alias:
        return _group([fmt], lambda fmt: ("fmt", fmt or default))

    def pick(fmt, as_json):
        if as_json and fmt not in (None, "json"):
            raise LacqError(f"--json is --format json; it cannot go with --format {fmt}")
        return "fmt", "json" if as_json else fmt or default

    return _group([fmt, click.option("--json", "as_json", is_flag=True, help="The same as --format json.")], pick)


def message_console(fmt: str) -> Console:
    """Where a command's lines other than its document go: beside a table for people, stderr beside
    json or csv."""
    return err_console if fmt in MACHINE_FORMATS else console


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON.")(fn)


def result_json_option(fn):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the stored result (provenance, per-layer KV map, metrics) as one JSON object "
                             "on stdout, and nothing else there.")(fn)


def echo_result_json(store, result_id: int) -> None:
    """The result as stored, as one JSON object on stdout."""
    import dataclasses
    import json
    click.echo(json.dumps(dataclasses.asdict(store.get(result_id))))


allow_long_context_option = click.option(
    "--allow-long-context", is_flag=True,
    help="Run a context longer than the model's training context (refused otherwise).")


def corpus_path(corpus: Path | None, split: str | None = None) -> Path:
    """The text a command reads: --corpus (default: the default corpus), whole or its --split part."""
    from lacq.corpus import text_for
    return text_for(split, corpus)


def split_option(fn):
    from lacq.corpus import SPLITS
    return click.option("--split", type=click.Choice(SPLITS), default=None,
                        help="Only this part of the text (default: all of it); the parts never overlap: "
                             "scan (first quarter), judge (second quarter), calibration (second half).")(fn)
