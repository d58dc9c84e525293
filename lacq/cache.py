"""lacq's home cache: file hashes (by size and mtime) and the artifacts lacq produced, by cache key.

It lives in lacq's home, apart from the results, so a study in another
database still reuses quantized files, logits and prepared trees.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Callable

from lacq.errors import StoreError
from lacq.fsutil import file_sha256

Migration = Callable[[sqlite3.Connection], None]


# Seconds a connection waits for another process's write lock before giving up: a sweep's driver,
# a measurement and a report may share one database, and migrations of a new one queue behind each other.
BUSY_TIMEOUT_S = 60.0


def connect(path: Path, migrations: list[Migration], what: str) -> sqlite3.Connection:
    """Open a lacq SQLite database (WAL journal) and apply the migrations it has not seen, in order.

    `_migrations` records each applied migration by its position in the list and its name.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    for attempt in itertools.count():
        db = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
            db.row_factory = sqlite3.Row
            # WAL: readers never block the writer nor it them, so processes filing results at once only queue
            # for the short write itself.
            db.execute("PRAGMA journal_mode=WAL")
            if not _all_applied(db, migrations):
                _migrate(db, migrations)
            return db
        except sqlite3.OperationalError as exc:
            if db is not None:
                db.close()
            # SQLite answers "locked" at once, without its busy wait, where waiting could deadlock (several
            # processes opening one new database, switching it to WAL and migrating it together): open again.
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise StoreError(f"cannot use {what} {path}: {exc}") from None
            time.sleep(min(1.0, 0.02 * 2 ** min(attempt, 6)) * (0.5 + random.random()))
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            raise StoreError(f"cannot use {what} {path}: {exc}") from None
    raise AssertionError("unreachable")


def _all_applied(db: sqlite3.Connection, migrations: list[Migration]) -> bool:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'").fetchone():
        return False
    return {r[0] for r in db.execute("SELECT n FROM _migrations")} >= set(range(len(migrations)))


def _migrate(db: sqlite3.Connection, migrations: list[Migration]) -> None:
    """Apply the missing migrations in one IMMEDIATE transaction: two processes opening a new database at
    once take turns, and the second finds the first's migrations recorded instead of applying them again."""
    db.isolation_level = None  # explicit BEGIN/COMMIT; restored for the callers' implicit transactions
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS _migrations (n INTEGER PRIMARY KEY, applied REAL)")
            columns = {r[1] for r in db.execute("PRAGMA table_info(_migrations)")}
            if "name" not in columns:  # databases made before migrations had names
                db.execute("ALTER TABLE _migrations ADD COLUMN name TEXT")
            done = {r[0] for r in db.execute("SELECT n FROM _migrations")}
            for n, migration in enumerate(migrations):
                if n in done:
                    continue
                migration(_InTransaction(db))
                db.execute("INSERT INTO _migrations (n, applied, name) VALUES (?, ?, ?)",
                           (n, time.time(), migration.__name__))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.isolation_level = ""


class _InTransaction:
    """The connection as a migration sees it: `executescript` would COMMIT the open transaction first
    (and release the lock), so scripts run here statement by statement inside it."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __getattr__(self, name: str):
        return getattr(self._db, name)

    def executescript(self, script: str) -> None:
        statement, parts = "", script.split(";")
        for i, part in enumerate(parts):
            statement += part + (";" if i < len(parts) - 1 else "")
            if sqlite3.complete_statement(statement):  # not a ';' inside a string or a comment
                self._db.execute(statement)
                statement = ""
        if statement.strip():
            self._db.execute(statement)


def m001_cache(db: sqlite3.Connection) -> None:
    db.executescript("""
    CREATE TABLE file_hashes (
        path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
    );
    CREATE TABLE artifacts (
        key TEXT PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL, info TEXT
    );
    """)


# Append-only: never edit a migration that has shipped; add a new one.
CACHE_MIGRATIONS: list[Migration] = [m001_cache]


class Cache:
    """File hashes (by size and mtime) and the artifacts lacq produced, keyed by cache key."""

    @classmethod
    def open(cls) -> "Cache":
        """The cache of lacq's home."""
        from lacq import paths
        return cls(paths.home() / "cache.sqlite")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = connect(self.path, CACHE_MIGRATIONS, "cache database")
        self._stand_ins: dict[str, str] = {}  # path -> the hash it answers to, while `stand_in` holds
        self._stand_in_info: dict[str, dict] = {}  # path -> what made it (artifact_info), while `stand_in` holds

    @contextlib.contextmanager
    def stand_in(self, path: Path, digest: str, info: dict | None = None):
        """Within: `path` hashes to `digest` (the hash of the recipe that determines its bytes), without
        reading it or keeping its path in the cache, and `artifact_info` answers `info` for it. For temporary
        files such as a scan's assembled variants: hashing each in full is slow, and their rows would outlive
        the files."""
        key = os.path.abspath(path)
        self._stand_ins[key] = digest
        self._stand_in_info[key] = info or {}
        try:
            yield
        finally:
            self._stand_ins.pop(key, None)
            self._stand_in_info.pop(key, None)

    # -- file hashes (cached by size and mtime, so a 270 MB model hashes once)
    def sha256(self, path: Path) -> str:
        return self.sha256_many([Path(path).resolve()])[0]

    def sha256_many(self, files: list[Path]) -> list[str]:
        """sha256 of each file, reading only those whose size or mtime changed; one transaction."""
        keys = [os.path.abspath(f) for f in files]  # callers pass resolved trees; resolving each file is slow
        known = {}
        stored = [k for k in keys if k not in self._stand_ins]
        for i in range(0, len(stored), 500):  # SQLite's host-parameter limit
            chunk = stored[i:i + 500]
            rows = self.db.execute(f"SELECT path, size, mtime_ns, sha256 FROM file_hashes WHERE path IN "
                                   f"({','.join('?' * len(chunk))})", chunk)
            known.update({r["path"]: (r["size"], r["mtime_ns"], r["sha256"]) for r in rows})
        out, fresh = [], []
        for key in keys:
            if key in self._stand_ins:
                out.append(self._stand_ins[key])
                continue
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

    def artifact_info(self, path: Path, sha256: str) -> dict:
        """What lacq recorded when it made the file at `path` with these bytes ({} if it did not make it)."""
        if self._stand_ins.get(os.path.abspath(path)) == sha256:
            return self._stand_in_info[os.path.abspath(path)]
        row = self.db.execute("SELECT info FROM artifacts WHERE path = ? AND sha256 = ? ORDER BY created DESC",
                              (str(Path(path).resolve()), sha256)).fetchone()
        return json.loads(row["info"] or "{}") if row else {}

    def record_artifact(self, key: str, path: Path, info: dict | None = None) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)",
                            (key, str(Path(path).resolve()), self.sha256(path), time.time(), json.dumps(info or {})))
