"""lacq's home cache: file hashes (by size and mtime) and the artifacts lacq produced, by cache key.

It lives in lacq's home, apart from the results, so a study in another
database still reuses quantized files, logits and prepared trees.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

from lacq.errors import StoreError
from lacq.fsutil import file_sha256

Migration = Callable[[sqlite3.Connection], None]


def connect(path: Path, migrations: list[Migration], what: str) -> sqlite3.Connection:
    """Open a lacq SQLite database and apply the migrations it has not seen, in order.

    `_migrations` records each applied migration by its position in the list and its name.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (n INTEGER PRIMARY KEY, applied REAL)")
        columns = {r[1] for r in db.execute("PRAGMA table_info(_migrations)")}
        if "name" not in columns:  # databases made before migrations had names
            db.execute("ALTER TABLE _migrations ADD COLUMN name TEXT")
        done = {r[0] for r in db.execute("SELECT n FROM _migrations")}
        for n, migration in enumerate(migrations):
            if n in done:
                continue
            with db:
                migration(db)
                db.execute("INSERT INTO _migrations (n, applied, name) VALUES (?, ?, ?)",
                           (n, time.time(), migration.__name__))
        return db
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot use {what} {path}: {exc}") from None


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
