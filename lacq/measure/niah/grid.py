"""The NIAH grid: every (context length, depth, trial) probed once, journaled, then stored.

Every probe is journaled as it finishes, in a file named by a hash of everything
that decides the grid's result, so an interrupted grid resumes when the same
command runs again; a finished grid is stored as one result and its journal
removed. Grids that differ in anything (a sweep runs one per context length,
side by side) have journals of their own.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lacq import paths
from lacq.fsutil import canonical_hash, write_text_atomic
from lacq.llama.build import Build
from lacq.measure.common import Progress, prepare_kv, record
from lacq.measure.niah.prompts import (
    NEEDLE,
    QUESTION,
    NiahError,
    PromptBuilder,
    check_tokenizer,
    resolve_template,
    score,
)
from lacq.measure.niah.runners import BindingsRunner, CompletionRunner, Runner
from lacq.model.info import ModelInfo
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store

log = logging.getLogger(__name__)

NIAH_VERSION = 1


@dataclass(frozen=True)
class NiahTrial:
    length: int
    depth: int
    trial: int
    key: str
    answer: str
    passed: bool
    n_prompt_tokens: int
    seconds: float


def check_lengths(lengths: list[int], n_ctx_train: int | None) -> None:
    for n in lengths:
        if n_ctx_train and n > n_ctx_train:
            raise NiahError(f"context {n} is longer than the model supports ({n_ctx_train} tokens of training "
                            "context); drop it from --ctx")
        if n < 128:
            raise NiahError(f"context {n} is too short for a needle probe (at least 128 tokens)")


def check_depths(depths: list[int]) -> None:
    for d in depths:
        if not 0 <= d <= 100:
            raise NiahError(f"depth {d} is not a percentage between 0 and 100")


class Journal:
    """The probes of one grid run so far, one JSON line each, so an interrupted grid resumes.

    The file's name is a hash of everything that decides the grid (`journal_path`): a
    probe read back is the one the same command would produce again, and the journal is
    this grid's alone. A line cut short by a kill is dropped by writing the whole lines
    to a new file that replaces the old one, so no reader ever sees a half-written journal.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: dict[tuple[int, int, int], NiahTrial] = {}
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        for n, line in enumerate(lines):
            try:
                t = NiahTrial(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by a kill: keep what came before it
                write_text_atomic(self.path, "".join(f"{good}\n" for good in lines[:n]))
                break
            self.done[(t.length, t.depth, t.trial)] = t

    def get(self, length: int, depth: int, trial: int) -> NiahTrial | None:
        return self.done.get((length, depth, trial))

    def add(self, t: NiahTrial) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(t)) + "\n")
        self.done[(t.length, t.depth, t.trial)] = t

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def journal_path(store: Store, *, model: Path, build: Build, kv: KvConfig, runner: str, ngl: int | None,
                 haystack: Path, template, seed: int, n_predict: int, lengths: list[int], depths: list[int],
                 trials: int) -> Path:
    """The journal of one grid: named by everything that changes its result, the grid's lengths,
    depths and trials included."""
    cache = store.cache
    key = canonical_hash({
        "niah_version": NIAH_VERSION, "model": cache.sha256(model), "build": build.key, "kv": kv.to_dict(),
        "runner": runner, "ngl": ngl, "haystack": cache.sha256(haystack), "template": [template.name,
        template.source], "seed": seed, "n_predict": n_predict, "lengths": list(lengths), "depths": list(depths),
        "trials": trials})
    return paths.sub("work") / "niah" / f"{key[:24]}.jsonl"


def run_grid(runner: Runner, builder: PromptBuilder, lengths: list[int], depths: list[int], trials: int,
             progress: Progress | None = None,
             journal: Journal | None = None) -> list[NiahTrial]:
    out = []
    total = len(lengths) * len(depths) * trials
    for length in lengths:
        for trial in range(trials):
            for depth in depths:
                t = journal.get(length, depth, trial) if journal else None
                if t is None:
                    p = builder.prompt(length, depth, trial)
                    a = runner.generate(p, builder.n_predict)
                    if a.n_prompt_tokens and a.n_prompt_tokens != p.n_tokens:
                        raise NiahError(f"the runner tokenized the prompt to {a.n_prompt_tokens} tokens, the "
                                        f"builder counted {p.n_tokens}: tokenizers disagree")
                    t = NiahTrial(length, depth, trial, p.key, a.text, score(p.key, a.text), p.n_tokens,
                                  round(a.seconds, 3))
                    if journal:
                        journal.add(t)
                out.append(t)
                if progress:
                    progress(len(out) / total, f"ctx {length} depth {depth}% trial {trial + 1}")
    return out


def pass_rates(trials: list[NiahTrial]) -> dict[tuple[int, int], tuple[int, int]]:
    """(length, depth) -> (passed, run)."""
    grid: dict[tuple[int, int], tuple[int, int]] = {}
    for t in trials:
        p, n = grid.get((t.length, t.depth), (0, 0))
        grid[(t.length, t.depth)] = (p + int(t.passed), n + 1)
    return grid


@dataclass(frozen=True)
class NiahOutcome:
    trials: tuple  # NiahTrial
    grid: dict  # (length, depth) -> (passed, run)
    result_id: int
    seconds: float
    runner: str


def measure_niah(build: Build, store: Store, model: Path, info: ModelInfo, kv: KvConfig, *,
                 lengths: list[int], depths: list[int], trials: int = 5, seed: int = 0,
                 haystack: Path | None = None, chat_template: str = "auto", runner: str = "bindings",
                 n_predict: int = 16, threads: int | None = None, ngl: int | None = None,
                 label: str | None = None, study: str | None = None, progress: Progress | None = None):
    kv = prepare_kv(build, kv, info)
    check_lengths(lengths, info.n_ctx_train)
    check_depths(depths)
    if trials < 1:
        raise NiahError("--trials must be at least 1")
    haystack = Path(haystack) if haystack else paths.default_corpus()
    if not haystack.is_file():
        raise NiahError(f"haystack {haystack} does not exist")
    check_tokenizer(model)
    template = resolve_template(chat_template, model)
    if runner == "bindings":
        run = BindingsRunner(build, model, kv, threads=threads, ngl=ngl)
    elif runner == "completion":
        run = CompletionRunner(build, model, kv, threads=threads, ngl=ngl)
    else:
        raise NiahError(f"unknown runner {runner!r}; use bindings or completion")
    t0 = time.monotonic()
    journal = Journal(journal_path(store, model=model, build=build, kv=kv, runner=run.name, ngl=ngl,
                                   haystack=haystack, template=template, seed=seed, n_predict=n_predict,
                                   lengths=lengths, depths=depths, trials=trials))
    total = len(lengths) * len(depths) * trials
    try:
        builder = PromptBuilder(haystack.read_text(errors="replace"), template, run.count_tokens,
                                     seed=seed, n_predict=n_predict)
        for n in lengths:  # every length is checked before the first generation
            builder.check_fits(n)
        if progress:
            progress(0.0, f"resuming, {len(journal.done)} probes done before" if journal.done
                     else "building haystacks")
        results = run_grid(run, builder, lengths, depths, trials, progress, journal)
    finally:
        run.close()
        if journal.path.exists() and len(journal.done) < total:
            log.warning("%d of %d probes are saved; the same command resumes from there",
                        len(journal.done), total)
    grid = pass_rates(results)
    metrics = {
        "niah_version": NIAH_VERSION, "runner": run.name, "lengths": lengths, "depths": depths,
        "trials": trials, "seed": seed, "template": template.name, "n_predict": n_predict,
        "needle": NEEDLE, "question": QUESTION,
        "grid": [{"length": l, "depth": d, "passed": p, "n": n} for (l, d), (p, n) in sorted(grid.items())],
        "pass_rate": sum(t.passed for t in results) / len(results),
        "results": [asdict(t) for t in results],
    }
    seconds = time.monotonic() - t0
    rid = record(store, kind="niah", label=label or f"{model.name} {kv.label()}", model=model, build=build, kv=kv,
                 command=["niah", runner, str(haystack)], metrics=metrics, wall_seconds=seconds, study=study,
                 corpus=haystack, ctx=max(lengths), info=info)
    journal.remove()
    return NiahOutcome(tuple(results), grid, rid, seconds, run.name)
