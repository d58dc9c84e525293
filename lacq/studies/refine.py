"""Measured choice and refinement of an optimized answer: proposals and single-unit moves measured, the best kept.

**Picking among proposals** (`pick_measured`, `lacq optimize --verify`): the search
returns its answer and the distinct proposals of its other objectives
(`Solution.alternatives`); each is measured on `judge_chunks` chunks and the best
measured is kept. The quoted rule that ranks them is a prediction and can rank
them wrongly (SmolLM2, q4_0/q8_0 tensor units, the CPU scan at 105.9 MB: the
budget-weighted proposal measured 0.0930 on 20 chunks, the highest end's 0.0822).

**Refinement** (`refine`, `--refine N`). The scan predicts additively around its two
ends (every unit at the lowest type, every unit at the highest). An optimum at a budget in between lies far from both,
where units interact, and the prediction drifts (SmolLM2, q4_0/q8_0 tensor units at
105.9 MB: quoted 0.072, measured 0.09). Refinement linearises where the answer is:

- around the current choice c (measured KLD K0), every unit u moved alone to every
  other candidate type t is measured: K(u, t), on the scan's tokens;
- the knapsack of `optimize` picks the moves with the most predicted gain within the
  budget: predicted = K0 + Σ (K(u, t_u) − K0) over the moved units. Noise is not
  trusted to pay: a move to a dearer type that measures worse, or to a cheaper type
  that measures better, counts as zero change; a move between types of equal cost
  (iq4_nl and q4_k, q5_0 and q5_k) counts as measured, either way;
- the proposal is measured and replaces c only when it measures lower than K0. Both
  are judged on `judge_chunks` chunks (default 20 in the CLI), more than the scan's:
  the knapsack picks the moves whose few-chunk measurements happen to look best, and
  judged on those same tokens the winners' luck looks like a gain (SmolLM2, q4_0/q8_0
  tensor units, CUDA: accepted on the scan's 4 chunks 0.0810 → 0.0764, then 0.0846
  on 20 against the start's 0.0808). When it does not measure lower, the step
  shrinks: only the better half of its moves (by predicted change per byte moved)
  may move, at most SHRINKS times;
- rounds repeat around each accepted choice, up to `rounds`, and stop early when a
  round accepts nothing.

Every measurement is a job of a journal study (`journal_study`: the scan's study, and a hash of the
measuring build, corpus, context and chunks), keyed by what the variant holds, so a re-run (or
Ctrl-C and a re-run) measures nothing twice and another build or corpus measures afresh. The
pure part (`local_items`, `propose`) takes the measurements as numbers; the
runners (`weights_runner`, `kv_runner`) turn a choice into a measured KLD.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Self

from lacq.fsutil import canonical_hash
from lacq.llama.build import Build
from lacq.measure.common import prepare_kv
from lacq.measure.kld import base_logits, measure_kld
from lacq.model.info import inspect_model
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store
from lacq.studies import knapsack
from lacq.studies.artifact import Kld, Scan, Unit
from lacq.studies.engine import EngineSession, engine_available
from lacq.studies.executor import Job, run_jobs
from lacq.studies.optimize import Judged, OptimizeError, Solution, bits_per_weight, partition_units, predict
from lacq.studies.scan import (
    candidate_files,
    choice_tensors,
    kv_variant_config,
    measure_assembled,
    stored_kld,
    weight_bits,
    work_dir,
)
from lacq.studies.verify import scan_imatrix

SHRINKS = 2

Choice = dict[str, str]  # unit id -> type
# measures every choice (key -> choice) on that many chunks of the scan's context, journaled; returns key -> KLD
MeasureMany = Callable[[dict[str, Choice], int], dict[str, Kld]]
Step = Callable[[str, float, str], None]
Note = Callable[[str], None]  # a line for the person running it (the engine's memory, up front)


@dataclass(frozen=True)
class Round:
    round: int
    center_kld: float
    moves_measured: int
    proposals: tuple[dict, ...]  # each: moves, predicted, measured, allowed units (None: all)
    accepted: bool


@dataclass(frozen=True)
class Refined:
    choice: Choice
    kld: Kld  # the refined choice, measured on `chunks` chunks
    start: Kld  # the optimizer's choice, measured on the same tokens
    cost: float
    rounds: tuple[Round, ...]
    chunks: int  # the chunks proposals were judged on (the scan's context)

    def to_dict(self) -> dict:
        return {"chunks": self.chunks, "kld": self.kld.kld, "kld_error": self.kld.kld_error,
                "start_kld": self.start.kld,
                "start_kld_error": self.start.kld_error, "cost": self.cost,
                "rounds": [r.__dict__ | {"proposals": list(r.proposals)} for r in self.rounds]}


# --- the pure part ------------------------------------------------------------------


def _delta(u: Unit, t: str, center: Choice, k0: float, moves: dict[tuple[str, str], float]) -> float:
    """The trusted KLD change of moving u alone to t (zero where noise has the wrong sign; as measured between
    types of equal cost, which have no expected sign)."""
    c = center[u.id]
    if t == c:
        return 0.0
    d = moves[(u.id, t)] - k0
    if u.cost[t] == u.cost[c]:
        return d
    return max(0.0, d) if u.cost[t] < u.cost[c] else min(0.0, d)


def local_items(units: tuple[Unit, ...], types: tuple[str, ...], center: Choice, k0: float,
                moves: dict[tuple[str, str], float], allowed: set[str] | None = None) -> knapsack.Items:
    """Knapsack items: per unit, (cost, −trusted change) per type; a unit not `allowed` keeps its type."""
    items = []
    for u in units:
        opts = types if allowed is None or u.id in allowed else (center[u.id],)
        items.append([(u.cost[t], -_delta(u, t, center, k0, moves)) for t in opts])
    return items


def propose(units: tuple[Unit, ...], types: tuple[str, ...], center: Choice, k0: float,
            moves: dict[tuple[str, str], float], room: float, allowed: set[str] | None = None) -> tuple[Choice, float]:
    """The least predicted KLD within `room` (cost of the units), moving only `allowed` units; (choice, predicted)."""
    items = local_items(units, types, center, k0, moves, allowed)
    picks = [knapsack.greedy(items, room)]
    if (dp := knapsack.dp(items, room)) is not None:
        picks.append(dp)
    best = max(picks, key=lambda k: (round(k.value, 15), -k.cost))
    opts = [types if allowed is None or u.id in allowed else (center[u.id],) for u in units]
    choice = {u.id: opts[i][k] for i, (u, k) in enumerate(zip(units, best.choice))}
    return choice, k0 - best.value


def shrink(units: tuple[Unit, ...], center: Choice, proposal: Choice, k0: float,
           moves: dict[tuple[str, str], float]) -> set[str]:
    """The better half of the proposal's moves, by trusted KLD change per byte moved."""
    moved = [u for u in units if proposal[u.id] != center[u.id]]

    def merit(u: Unit) -> float:
        t = proposal[u.id]
        bytes_moved = abs(u.cost[t] - u.cost[center[u.id]]) or 1.0
        return abs(_delta(u, t, center, k0, moves)) / bytes_moved

    keep = sorted(moved, key=merit, reverse=True)[:max(1, len(moved) // 2)]
    return {u.id for u in keep}


# --- the measured loop ----------------------------------------------------------------


def refine(scan: Scan, solution: Solution, measure: MeasureMany, key: Callable[[Choice], str], *, rounds: int = 2,
           judge_chunks: int | None = None, step: Step | None = None) -> Refined:
    """Refine `solution` (see the module docstring); `key` names what a choice's variant holds."""
    if rounds < 1:
        raise OptimizeError(f"--refine takes a number of rounds ≥ 1, got {rounds}")
    units = partition_units(scan)[solution.partition]
    types = solution.types
    room = solution.budget_cost - scan.fixed_cost
    center = dict(solution.choice)
    judge = max(scan.chunks, judge_chunks or 0)
    k_center = measure({key(center): center}, judge)[key(center)]
    start, done = k_center, []
    for r in range(1, rounds + 1):
        k_round = k_center.kld
        variants = {}
        for u in units:
            for t in types:
                if t != center[u.id]:
                    variants[(u.id, t)] = {**center, u.id: t}
        keys = {m: key(c) for m, c in variants.items()}
        if step:
            step(f"refine round {r}", 0.0, f"{len(set(keys.values()))} single-unit moves")
        got = measure({keys[m]: variants[m] for m in variants}, scan.chunks)
        here = got if key(center) in got else measure({key(center): center}, scan.chunks)
        k_moves = here[key(center)].kld  # the center on the moves' tokens: their reference
        moves = {m: got[k].kld for m, k in keys.items()}
        proposals, allowed, accepted = [], None, False
        for _ in range(SHRINKS + 1):
            proposal, predicted = propose(units, types, center, k_moves, moves, room, allowed)
            predicted = k_center.kld + (predicted - k_moves)  # the predicted change, on the judge's tokens
            n_moved = sum(proposal[u.id] != center[u.id] for u in units)
            if n_moved == 0:
                break
            measured = measure({key(proposal): proposal}, judge)[key(proposal)]
            proposals.append({"moves": {u: t for u, t in proposal.items() if t != center[u]}, "predicted": predicted,
                              "measured": measured.kld, "measured_error": measured.kld_error,
                              "allowed": None if allowed is None else sorted(allowed)})
            if measured.kld < k_center.kld:
                center, k_center, accepted = proposal, measured, True
                break
            if n_moved == 1:
                break
            allowed = shrink(units, center, proposal, k_moves, moves)
        done.append(Round(r, k_round, len(set(keys.values())), tuple(proposals), accepted))
        if not accepted:
            break
    cost = scan.fixed_cost + sum(u.cost[center[u.id]] for u in units)
    return Refined(center, k_center, start, cost, tuple(done), judge)


def pick_measured(scan: Scan, solution: Solution, measure: MeasureMany, key: Callable[[Choice], str],
                  chunks: int) -> tuple[Solution, list[tuple[str, float, Kld]], int]:
    """The search's proposals (its answer and `solution.alternatives`) measured on `chunks` chunks: the best
    measured as the solution (its prediction and solver its own, the measurement in `judged`), a table of
    (objective, quoted, measured KLD) per proposal, and the kept row."""
    chunks = max(scan.chunks, chunks)
    props = [(dict(solution.choice), solution.kld, f"the search's answer ({solution.method})", solution.method)]
    props += [(dict(c), q, w, m) for c, q, w, m in solution.alternatives]
    got = measure({key(c): c for c, _, _, _ in props}, chunks)
    table = [(w, q, got[key(c)]) for c, q, w, _ in props]
    best = min(range(len(props)), key=lambda i: (round(table[i][2].kld, 9), i))
    out = solution if best == 0 else _with_choice(solution, scan, props[best][0], method=props[best][3])
    k = table[best][2]
    note = ("proposals measured on " + f"{chunks}×{scan.ctx} tokens: " +
            "; ".join(f"{w} (quoted {q:.5f}) {m.kld:.5f} ± {m.kld_error:.5f}" for w, q, m in table) +
            f"; kept {table[best][0]}")
    return replace(out, notes=out.notes + (note,), alternatives=(),
                   judged=Judged(k.kld, k.kld_error, chunks, table[best][0])), table, best


def _with_choice(solution: Solution, scan: Scan, choice: Choice, **changes) -> Solution:
    """`solution` with another choice of the same partition: its costs and the scan's prediction follow,
    `changes` set the rest."""
    units = partition_units(scan)[solution.partition]
    cost = scan.fixed_cost + sum(u.cost[choice[u.id]] for u in units)
    pred = predict(scan, choice, partition=solution.partition)
    return replace(solution, choice=dict(choice), unit_costs={u.id: u.cost[choice[u.id]] for u in units}, cost=cost,
                   size_mb=cost / 1e6 if scan.kind == "weights" else None,
                   bits_per_value=cost / scan.total_values if scan.kind == "kv" else None,
                   bpw=bits_per_weight(scan, cost) if scan.kind == "weights" else None, kld=pred.kld,
                   kld_low=pred.kld_low, kld_high=pred.kld_high, kld_error=pred.kld_error, frac=pred.frac, **changes)


def refined_solution(solution: Solution, scan: Scan, r: Refined) -> Solution:
    """The solution with the refined choice: the scan's prediction for it, and its measurement (on the chunks
    proposals were judged on) in `judged`."""
    n = sum(len(x.proposals) for x in r.rounds)
    note = (f"refined by measurement: {len(r.rounds)} round(s), {n} proposal(s) measured; KLD {r.start.kld:.5f} → "
            f"{r.kld.kld:.5f} ± {r.kld.kld_error:.5f} measured on {r.chunks}×{scan.ctx} tokens")
    return _with_choice(solution, scan, r.choice, method="refined", notes=solution.notes + (note,),
                        judged=Judged(r.kld.kld, r.kld.kld_error, r.chunks, "refined"))


# --- runners ----------------------------------------------------------------------------


def journal_study(scan: Scan, build: Build, corpus_sha256: str, chunks: int) -> str:
    """The study that journals refinement measurements: the scan's study, and a hash of everything else that
    changes a number (the measuring build, the corpus, context and chunks, the base file or KV reference)."""
    scan_study = scan.provenance.get("study") or canonical_hash(scan.model)[:16]
    reference = {k: v for k, v in scan.base.items() if k not in ("path", "logits")}  # base sha256, or KV cache types
    inputs = {"build": build.key, "corpus": corpus_sha256, "ctx": scan.ctx, "chunks": chunks,
              "model": scan.model.get("sha256"), "base": reference}
    return f"refine:{scan_study}:{canonical_hash(inputs)[:12]}:{chunks}"


RunChoice = Callable[[Job, Store, int, str], int]  # (job of a choice, store, chunks, study) -> result id
RunInEngine = Callable[["EngineSession", Job, Store, str], int]  # (session, job of a choice, store, study) -> id
OpenSession = Callable[[int, Store], "EngineSession"]  # (chunks, store) -> the engine session on those tokens


class Measure:
    """Journaled measurement of choices (a `MeasureMany`): one journal study per chunk count (`journal_study`).

    With an engine (`open_session`), the choices not yet journaled are measured in place: one engine session per
    chunk count (the base logits differ per corpus and chunks, and a runner measures one corpus), started when a
    choice first needs it and kept for later calls on those tokens; `close()` (or leaving a `with` block, Ctrl-C
    included) stops them. Without one, each choice runs as `run` measures it (its own llama-perplexity process)."""

    def __init__(self, store: Store, build: Build, scan: Scan, corpus: Path, run: RunChoice, workers: int,
                 step: Step | None, engine: tuple[OpenSession, RunInEngine] | None = None):
        self.store, self.build, self.scan, self.corpus = store, build, scan, corpus
        self.run, self.workers, self.step, self.engine = run, workers, step, engine
        self.corpus_sha = store.sha256(corpus)
        self._sessions: dict[int, EngineSession] = {}
        self._lock = threading.Lock()

    def _session(self, chunks: int, st: Store) -> EngineSession:
        assert self.engine is not None
        with self._lock:  # jobs on several threads share one session (and make its base logits once)
            if chunks not in self._sessions:
                self._sessions[chunks] = self.engine[0](chunks, st)
            return self._sessions[chunks]

    def _one(self, job: Job, st: Store, chunks: int, study: str) -> int:
        if self.engine is None:
            return self.run(job, st, chunks, study)
        return self.engine[1](self._session(chunks, st), job, st, study)

    def __call__(self, choices: dict[str, Choice], chunks: int) -> dict[str, Kld]:
        study = journal_study(self.scan, self.build, self.corpus_sha, chunks)
        jobs = [Job(k, k) for k in choices]
        step = self.step
        ids = run_jobs(jobs, lambda job, st: self._one(Job(job.key, choices[job.key]), st, chunks, study),
                       self.store, study, workers=self.workers,
                       progress=(lambda d, n, k: step("refine", d / n, f"{d}/{n}")) if step and len(jobs) > 1 else None)
        return {k: stored_kld(self.store, ids[k]) for k in choices}

    def close(self) -> None:
        """Stop the engines; a later call starts them again."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked(store: Store, path: str | None, sha256: str | None, what: str) -> Path:
    """The scan's file `what` (its base, or the scanned model), here and unchanged since the scan."""
    if not path:
        raise OptimizeError(f"refining needs the scan's {what}, and the scan names none")
    p = Path(path)
    if not p.exists():
        raise OptimizeError(f"refining needs the scan's {what} {p}, which does not exist here")
    if store.sha256(p) != sha256:
        raise OptimizeError(f"{p} is not the file the scan was made from (sha256 differs)")
    return p


def _logits_step(step: Step | None, chunks: int):
    return (lambda f, d: step(f"base logits ({chunks} chunks)", f, d)) if step else None


def weights_runner(build: Build, store: Store, scan: Scan, corpus: Path, *, threads: int | None = None,
                   workers: int = 1, step: Step | None = None, imatrix: Path | None = None, engine: bool = True,
                   note: Note | None = None) -> tuple[Measure, Callable[[Choice], str]]:
    """(measure, key) for a weights scan: each choice's tensors taken from the candidate files (quantized with
    `imatrix`, which must be the scan's own where it had one), KLD against the base. With the engine (where the
    build has it and `engine`), in place: its model the lowest type's candidate file, the other types candidates;
    otherwise each choice assembled into a file. Close `measure` when done."""
    base = _checked(store, scan.base.get("path"), scan.base.get("sha256"), "base")
    base_info = inspect_model(base)
    work = work_dir(scan.base["sha256"])
    files = candidate_files(build, store, base, base_info, list(scan.types), work, step,
                            imatrix=scan_imatrix(store, scan, imatrix))
    cinfo = {t: inspect_model(p) for t, p in files.items()}
    by_id = {u.id: u for u in scan.units}
    lowest = min(scan.types, key=weight_bits)

    def tensors(choice: Choice) -> dict[str, str]:
        return {n: t for uid, t in choice.items() for n in by_id[uid].tensors}

    def key(choice: Choice) -> str:
        # what the file holds: each tensor's written type (llama.cpp's replacements make some moves no-ops)
        return "w:" + canonical_hash(sorted((n, cinfo[t].tensor(n).type) for n, t in tensors(choice).items()))[:20]

    def split(choice: Choice) -> tuple[str, dict[str, str]]:
        """The choice as the file the assembled path makes: its most common type, and the tensors at another."""
        plan = tensors(choice)
        default = Counter(plan.values()).most_common(1)[0][0]
        return default, {n: t for n, t in plan.items() if t != default}

    def run(job: Job, st: Store, chunks: int, study: str) -> int:
        default, moved = split(job.spec)
        return measure_assembled(build, st, files, cinfo, default, moved, base, base_info, corpus, work, ctx=scan.ctx,
                                 chunks=chunks, threads=threads, label=job.key, study=study)

    def open_session(chunks: int, st: Store) -> EngineSession:
        logits, _ = base_logits(build, st, base, base_info, corpus, ctx=scan.ctx, chunks=chunks, threads=threads,
                                progress=_logits_step(step, chunks))
        return EngineSession(build, files[lowest], cinfo[lowest], logits,
                             {t: files[t] for t in scan.types if t != lowest}, ctx=scan.ctx, threads=threads, note=note)

    def in_engine(session: EngineSession, job: Job, st: Store, study: str) -> int:
        default, moved = split(job.spec)
        return session.measure(st, label=job.key, study=study, tensors=choice_tensors(moved, default, cinfo, lowest),
                               kv=KvConfig(), corpus=corpus, record_model=files[default], base=base,
                               base_sha256=scan.base["sha256"])

    with_engine = (open_session, in_engine) if engine and engine_available(build, note) else None
    return Measure(store, build, scan, corpus, run, workers, step, with_engine), key


def kv_config(scan: Scan, choice: Choice) -> KvConfig:
    """The KV configuration that runs `choice` (kv.N -> type) as the scan ran its variants."""
    by_id = {u.id: u for u in scan.units}
    default = Counter(choice.values()).most_common(1)[0][0]
    return kv_variant_config(scan.base.get("cache"), scan.base.get("other") or "q8_0", default,
                             {by_id[uid].ordinal: t for uid, t in choice.items() if t != default})


def kv_runner(build: Build, store: Store, scan: Scan, corpus: Path, *, threads: int | None = None,
              workers: int = 1, step: Step | None = None, engine: bool = True,
              note: Note | None = None) -> tuple[Measure, Callable[[Choice], str]]:
    """(measure, key) for a KV scan: each choice run as per-layer types, KLD against the f16-cache logits. With the
    engine (where the build has it and `engine`), in place on the scanned model (only the context re-created per
    choice); otherwise a llama-perplexity process per choice. Close `measure` when done."""
    model = _checked(store, scan.model.get("path"), scan.model.get("sha256"), "scanned model")
    info = inspect_model(model)
    by_id = {u.id: u for u in scan.units}

    def key(choice: Choice) -> str:
        return "kv:" + ",".join(choice[uid] for uid in sorted(choice, key=lambda x: by_id[x].ordinal))

    def run(job: Job, st: Store, chunks: int, study: str) -> int:
        return measure_kld(build, st, model, info, model, info, kv_config(scan, job.spec), corpus, ctx=scan.ctx,
                           chunks=chunks, threads=threads, label=job.key, study=study).result_id

    def open_session(chunks: int, st: Store) -> EngineSession:
        logits, _ = base_logits(build, st, model, info, corpus, ctx=scan.ctx, chunks=chunks, threads=threads,
                                progress=_logits_step(step, chunks))
        return EngineSession(build, model, info, logits, {}, ctx=scan.ctx, threads=threads, note=note)

    def in_engine(session: EngineSession, job: Job, st: Store, study: str) -> int:
        return session.measure(st, label=job.key, study=study, tensors={},
                               kv=prepare_kv(build, kv_config(scan, job.spec), info), corpus=corpus,
                               record_model=model, base=model, base_sha256=scan.model["sha256"])

    with_engine = (open_session, in_engine) if engine and engine_available(build, note) else None
    return Measure(store, build, scan, corpus, run, workers, step, with_engine), key


def summary(r: Refined) -> list[str]:
    """One line per round, for the command's output."""
    lines = []
    for x in r.rounds:
        tried = "; ".join(f"{len(p['moves'])} moves predicted {p['predicted']:.5f} measured {p['measured']:.5f}"
                          for p in x.proposals) or "no move predicted a gain"
        lines.append(f"round {x.round}: {x.moves_measured} single-unit moves around KLD {x.center_kld:.5f}; {tried}"
                     f"{' (accepted)' if x.accepted else ''}")
    return lines
