"""The results database: SQLite, append-only migrations, provenance with every row."""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from lacq.cache import Cache, Migration, connect
from lacq.errors import StoreError

log = logging.getLogger(__name__)


def m001_results(db: sqlite3.Connection) -> None:
    db.executescript("""
    CREATE TABLE results (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,              -- ppl | kld | niah | bench
        created REAL NOT NULL,
        label TEXT NOT NULL,             -- what a table row calls this configuration
        study TEXT,                      -- groups rows that belong to one comparison
        model_path TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        model_bytes INTEGER NOT NULL,
        recipe TEXT,
        plan_hash TEXT,
        kv TEXT,                         -- JSON of KvConfig.to_dict()
        corpus_sha256 TEXT,
        ctx INTEGER,
        chunks INTEGER,
        build TEXT NOT NULL,             -- JSON of Build.provenance()
        command TEXT NOT NULL,           -- JSON argv
        env TEXT,                        -- JSON of the environment lacq added
        wall_seconds REAL,
        host TEXT,
        metrics TEXT NOT NULL            -- JSON: the parsed result
    );
    """)


def m002_machine(db: sqlite3.Connection) -> None:
    # JSON: the CPU model and the ggml CPU features the tool reported (its system_info line):
    # the same build flags give different kernels, and slightly different numbers, per CPU.
    db.execute("ALTER TABLE results ADD COLUMN machine TEXT")


def m003_sweep_run(db: sqlite3.Connection) -> None:
    # A sweep run's key (metrics.sweep_run) as a column, unique per study, so that of two sweeps of one
    # file filing the same run, the second finds the first's row instead of adding another. Rows filed
    # before keep their key in metrics; of duplicates already there only the first gets the column.
    db.execute("ALTER TABLE results ADD COLUMN sweep_run TEXT")
    db.execute("""
    UPDATE results SET sweep_run = json_extract(metrics, '$.sweep_run')
    WHERE study IS NOT NULL AND json_valid(metrics) AND json_type(metrics, '$.sweep_run') = 'text'
      AND id = (SELECT min(o.id) FROM results o WHERE o.study = results.study AND json_valid(o.metrics)
                AND json_extract(o.metrics, '$.sweep_run') = json_extract(results.metrics, '$.sweep_run'))
    """)
    db.execute("CREATE UNIQUE INDEX results_sweep_run ON results (study, sweep_run) WHERE sweep_run IS NOT NULL")


def m004_sweep_claims(db: sqlite3.Connection) -> None:
    # Runs a sweep's driver is measuring now, so that a second sweep of the same study leaves them to it.
    db.execute("""
    CREATE TABLE sweep_claims (
        study TEXT NOT NULL, sweep_run TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, claimed REAL NOT NULL,
        PRIMARY KEY (study, sweep_run)
    )""")


def m005_imatrix(db: sqlite3.Connection) -> None:
    # The sha256 of the importance matrix the measured file was quantized with (NULL: none, or not made by lacq).
    db.execute("ALTER TABLE results ADD COLUMN imatrix_sha256 TEXT")


# Append-only: never edit a migration that has shipped; add a new one.
MIGRATIONS: list[Migration] = [m001_results, m002_machine, m003_sweep_run, m004_sweep_claims, m005_imatrix]


@dataclass(frozen=True)
class Result:
    id: int
    kind: str
    created: float
    label: str
    study: str | None
    model_path: str
    model_sha256: str
    model_bytes: int
    recipe: str | None
    plan_hash: str | None
    kv: dict | None
    corpus_sha256: str | None
    ctx: int | None
    chunks: int | None
    build: dict
    command: list
    env: dict | None
    wall_seconds: float | None
    host: str | None
    metrics: dict
    machine: dict | None = None  # {"cpu": model name, "ggml_cpu": [features], "arch": ...}
    sweep_run: str | None = None  # the run's key, for a sweep's result (unique per study)
    imatrix_sha256: str | None = None  # the importance matrix the measured file was quantized with


_JSON_COLUMNS = ("kv", "build", "command", "env", "metrics", "machine")


def latest_by_label(results: list["Result"], kind: str) -> dict[str, "Result"]:
    """The last result of `kind` for each label, in the order labels first appear (results come oldest first)."""
    latest: dict[str, Result] = {}
    for r in results:
        if r.kind == kind:
            latest[r.label] = r
    return latest


class Store:
    """The results database; `cache` is the home's artifact cache."""

    def __init__(self, path: Path, cache: Cache | None = None):
        self.path = Path(path)
        self.db = connect(self.path, MIGRATIONS, "results database")
        self.cache = cache or Cache.open()

    def sha256(self, path: Path) -> str:
        return self.cache.sha256(path)

    # -- results
    def add(self, *, kind: str, label: str, model: Path, build: dict, command: list, metrics: dict,
            study: str | None = None, recipe: str | None = None, plan_hash: str | None = None,
            kv: dict | None = None, corpus: Path | None = None, ctx: int | None = None,
            chunks: int | None = None, env: dict | None = None, wall_seconds: float | None = None,
            machine: dict | None = None) -> int:
        model = Path(model)
        model_sha = self.sha256(model)
        row = dict(kind=kind, created=time.time(), label=label, study=study, model_path=str(model.resolve()),
                   model_sha256=model_sha, model_bytes=model.stat().st_size, recipe=recipe,
                   plan_hash=plan_hash, kv=json.dumps(kv) if kv is not None else None,
                   corpus_sha256=self.sha256(corpus) if corpus else None, ctx=ctx, chunks=chunks,
                   build=json.dumps(build), command=json.dumps(command),
                   env=json.dumps(env) if env else None, wall_seconds=wall_seconds,
                   host=socket.gethostname(), metrics=json.dumps(metrics),
                   machine=json.dumps(machine) if machine is not None else None,
                   # A file lacq quantized with an importance matrix carries its hash into every result.
                   imatrix_sha256=self.cache.artifact_info(model, model_sha).get("imatrix_sha256"))
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.db:
            cur = self.db.execute(f"INSERT INTO results ({cols}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid)

    def add_copy(self, result: Result, *, study: str | None, label: str, metrics: dict) -> int:
        """File a result measured elsewhere (a sweep worker's own database, maybe on another node)
        with its provenance as recorded there; the model need not exist here.

        A sweep run (`metrics["sweep_run"]`, with a study) is filed once: if the study holds that run
        already (another sweep of the same file filed it first), nothing is added and its id is returned.
        """
        row = {k: getattr(result, k) for k in Result.__dataclass_fields__ if k != "id"}
        sweep_run = metrics.get("sweep_run") if study is not None else None
        row.update(study=study, label=label, metrics=metrics, created=time.time(),
                   sweep_run=sweep_run if isinstance(sweep_run, str) else None)
        for c in _JSON_COLUMNS:
            row[c] = json.dumps(row[c]) if row[c] is not None else None
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.db:
            cur = self.db.execute(f"INSERT INTO results ({cols}) VALUES ({marks}) ON CONFLICT (study, sweep_run) "
                                  "WHERE sweep_run IS NOT NULL DO NOTHING", tuple(row.values()))
            if cur.rowcount:
                return int(cur.lastrowid)
            first = self.db.execute("SELECT id FROM results WHERE study = ? AND sweep_run = ?",
                                    (study, row["sweep_run"])).fetchone()
        log.info("sweep run %s of %s was filed already (#%d); this copy dropped", row["sweep_run"], study, first[0])
        return int(first[0])

    # -- sweep runs being measured
    def claim_sweep_runs(self, study: str, keys: list[str]) -> tuple[list[str], dict[str, str]]:
        """Claim the runs of `keys` not yet filed for this process to measure, in one transaction.

        Returns (the keys claimed, {key: who measures it} for those another live process claimed). A claim
        of a process gone from this host is taken over; one from another host is honoured, as its process
        cannot be checked from here. Runs already filed are in neither.
        """
        me = (socket.gethostname(), os.getpid())
        mine, elsewhere = [], {}
        self.db.execute("BEGIN IMMEDIATE")  # no other process claims between our reads and our writes
        try:
            for key in keys:
                if self.db.execute("SELECT 1 FROM results WHERE study = ? AND sweep_run = ?", (study, key)).fetchone():
                    continue
                claim = self.db.execute("SELECT host, pid FROM sweep_claims WHERE study = ? AND sweep_run = ?",
                                        (study, key)).fetchone()
                if claim is not None and (claim["host"], claim["pid"]) != me and _alive(claim["host"], claim["pid"]):
                    elsewhere[key] = f"pid {claim['pid']} on {claim['host']}"
                    continue
                self.db.execute("INSERT OR REPLACE INTO sweep_claims VALUES (?, ?, ?, ?, ?)",
                                (study, key, *me, time.time()))
                mine.append(key)
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        return mine, elsewhere

    def release_sweep_runs(self, study: str, keys: list[str]) -> None:
        """Drop this process's claims of `keys` (filed or not: a run not filed may be claimed again)."""
        host, pid = socket.gethostname(), os.getpid()
        with self.db:
            self.db.executemany("DELETE FROM sweep_claims WHERE study = ? AND sweep_run = ? AND host = ? AND pid = ?",
                                [(study, key, host, pid) for key in keys])

    def get(self, result_id: int) -> Result:
        row = self.db.execute("SELECT * FROM results WHERE id = ?", (result_id,)).fetchone()
        if row is None:
            raise StoreError(f"no result #{result_id} in {self.path}")
        return _result(row)

    def results(self, kind: str | None = None, study: str | None = None) -> list[Result]:
        sql, args = "SELECT * FROM results WHERE 1=1", []
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        if study:
            sql += " AND study = ?"
            args.append(study)
        return [_result(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def close(self) -> None:
        self.db.close()
        self.cache.db.close()


def _alive(host: str, pid: int) -> bool:
    """Whether a claim's process may still run: on another host it cannot be told, so yes."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _result(row: sqlite3.Row) -> Result:
    d = dict(row)
    for c in _JSON_COLUMNS:
        d[c] = json.loads(d[c]) if d[c] is not None else None
    return Result(**d)


def open_store(path: Path | None = None) -> Store:
    from lacq import paths
    return Store(Path(path) if path else Path(os.environ.get("LACQ_DB") or paths.default_db()))
