"""The results database: SQLite, append-only migrations, provenance with every row."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from lacq.errors import StoreError
from lacq.fsutil import file_sha256

# Append-only: never edit a migration that has shipped; add a new one.
MIGRATIONS = [
    """
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
    """,
]

# The cache of file hashes and produced artifacts lives in lacq's home, apart
# from the results, so a study in another database still reuses quantized files.
CACHE_MIGRATIONS = [
    """
    CREATE TABLE file_hashes (
        path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
    );
    CREATE TABLE artifacts (
        key TEXT PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL, info TEXT
    );
    """,
]


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


_JSON_COLUMNS = ("kv", "build", "command", "env", "metrics")


def _connect(path: Path, migrations: list[str], what: str) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (n INTEGER PRIMARY KEY, applied REAL)")
        done = {r[0] for r in db.execute("SELECT n FROM _migrations")}
        for n, sql in enumerate(migrations):
            if n in done:
                continue
            with db:
                db.executescript(sql)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (n, time.time()))
        return db
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot use {what} {path}: {exc}") from None


def latest_by_label(results: list["Result"], kind: str) -> dict[str, "Result"]:
    """The last result of `kind` for each label, in the order labels first appear (results come oldest first)."""
    latest: dict[str, Result] = {}
    for r in results:
        if r.kind == kind:
            latest[r.label] = r
    return latest


class Cache:
    """File hashes (by size and mtime) and the artifacts lacq produced, keyed by cache key."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = _connect(self.path, CACHE_MIGRATIONS, "cache database")

    # -- file hashes (cached by size and mtime, so a 270 MB model hashes once)
    def sha256(self, path: Path) -> str:
        return self.sha256_many([Path(path).resolve()])[0]

    def sha256_many(self, files: list[Path]) -> list[str]:
        """sha256 of each file, reading only those whose size or mtime changed; one transaction."""
        keys = [os.path.abspath(f) for f in files]  # callers pass resolved trees; resolving each file is slow
        known = {}
        for i in range(0, len(keys), 500):  # SQLite's host-parameter limit
            chunk = keys[i:i + 500]
            rows = self.db.execute(f"SELECT path, size, mtime_ns, sha256 FROM file_hashes WHERE path IN "
                                   f"({','.join('?' * len(chunk))})", chunk)
            known.update({r["path"]: (r["size"], r["mtime_ns"], r["sha256"]) for r in rows})
        out, fresh = [], []
        for key in keys:
            st = os.stat(key)
            row = known.get(key)
            if row and row[:2] == (st.st_size, st.st_mtime_ns):
                out.append(row[2])
            else:
                out.append(file_sha256(Path(key)))
                fresh.append((key, st.st_size, st.st_mtime_ns, out[-1]))
        if fresh:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", fresh)
        return out

    # -- artifacts (quantized models, logits files) keyed by a cache key
    def artifact(self, key: str) -> Path | None:
        row = self.db.execute("SELECT path, sha256 FROM artifacts WHERE key = ?", (key,)).fetchone()
        if not row:
            return None
        path = Path(row["path"])
        if path.exists() and self.sha256(path) == row["sha256"]:
            return path
        return None

    def record_artifact(self, key: str, path: Path, info: dict | None = None) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)",
                            (key, str(Path(path).resolve()), self.sha256(path), time.time(), json.dumps(info or {})))



class Store:
    """The results database; `cache` is the home's artifact cache."""

    def __init__(self, path: Path, cache: Cache | None = None):
        from lacq import paths
        self.path = Path(path)
        self.db = _connect(self.path, MIGRATIONS, "results database")
        self.cache = cache or Cache(paths.home() / "cache.sqlite")

    def sha256(self, path: Path) -> str:
        return self.cache.sha256(path)

    # -- results
    def add(self, *, kind: str, label: str, model: Path, build: dict, command: list, metrics: dict,
            study: str | None = None, recipe: str | None = None, plan_hash: str | None = None,
            kv: dict | None = None, corpus: Path | None = None, ctx: int | None = None,
            chunks: int | None = None, env: dict | None = None, wall_seconds: float | None = None) -> int:
        model = Path(model)
        row = dict(kind=kind, created=time.time(), label=label, study=study, model_path=str(model.resolve()),
                   model_sha256=self.sha256(model), model_bytes=model.stat().st_size, recipe=recipe,
                   plan_hash=plan_hash, kv=json.dumps(kv) if kv is not None else None,
                   corpus_sha256=self.sha256(corpus) if corpus else None, ctx=ctx, chunks=chunks,
                   build=json.dumps(build), command=json.dumps(command),
                   env=json.dumps(env) if env else None, wall_seconds=wall_seconds,
                   host=socket.gethostname(), metrics=json.dumps(metrics))
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.db:
            cur = self.db.execute(f"INSERT INTO results ({cols}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid)

    def results(self, kind: str | None = None, study: str | None = None) -> list[Result]:
        sql, args = "SELECT * FROM results WHERE 1=1", []
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        if study:
            sql += " AND study = ?"
            args.append(study)
        out = []
        for r in self.db.execute(sql + " ORDER BY id", args):
            d = dict(r)
            for c in _JSON_COLUMNS:
                d[c] = json.loads(d[c]) if d[c] is not None else None
            out.append(Result(**d))
        return out

    def close(self) -> None:
        self.db.close()
        self.cache.db.close()


def open_store(path: Path | None = None) -> Store:
    from lacq import paths
    return Store(Path(path) if path else Path(os.environ.get("LACQ_DB") or paths.default_db()))
