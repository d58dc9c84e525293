"""The results database under several processes at once: migrations of a new database race safely, no
result is lost or filed twice, and a sweep run is filed once per study."""

from __future__ import annotations

import multiprocessing
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from test_sweep import BUILD, FakeExecutor, _plan

from lacq.cache import connect
from lacq.errors import StoreError
from lacq.results.store import MIGRATIONS, Result, Store, open_store
from lacq.studies.sweep import WorkerSetup, run_sweep

PROCESSES = 8
PER_PROCESS = 50  # results each process files of its own
SHARED_RUNS = 10  # sweep runs every process tries to file


def _filer(db_path: str, model: str, proc: int, start_at: float, out) -> None:
    """One process: open the (new) database as soon as all are ready, file its own results and the
    shared sweep runs, report what it filed."""
    time.sleep(max(0.0, start_at - time.time()))  # all open the new database at the same moment
    store = Store(db_path)
    own = [store.add(kind="ppl", label=f"p{proc} r{i}", model=model, build={"build_key": "k"}, command=["x"],
                     metrics={"ppl": float(i)}, study="load") for i in range(PER_PROCESS)]
    template = store.get(own[0])
    shared = [store.add_copy(template, study="load", label=f"run {k}", metrics={"ppl": 1.0, "sweep_run": f"key{k}"})
              for k in range(SHARED_RUNS)]
    store.close()
    out.put((proc, own, shared))


def test_eight_processes_file_into_one_new_database(tmp_path):
    db_path = tmp_path / "new.sqlite"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # after every spawned interpreter has imported lacq
    procs = [ctx.Process(target=_filer, args=(str(db_path), str(model), p, start_at, out)) for p in range(PROCESSES)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    wall = time.time() - start_at
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    store = Store(db_path)
    rows = store.results(study="load")
    own = [r for r in rows if r.sweep_run is None]
    assert sorted(r.label for r in own) == sorted(f"p{p} r{i}" for p in range(PROCESSES) for i in range(PER_PROCESS))
    assert sorted(r.id for r in own) == sorted(i for _, ids, _ in reports for i in ids)  # ids as reported
    runs = {r.sweep_run: r.id for r in rows if r.sweep_run is not None}
    assert len(runs) == SHARED_RUNS == len([r for r in rows if r.sweep_run is not None])  # each filed once
    for _, _, shared in reports:  # every process was told the id of the one row of each run
        assert shared == [runs[f"key{k}"] for k in range(SHARED_RUNS)]
    applied = [tuple(r) for r in store.db.execute("SELECT n, name FROM _migrations ORDER BY n")]
    assert applied == [(n, m.__name__) for n, m in enumerate(MIGRATIONS)]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    print(f"\n{PROCESSES} processes, {len(rows)} rows ({PROCESSES * (PER_PROCESS + SHARED_RUNS)} filings), "
          f"{wall:.2f} s wall from the common start")


def _result_template(store: Store, tmp_path) -> Result:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    return store.get(store.add(kind="ppl", label="w", model=model, build={}, command=[], metrics={"ppl": 1.0}))


def test_a_sweep_run_is_filed_once_per_study(tmp_path):
    first, second = Store(tmp_path / "r.sqlite"), Store(tmp_path / "r.sqlite")
    template = _result_template(first, tmp_path)
    a = first.add_copy(template, study="s", label="run", metrics={"ppl": 2.0, "sweep_run": "k1"})
    b = second.add_copy(template, study="s", label="run", metrics={"ppl": 3.0, "sweep_run": "k1"})
    assert a == b and second.get(b).metrics["ppl"] == 2.0  # the second finds the first's row
    other = second.add_copy(template, study="t", label="run", metrics={"ppl": 3.0, "sweep_run": "k1"})
    assert other != a  # another study may hold the same run
    assert [r.sweep_run for r in first.results(study="s")] == ["k1"]


def test_sweep_run_migration_keeps_the_first_of_old_duplicates(tmp_path):
    path = tmp_path / "old.sqlite"
    old = connect(path, MIGRATIONS[:2], "results database")  # a database of the previous schema
    row = ("ppl", 0.0, "run", "s", "/m", "0" * 64, 1, "{}", "[]")
    with old:
        for ppl in (1.0, 2.0):
            old.execute("INSERT INTO results (kind, created, label, study, model_path, model_sha256, model_bytes, "
                        "build, command, metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*row, f'{{"ppl": {ppl}, "sweep_run": "k1"}}'))
    old.close()
    store = Store(path)
    first, dup = store.results(study="s")
    assert (first.sweep_run, dup.sweep_run) == ("k1", None)  # both kept; the first holds the key
    template = store.get(first.id)
    assert store.add_copy(template, study="s", label="run", metrics={"ppl": 9.0, "sweep_run": "k1"}) == first.id


def test_a_failed_migration_applies_nothing(tmp_path):
    def m0(db):
        db.executescript("CREATE TABLE a (x TEXT DEFAULT 'p;q'); -- a comment; with semicolons\nCREATE TABLE b (y);")

    def m1(db):
        db.execute("CREATE TABLE c (z)")
        raise sqlite3.OperationalError("disk I/O error")

    path = tmp_path / "d.sqlite"
    connect(path, [m0], "test database").close()
    with pytest.raises(StoreError, match="disk I/O error"):
        connect(path, [m0, m1], "test database")
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"_migrations", "a", "b"}
    assert [r[0] for r in db.execute("SELECT n FROM _migrations")] == [0]


# -- sweep runs being measured: two sweeps of one study at once measure each run once

def _claim_and_wait(db_path: str, keys: list[str], claimed, leave, release: bool) -> None:
    store = Store(db_path)
    store.claim_sweep_runs("s", keys)
    claimed.set()
    leave.wait(60)
    if release:
        store.release_sweep_runs("s", keys)


def test_claims_of_a_live_process_are_left_to_it_and_a_dead_ones_taken_over(tmp_path):
    db = str(tmp_path / "r.sqlite")
    Store(db).close()
    ctx = multiprocessing.get_context("spawn")
    claimed, leave = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_claim_and_wait, args=(db, ["k1", "k2"], claimed, leave, False))
    other.start()
    assert claimed.wait(60)
    store = Store(db)
    mine, elsewhere = store.claim_sweep_runs("s", ["k1", "k2", "k3"])
    assert mine == ["k3"] and elsewhere == {k: f"pid {other.pid} on {socket.gethostname()}" for k in ("k1", "k2")}
    leave.set()
    other.join(30)  # gone without releasing its claims, as a killed sweep would
    assert store.claim_sweep_runs("s", ["k1", "k2", "k3"]) == (["k1", "k2", "k3"], {})
    template = _result_template(store, tmp_path)
    store.add_copy(template, study="s", label="run", metrics={"sweep_run": "k1"})
    store.release_sweep_runs("s", ["k1", "k2", "k3"])
    assert store.claim_sweep_runs("s", ["k1", "k2"]) == (["k2"], {})  # a filed run is nobody's to claim


class _SlowExecutor(FakeExecutor):
    """The fake executor of the sweep tests, taking a while per run as a measurement does."""

    def run(self, runs, setup, on_done, on_progress):
        for run in runs:
            time.sleep(0.3)
            super().run([run], setup, on_done, on_progress)


def _sweeper(tmp: str, start_at: float, out) -> None:
    tmp_path = Path(tmp)
    store = open_store()
    sweep, runs = _plan(tmp_path, store)
    executor = _SlowExecutor(tmp_path / "m.gguf")
    time.sleep(max(0.0, start_at - time.time()))
    outcome = run_sweep(sweep, runs, WorkerSetup(home=tmp, build=BUILD, corpus=tmp), store, executor)
    out.put((executor.executed, outcome.ran, outcome.failed, outcome.skipped))


def test_two_sweeps_of_one_file_at_once_measure_each_run_once(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [ctx.Process(target=_sweeper, args=(str(tmp_path), start_at, out)) for _ in range(2)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    executed = [k for r in reports for k in r[0]]
    assert len(executed) == len(set(executed)) == 4  # each of the four runs measured by one sweep
    for _, ran, failed, skipped in reports:  # the other sweep says who measures what it left
        assert len(ran) + len(failed) + skipped == 4
        assert all("another sweep of this study is measuring it (pid " in m for m in failed.values())
    stored = [r for r in open_store().results(study="tiny") if r.kind == "ppl"]
    assert sorted(r.sweep_run for r in stored) == sorted(executed)


def test_a_database_answering_locked_without_waiting_is_opened_again(tmp_path, monkeypatch):
    """SQLite answers "database is locked" at once, without the busy wait, where waiting could deadlock (eight
    processes opening one new database under load: one failed the load test above in a clean-clone run). The
    open is tried again until the busy timeout instead of failing the measurement."""
    real = sqlite3.connect
    refusals = [2]

    class Refusing(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and refusals[0] > 0:
                refusals[0] -= 1
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real(*a, factory=Refusing, **kw))
    db = connect(tmp_path / "r.sqlite", MIGRATIONS, "results database")
    assert refusals == [0] and db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    # other errors still end at once, in one line
    (tmp_path / "bad.sqlite").write_bytes(b"not a database" * 100)
    monkeypatch.setattr(sqlite3, "connect", real)
    with pytest.raises(StoreError, match="cannot use results database .*bad.sqlite"):
        connect(tmp_path / "bad.sqlite", MIGRATIONS, "results database")
