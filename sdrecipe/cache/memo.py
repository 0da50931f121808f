"""The memo of file hashes: input fingerprints and output content digests,
remembered by file stat so that an unchanged file is never read again."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sdrecipe.cache.index import transaction
from sdrecipe.cache.layout import is_digest
from sdrecipe.io.fingerprint import FileStat, Fingerprint, sha256_of

# What the index remembers of a file by its stat: each memo's table and column.
SHA256 = "sha256"
DIGEST = "content digest"
_MEMOS = {SHA256: ("files", "sha256"), DIGEST: ("content_digests", "digest")}


class FileMemo:
    """The values of files the index `db` remembers by stat."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def known(self, memo: str, path: Path, stat: FileStat) -> str | None:
        """The `memo` (SHA256 or DIGEST) recorded for `path` if its stat is unchanged
        (and it is a digest: the index is not trusted to name files)."""
        table, column = _MEMOS[memo]
        row = self.db.execute(
            f"SELECT {column} FROM {table} WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
            (str(path.resolve()), stat.size, stat.mtime_ns, stat.inode),
        ).fetchone()
        return row[0] if row and is_digest(row[0]) else None

    def remember(self, memo: str, path: Path, stat: FileStat, value: str) -> None:
        """Record `path`'s `memo` (SHA256 or DIGEST) against its stat."""
        with transaction(self.db) as db:
            db.execute(
                f"INSERT OR REPLACE INTO {_MEMOS[memo][0]} VALUES (?, ?, ?, ?, ?)",
                (str(path.resolve()), stat.size, stat.mtime_ns, stat.inode, value),
            )

    def known_fingerprint(self, path: Path, stat: FileStat) -> Fingerprint | None:
        """The fingerprint of `path` if it was taken with the same stat."""
        sha256 = self.known(SHA256, path, stat)
        row = (
            sha256
            and self.db.execute(
                "SELECT legacy, tensors FROM fingerprints WHERE sha256=?", (sha256,)
            ).fetchone()
        )
        if not row:
            return None
        return Fingerprint(sha256=sha256, legacy=row[0], tensors=json.loads(row[1]))

    def remember_fingerprint(self, path: Path, stat: FileStat, fingerprint: Fingerprint) -> None:
        """Record `path`'s fingerprint (and so its sha256) against its stat."""
        with transaction(self.db) as db:
            db.execute(
                "INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?)",
                (fingerprint.sha256, fingerprint.legacy, json.dumps(fingerprint.tensors)),
            )
        self.remember(SHA256, path, stat, fingerprint.sha256)


class Remembers(Protocol):
    """What remembers values of files by stat: a `FileMemo`, or the `Cache`."""

    def known(self, memo: str, path: Path, stat: FileStat) -> str | None: ...

    def remember(self, memo: str, path: Path, stat: FileStat, value: str) -> None: ...


def file_sha256(path: Path, cache: Remembers | None) -> str:
    """The sha256 of a file, remembered by stat in the cache (when there is one)."""
    return _remembered(SHA256, sha256_of, path, cache)


def output_digest(path: Path, cache: Remembers | None) -> str:
    """An output's content digest, remembered by stat in the cache (when there is
    one); reading the file imports torch."""
    return _remembered(DIGEST, _read_output_digest, path, cache)


def _read_output_digest(path: Path) -> str:
    from sdrecipe.io.safetensors_reader import output_digest as read_digest

    return read_digest(path)


def _remembered(
    memo: str, compute: Callable[[Path], str], path: Path, cache: Remembers | None
) -> str:
    stat = FileStat.of(path)
    known = cache.known(memo, path, stat) if cache else None
    if known is None:
        known = compute(path)
        if cache is not None:
            cache.remember(memo, path, stat, known)
    return known
