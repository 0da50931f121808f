"""The cache's index, `index.sqlite`: what each tensor identity maps to, the
remembered fingerprints of input files and content digests of outputs (by
stat), use times, the statistics of the last build and the cache's settings.

It is only a memo: a damaged index is moved aside and started afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT
);
CREATE TABLE IF NOT EXISTS fingerprints (sha256 TEXT PRIMARY KEY, legacy TEXT, tensors TEXT);
CREATE TABLE IF NOT EXISTS content_digests (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, digest TEXT
);
CREATE TABLE IF NOT EXISTS refs (
    identity TEXT PRIMARY KEY, kind TEXT, entry TEXT, key TEXT, digest TEXT
);
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT, name TEXT, size INTEGER, last_used REAL, output_key TEXT,
    PRIMARY KEY (kind, name)
);
CREATE INDEX IF NOT EXISTS entries_by_output ON entries (output_key);
CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT);
"""


def open_index(root: Path, notify: Callable[[str], None]) -> sqlite3.Connection:
    """Open the index of the cache folder `root`; a damaged one is only a memo, so
    it is moved aside with a notice and started afresh (unindexed entries are
    collected by gc)."""
    # Switching to WAL can fail at once when two processes open a new index
    # together, so opening is serialised by its own short lock.
    with _file_lock(root / ".open.lock"):
        path = root / "index.sqlite"
        try:
            return _connect(path)
        except sqlite3.DatabaseError as exc:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = path.with_name(f"index.sqlite.damaged-{stamp}-{os.getpid()}")
            for suffix in ("", "-wal", "-shm"):
                damaged = Path(f"{path}{suffix}")
                if damaged.exists():
                    os.replace(damaged, Path(f"{aside}{suffix}"))
            notify(
                f"the cache index {path} was damaged ({exc}); moved it to {aside.name} and "
                "started a new one (cached tensors are recomputed as needed)"
            )
            return _connect(path)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction on the index `db`."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    """Open the index and check it; sqlite3.DatabaseError if it is damaged."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        (verdict,) = db.execute("PRAGMA quick_check").fetchone()
        if verdict != "ok":
            raise sqlite3.DatabaseError(verdict)
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held for the `with` block."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
