"""Sweeps (`lacq sweep`): models × weight recipes × KV configurations × contexts × measurements,
declared in TOML, run on an executor (local processes or Ray), resumable run by run.

Each run has a key: the canonical hash of its description (model sha256, recipe, KV settings,
context, measurement and its parameters, build key). A finished run is a stored result of the
sweep's study carrying that key, so a sweep interrupted by Ctrl-C or a lost node resumes with
the same command: nothing finished is repeated, nothing is lost. The driver prepares what every
worker needs (the build, resolved and quantized models, base logits for KLD) before dispatching,
workers measure into a database of their own and send the result back, and the driver files it
with the worker's provenance (node, device) — so only the driver writes the results database.
Where the build has the evaluation engine, a worker measures its KLD runs in engines it keeps across runs
(one model load for all the KV configurations of a model file); `lacq sweep --no-engine` runs a
llama-perplexity process per KLD run instead.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lacq.errors import LacqError, SweepError
from lacq.fsutil import canonical_hash
from lacq.llama.build import BACKENDS, Build
from lacq.model.imatrix import read_imatrix
from lacq.plan.kv.config import KvConfig
from lacq.plan.kv.flags import kv_from_flags
from lacq.results.store import Store

if TYPE_CHECKING:
    from lacq.studies.engine import EngineSession

log = logging.getLogger(__name__)

SWEEP_VERSION = 1
MEASUREMENTS = ("ppl", "kld", "niah", "bench")
_TOP_KEYS = {"name", "description", "backend", "source", "models", "recipes", "kv", "contexts", "measurements",
             "gpus_per_run", "threads", "imatrix", *MEASUREMENTS}
_KV_KEYS = {"ctk", "ctv", "fa", "boundary", "boundary_type", "boundary_k", "policy"}
_SECTION_KEYS = {
    "ppl": {"chunks"},
    "kld": {"chunks"},
    "bench": {"pp", "tg", "repetitions"},
    "niah": {"depths", "trials", "seed", "runner", "n_predict"},
}
_SECTION_DEFAULTS = {
    "ppl": {"chunks": 20},
    "kld": {"chunks": 20},
    "bench": {"pp": 512, "tg": 128, "repetitions": 5},
    "niah": {"depths": [0, 25, 50, 75, 100], "trials": 5, "seed": 0, "runner": "completion", "n_predict": 16},
}
# Test hook (documented in the tests): when set to a path, the first run to create that file kills
# its own worker process mid-run (its tool running), as a lost node would; the file says (JSON)
# which worker died and which tools it was running, so a test can check that none outlives it. (A KLD run in
# the engine dies once its variant is measured: with its engine running, before its result is returned.)
CRASH_ONCE_ENV = "LACQ_SWEEP_CRASH_ONCE"


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    path: Path
    backend: str
    source: str | None
    models: tuple[str, ...]
    recipes: tuple[str | None, ...]  # None: the model as given
    kv: tuple[KvConfig, ...]
    contexts: tuple[int, ...]
    measurements: tuple[str, ...]
    params: dict  # measurement -> its parameters
    gpus_per_run: float
    threads: int | None
    imatrix: str | None = None  # importance matrix the recipes are quantized with (path; relative to the file)


@dataclass(frozen=True)
class SweepRun:
    """One run, fully resolved: what a worker needs to measure it, nothing it must look up."""

    key: str
    label: str
    measurement: str
    model: str  # path of the model to measure (quantized by the driver where a recipe asks)
    recipe: str | None
    kv: KvConfig
    ctx: int
    params: dict
    gpus: float
    logits: str | None = None  # KLD: the base logits the driver made
    base: str | None = None  # KLD: the model those logits are of (see plan_runs)


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker gets: lacq's home (builds, models, caches; a shared filesystem) and the build."""

    home: str
    build: Build
    corpus: str
    threads: int | None = None
    ngl: int | None = None
    engine: bool = False  # KLD runs in the evaluation engine (the driver checked that the build has it)


def _fail(path: Path, msg: str) -> SweepError:
    return SweepError(f"sweep {path}: {msg}")


def _kv_entry(path: Path, entry) -> KvConfig:
    if isinstance(entry, str):  # "K/V" shorthand
        k, sep, v = entry.partition("/")
        if not sep:
            raise _fail(path, f"kv entry {entry!r}: expected K/V (e.g. q8_0/q4_0) or a table")
        return kv_from_flags(k.strip(), v.strip())
    if not isinstance(entry, dict):
        raise _fail(path, f"kv entry {entry!r}: expected K/V or a table")
    unknown = set(entry) - _KV_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s) in a kv entry: {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(_KV_KEYS))}")
    return kv_from_flags(entry.get("ctk"), entry.get("ctv"), entry.get("fa", "auto"), entry.get("boundary"),
                         entry.get("boundary_type", "q8_0"), bool(entry.get("boundary_k", False)),
                         entry.get("policy"))


def _list(path: Path, data: dict, key: str, kind, required: bool = True) -> list:
    if key not in data:
        if required:
            raise _fail(path, f"missing required key {key!r}")
        return []
    value = data[key]
    if not isinstance(value, list) or not value:
        raise _fail(path, f"{key!r} must be a non-empty list")
    for v in value:
        if kind is not None and not isinstance(v, kind):
            raise _fail(path, f"{key!r}: {v!r} is not a {kind.__name__}")
    return value


def load_sweep(path: Path, *, backend: str | None = None, source: str | None = None) -> Sweep:
    """Parse and check a sweep file (unknown keys, types, KV settings) before any work; `backend`
    and `source`, where given, override the file's (the command line's --backend, --source)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid TOML: {exc}") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TOP_KEYS))}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(path, "missing required key 'name' (the study the results are filed under)")
    backend = backend or data.get("backend", "cpu")
    if backend not in BACKENDS:
        raise _fail(path, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    measurements = _list(path, data, "measurements", str)
    for m in measurements:
        if m not in MEASUREMENTS:
            raise _fail(path, f"unknown measurement {m!r}; choose from {', '.join(MEASUREMENTS)}")
    params = {}
    for m in MEASUREMENTS:
        section = data.get(m, {})
        if not isinstance(section, dict):
            raise _fail(path, f"[{m}] must be a table")
        bad = set(section) - _SECTION_KEYS[m]
        if bad:
            raise _fail(path, f"unknown key(s) in [{m}]: {', '.join(sorted(bad))}; "
                              f"known: {', '.join(sorted(_SECTION_KEYS[m]))}")
        params[m] = {**_SECTION_DEFAULTS[m], **section}
    contexts = _list(path, data, "contexts", int)
    if any(c < 16 for c in contexts):
        raise _fail(path, "contexts must be at least 16 tokens")
    recipes = [None if r in ("none", "") else r for r in _list(path, data, "recipes", str, required=False)] or [None]
    kv = tuple(_kv_entry(path, e) for e in (_list(path, data, "kv", None, required=False) or ["f16/f16"]))
    imatrix = data.get("imatrix")
    if imatrix is not None:
        if not isinstance(imatrix, str) or not imatrix:
            raise _fail(path, f"imatrix must be a path (lacq imatrix MODEL makes one), got {imatrix!r}")
        imatrix = path.parent / imatrix
        if not imatrix.is_file():
            raise _fail(path, f"imatrix {imatrix} does not exist")
        read_imatrix(imatrix)  # is one (ImatrixError otherwise), before any work
        imatrix = str(imatrix.resolve())
    gpus = data.get("gpus_per_run", 0 if backend == "cpu" else 1)
    if not isinstance(gpus, (int, float)) or gpus < 0:
        raise _fail(path, f"gpus_per_run must be a number ≥ 0, got {gpus!r}")
    return Sweep(name=name.strip(), description=str(data.get("description", "")), path=path, backend=backend,
                 source=source or data.get("source"), models=tuple(_list(path, data, "models", str)), recipes=tuple(recipes),
                 kv=kv, contexts=tuple(contexts), measurements=tuple(measurements), params=params,
                 gpus_per_run=float(gpus), threads=data.get("threads"), imatrix=imatrix)


def describe(run_fields: dict) -> str:
    return canonical_hash({"sweep_version": SWEEP_VERSION, **run_fields})[:20]


# What a sweep's KLD is measured against (stored with each KLD result as `kld_base`): with a recipe,
# the unquantized parent the recipe was applied to, as `lacq demo` and `lacq scan` do; without one
# there is no parent, and the base is the same weights with an f16 KV cache, so the KLD is the KV
# cache's alone.
KLD_BASE_PARENT = "unquantized parent"
KLD_BASE_SAME_WEIGHTS = "same weights, f16 KV cache"


def plan_runs(sweep: Sweep, build: Build, store: Store,
              prepare_model: Callable[[str, str | None], tuple[Path, Path]],
              prepare_logits: Callable[[Path, int, int], Path]) -> list[SweepRun]:
    """Every run of the sweep, in a stable order, with models (and KLD base logits) prepared.
    `prepare_model(spec, recipe)` returns the model to measure and its unquantized parent (the
    model itself where there is no recipe); KLD logits are the parent's."""
    runs = []
    for model_spec in sweep.models:
        for recipe in sweep.recipes:
            model, base = prepare_model(model_spec, recipe)
            sha = store.sha256(model)
            for kv in sweep.kv:
                for ctx in sweep.contexts:
                    label = f"{Path(model_spec).stem if '/' in model_spec else model_spec}" + (
                        f" {recipe}" if recipe else "") + f" {kv.label()} c{ctx}"
                    for m in sweep.measurements:
                        p = sweep.params[m]
                        fields = {"model": sha, "recipe": recipe, "kv": kv.to_dict(), "ctx": ctx,
                                  "measurement": m, "params": p, "build": build.key}
                        logits = None
                        if m == "kld":
                            fields["base"] = store.sha256(base)
                            logits = str(prepare_logits(base, ctx, p["chunks"]))
                        runs.append(SweepRun(describe(fields), label, m, str(model), recipe, kv, ctx, p,
                                             sweep.gpus_per_run, logits, str(base) if m == "kld" else None))
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise SweepError(f"sweep {sweep.path}: two runs have the same description (a repeated entry?)")
    return runs


# ---------------------------------------------------------------- the worker side
def _maybe_crash() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, json.dumps({"worker": os.getpid(), "tools": _child_pids()}).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _child_pids() -> list[int]:
    """This process's children (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == os.getpid():
            out.append(int(stat.parent.name))
    return out


def _node() -> dict:
    node = {"host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import ray  # only inside a Ray worker
        if ray.is_initialized():
            node["ray_node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return node


def execute_run(run: SweepRun, setup: WorkerSetup, report: Callable[[str, float, str], None] | None = None) -> dict:
    """Measure one run in this process and return the stored row (a dict), with the worker's
    node and device; runs in a worker (a pool process or a Ray task)."""
    os.environ["LACQ_HOME"] = setup.home
    from lacq.model.info import inspect_model
    from lacq.studies.parity import device_description
    model = Path(run.model)
    info = inspect_model(model)
    corpus = Path(setup.corpus)
    kld_base = {"kld_base": KLD_BASE_PARENT if run.recipe else KLD_BASE_SAME_WEIGHTS}
    started = [False]

    def progress(frac: float, detail: str) -> None:
        if not started[0]:
            started[0] = True
            _maybe_crash()
        if report:
            report(run.key, frac, detail)

    with tempfile.TemporaryDirectory(prefix="lacq-sweep-run-") as tmp:
        store = Store(Path(tmp) / "run.sqlite")
        common = dict(threads=setup.threads, ngl=setup.ngl, label=run.label, progress=progress)
        b = setup.build
        if run.measurement == "ppl":
            from lacq.measure.ppl import measure_ppl
            rid = measure_ppl(b, store, model, info, run.kv, corpus, ctx=run.ctx, chunks=run.params["chunks"],
                              **common).result_id
        elif run.measurement == "kld" and setup.engine:
            if report:
                report(run.key, 0.0, "in the engine")
            rid = _kld_in_engine(run, setup, store, model, info, corpus, kld_base)
            _maybe_crash()
        elif run.measurement == "kld":
            from lacq.measure.kld import measure_kld
            base = Path(run.base)
            rid = measure_kld(b, store, model, info, base, inspect_model(base), run.kv, corpus, ctx=run.ctx,
                              chunks=run.params["chunks"], logits=Path(run.logits), annotations=kld_base,
                              **common).result_id
        elif run.measurement == "bench":
            from lacq.measure.bench import measure_bench
            rid = measure_bench(b, store, model, info, run.kv, pp=run.params["pp"], tg=run.params["tg"],
                                depths=(run.ctx,), repetitions=run.params["repetitions"], **common).result_id
        elif run.measurement == "niah":
            from lacq.measure.niah.grid import measure_niah
            p = run.params
            rid = measure_niah(b, store, model, info, run.kv, lengths=[run.ctx], depths=list(p["depths"]),
                               trials=p["trials"], seed=p["seed"], runner=p["runner"], n_predict=p["n_predict"],
                               **common).result_id
        else:
            raise SweepError(f"unknown measurement {run.measurement!r}")
        row = asdict(store.get(rid))
        store.close()
    row["node"] = _node()
    row["device"] = device_description(b.backend)
    return row


# A worker's engines, kept across the runs it executes: one per (model file, base logits, ctx, threads, ngl,
# build, GPU). The plan lists a model file's runs together, so starting an engine for another file closes the
# previous file's (one model loaded per worker, as without the engine). They stop when the worker exits
# (atexit), and with it however it dies (PR_SET_PDEATHSIG, llama/tools/base.py).
_engines: dict[tuple, EngineSession] = {}


def close_engines() -> None:
    while _engines:
        _engines.popitem()[1].close()


atexit.register(close_engines)


def _engine_session(setup: WorkerSetup, model: Path, info, logits: Path, ctx: int) -> EngineSession:
    from lacq.studies.engine import EngineSession
    key = (str(model), str(logits), ctx, setup.threads, setup.ngl, setup.build.key,
           os.environ.get("CUDA_VISIBLE_DEVICES"))
    if key not in _engines:
        for other in [k for k in _engines if k[0] != key[0]]:
            _engines.pop(other).close()
        _engines[key] = EngineSession(setup.build, model, info, logits, {}, ctx=ctx, threads=setup.threads,
                                      ngl=setup.ngl)
    return _engines[key]


def _kld_in_engine(run: SweepRun, setup: WorkerSetup, store: Store, model: Path, info, corpus: Path,
                   annotations: dict) -> int:
    """A KLD run as one variant of this worker's engine for its model and base logits: the run's KV
    configuration, no tensor swapped (each sweep cell is a file of its own). Filed like `measure_kld` files
    it, with the same checks first and the same annotations, plus `engine: True`."""
    from lacq.measure.kld import check_kld_run, checked_logits_header
    from lacq.model.info import inspect_model
    base, logits = Path(run.base), Path(run.logits)
    kv = check_kld_run(setup.build, run.kv, run.ctx, model, info, base, inspect_model(base))
    header = checked_logits_header(logits, info)
    session = _engine_session(setup, model, info, logits, header.n_ctx)
    return session.measure(store, label=run.label, study=None, tensors={}, kv=kv, corpus=corpus, record_model=model,
                           base=base, base_sha256=store.sha256(base), annotations=annotations)


# ---------------------------------------------------------------- the driver side
@dataclass
class SweepOutcome:
    study: str
    total: int
    skipped: int  # already stored before this call
    ran: list[str] = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # key -> message


def stored_keys(store: Store, study: str) -> dict[str, int]:
    """Run key -> result id of the runs of this study already stored."""
    return {r.metrics["sweep_run"]: r.id for r in store.results(study=study)
            if r.kind in MEASUREMENTS and isinstance(r.metrics, dict) and "sweep_run" in r.metrics}


def file_manifest(store: Store, sweep: Sweep, runs: list[SweepRun], build: Build) -> None:
    """The sweep's plan, filed once per distinct plan, so `lacq report --study` can show progress."""
    manifest = {"sweep_version": SWEEP_VERSION, "name": sweep.name, "file": str(sweep.path),
                "build_key": build.key, "runs": [{"key": r.key, "label": r.label, "measurement": r.measurement}
                                                for r in runs]}
    previous = [r for r in store.results(kind="sweep", study=sweep.name)]
    if previous and previous[-1].metrics == manifest:
        return
    store.add(kind="sweep", label=sweep.name, model=sweep.path, build=build.provenance(), command=[],
              metrics=manifest, study=sweep.name)


def progress_of(store: Store, study: str) -> tuple[int, int, list[str]] | None:
    """(stored, planned, labels of missing runs) of the latest plan of a sweep study, or None."""
    manifests = store.results(kind="sweep", study=study)
    if not manifests:
        return None
    runs = manifests[-1].metrics["runs"]
    done = stored_keys(store, study)
    missing = [f"{r['label']} {r['measurement']}" for r in runs if r["key"] not in done]
    return len(runs) - len(missing), len(runs), missing


def store_run(store: Store, study: str, run: SweepRun, row: dict) -> int:
    from lacq.results.store import Result
    metrics = dict(row["metrics"])
    metrics.update(sweep_run=run.key, sweep_measurement=run.measurement, node=row.get("node"),
                   device=row.get("device"))
    fields = {k: row.get(k) for k in Result.__dataclass_fields__}  # older rows lack newer columns
    return store.add_copy(Result(**fields), study=study, label=run.label, metrics=metrics)


def run_sweep(sweep: Sweep, runs: list[SweepRun], setup: WorkerSetup, store: Store, executor, *,
              on_progress: Callable[[str, float, str], None] | None = None,
              on_run_done: Callable[[SweepRun, str | None], None] | None = None) -> SweepOutcome:
    """Run the sweep's runs not yet stored on `executor`; file each result as it arrives."""
    file_manifest(store, sweep, runs, setup.build)
    done = stored_keys(store, sweep.name)
    todo = [r for r in runs if r.key not in done]
    # Claimed in the store, so a second sweep of this study at the same time measures none of them twice.
    mine, elsewhere = store.claim_sweep_runs(sweep.name, [r.key for r in todo])
    outcome = SweepOutcome(sweep.name, len(runs), len(runs) - len(todo))
    for run in todo:
        if run.key in elsewhere:
            outcome.failed[run.key] = f"another sweep of this study is measuring it ({elsewhere[run.key]})"
        elif run.key not in mine:  # filed since `done` was read
            outcome.skipped += 1
    todo = [r for r in todo if r.key in mine]

    def on_done(run: SweepRun, row: dict | None, error: str | None) -> None:
        if error is not None:
            outcome.failed[run.key] = error
        elif run.key in stored_keys(store, sweep.name):  # never file one run twice
            log.warning("run %s was already stored; result from the retry dropped", run.key)
        else:
            store_run(store, sweep.name, run, row)
            outcome.ran.append(run.key)
        if on_run_done:
            on_run_done(run, error)

    try:
        if todo:
            executor.run(todo, setup, on_done, on_progress)
    finally:
        store.release_sweep_runs(sweep.name, mine)
    return outcome


def check_failures(outcome: SweepOutcome, runs: list[SweepRun]) -> None:
    if outcome.failed:
        labels = {r.key: f"{r.label} {r.measurement}" for r in runs}
        first = next(iter(outcome.failed.items()))
        raise LacqError(f"{len(outcome.failed)} of {outcome.total} runs failed (the rest are stored; the same "
                        f"command retries only the missing ones). First: {labels[first[0]]}: {first[1]}")
