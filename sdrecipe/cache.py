"""The content-addressed tensor store in `cache/`.

Layout:
- `objects/ab/<digest>.safetensors`: one computed intermediate tensor each,
  named by its blake3 digest, so identical tensors are stored once.
- `packs/<sha256>.safetensors`: finished outputs, hard-linked (copied only
  across file systems), so caching an output costs no extra write.
- `index.sqlite`: what each tensor identity maps to, the remembered
  fingerprints of input files and the stat of outputs, use times, and the
  statistics of the last build.

Every entry is written to a temporary file and renamed into place, and every
read is checked against its digest: a corrupt entry is reported, discarded and
recomputed, never used. Builds sharing a cache are serialised by a file lock.

The index part imports no torch, so an up-to-date build decides in a blink;
the tensor readers and writers are imported where tensors are touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdrecipe.errors import BuildError
from sdrecipe.fingerprint import FileStat, Fingerprint, sha256_of, tensor_digest
from sdrecipe.io.atomic import is_stale_temporary, temporary_path
from sdrecipe.io.tensor_info import TensorInfo

if TYPE_CHECKING:
    from sdrecipe.io.safetensors_reader import SafetensorsReader

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT
);
CREATE TABLE IF NOT EXISTS fingerprints (sha256 TEXT PRIMARY KEY, legacy TEXT, tensors TEXT);
CREATE TABLE IF NOT EXISTS refs (
    identity TEXT PRIMARY KEY, kind TEXT, entry TEXT, key TEXT, digest TEXT
);
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT, name TEXT, size INTEGER, last_used REAL, output_key TEXT,
    PRIMARY KEY (kind, name)
);
CREATE INDEX IF NOT EXISTS entries_by_output ON entries (output_key);
CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, value TEXT);
"""

OBJECT = "object"
PACK = "pack"


@dataclass(frozen=True)
class Location:
    """Where a cached tensor is: an object file, or a key inside a pack."""

    kind: str
    entry: str
    key: str
    digest: str


class CorruptEntry(Exception):
    """A cache entry failed verification; `location` says which."""

    def __init__(self, location: Location, path: Path):
        super().__init__(f"cache entry {path} ({location.key}) is corrupt; discarded")
        self.location = location


class Cache:
    """A cache directory. Use `with cache.locked():` around anything that writes."""

    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.packs = root / "packs"
        try:
            for folder in (self.objects, self.packs):
                folder.mkdir(parents=True, exist_ok=True)
            # Switching to WAL can fail at once when two processes open a new
            # index together, so opening is serialised by its own short lock.
            with _file_lock(root / ".open.lock"):
                self.db = sqlite3.connect(root / "index.sqlite", timeout=60, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise BuildError(f"cannot open the cache: {exc}", root) from None
        self._readers: dict[Path, SafetensorsReader] = {}

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the cache's exclusive lock (waits for another build to finish)."""
        return _file_lock(self.root / ".lock")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the index."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- files: input fingerprints and output hashes, remembered by stat -----------

    def known_sha256(self, path: Path, stat: FileStat) -> str | None:
        """The sha256 recorded for `path` if its stat is unchanged."""
        row = self.db.execute(
            "SELECT sha256 FROM files WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
            (str(path.resolve()), stat.size, stat.mtime_ns, stat.inode),
        ).fetchone()
        return row[0] if row else None

    def known_fingerprint(self, path: Path, stat: FileStat) -> Fingerprint | None:
        """The fingerprint of `path` if it was taken with the same stat."""
        sha256 = self.known_sha256(path, stat)
        row = (
            sha256
            and self.db.execute(
                "SELECT legacy, tensors FROM fingerprints WHERE sha256=?", (sha256,)
            ).fetchone()
        )
        if not row:
            return None
        return Fingerprint(sha256=sha256, legacy=row[0], tensors=json.loads(row[1]))

    def remember_file(
        self, path: Path, stat: FileStat, sha256: str, fingerprint: Fingerprint | None = None
    ) -> None:
        """Record `path`'s hash (and fingerprint) against its stat."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                (str(path.resolve()), stat.size, stat.mtime_ns, stat.inode, sha256),
            )
            if fingerprint is not None:
                db.execute(
                    "INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?)",
                    (sha256, fingerprint.legacy, json.dumps(fingerprint.tensors)),
                )

    # --- tensors ------------------------------------------------------------------------

    def lookup(self, identities: Iterable[str]) -> dict[str, Location]:
        """The cached location of each identity that has one."""
        found: dict[str, Location] = {}
        pending = list(identities)
        for start in range(0, len(pending), 500):
            batch = pending[start : start + 500]
            marks = ",".join("?" * len(batch))
            for row in self.db.execute(
                f"SELECT identity, kind, entry, key, digest FROM refs WHERE identity IN ({marks})",
                batch,
            ):
                found[row[0]] = Location(*row[1:])
        return found

    def _entry_path(self, kind: str, name: str) -> Path:
        if kind == OBJECT:
            return self.objects / name[:2] / f"{name}.safetensors"
        return self.packs / f"{name}.safetensors"

    def open_entry(self, location: Location) -> tuple[SafetensorsReader, str]:
        """A reader and key for a cached tensor, after checking its digest.

        Safe to call from worker threads: it reads files only. Raises CorruptEntry
        if the data does not match; the caller then `discard`s the entry.
        """
        from sdrecipe.io.safetensors_reader import SafetensorsReader

        path = self._entry_path(location.kind, location.entry)
        try:
            reader = self._readers.get(path) or SafetensorsReader(path)
            info = reader.info(location.key)
            ok = tensor_digest(info, [reader.raw(location.key)]) == location.digest
        except Exception:
            ok = False
        if not ok:
            raise CorruptEntry(location, path)
        self._readers[path] = reader
        return reader, location.key

    def discard(self, location: Location) -> None:
        """Delete an entry's file and everything that refers to it."""
        self._readers.pop(self._entry_path(location.kind, location.entry), None)
        self._entry_path(location.kind, location.entry).unlink(missing_ok=True)
        with self.transaction() as db:
            db.execute("DELETE FROM refs WHERE kind=? AND entry=?", (location.kind, location.entry))
            db.execute(
                "DELETE FROM entries WHERE kind=? AND name=?", (location.kind, location.entry)
            )

    def object_writer(self, info: TensorInfo) -> ObjectWriter:
        """A writer for one new object; name it with `finish(digest)`."""
        return ObjectWriter(self, info)

    def add_objects(self, objects: Iterable[tuple[str, Location, int]]) -> None:
        """Register new objects (identity, location, size) and their refs."""
        objects = list(objects)
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, NULL)",
                [(OBJECT, location.entry, size, now) for _, location, size in objects],
            )
        self.add_refs((identity, location) for identity, location, _ in objects)

    def add_refs(self, refs: Iterable[tuple[str, Location]]) -> None:
        """Record identity → location for many tensors, and mark their entries used."""
        now = time.time()
        with self.transaction() as db:
            for identity, location in refs:
                db.execute(
                    "INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?, ?)",
                    (identity, location.kind, location.entry, location.key, location.digest),
                )
                db.execute(
                    "UPDATE entries SET last_used=? WHERE kind=? AND name=?",
                    (now, location.kind, location.entry),
                )

    def touch(self, locations: Iterable[Location]) -> None:
        """Mark entries as just used (for least-recently-used collection)."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE entries SET last_used=? WHERE kind=? AND name=?",
                {(now, loc.kind, loc.entry) for loc in locations},
            )

    # --- packs: whole outputs ----------------------------------------------------------

    def add_pack(self, output: Path, sha256: str, output_key: str) -> str:
        """Link a finished output into the cache (copy across file systems)."""
        target = self._entry_path(PACK, sha256)
        if not target.exists():
            temporary = temporary_path(target, unique=True)
            try:
                os.link(output, temporary)
            except OSError:
                shutil.copyfile(output, temporary)
            os.replace(temporary, target)
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                (PACK, sha256, target.stat().st_size, time.time(), output_key),
            )
        return sha256

    def find_pack(self, output_key: str) -> Path | None:
        """A cached output whose key is `output_key`, if there is one."""
        row = self.db.execute(
            "SELECT name FROM entries WHERE kind=? AND output_key=?", (PACK, output_key)
        ).fetchone()
        path = row and self._entry_path(PACK, row[0])
        return path if path and path.exists() else None

    # --- statistics and maintenance ---------------------------------------------------

    def record_stats(self, stats: dict[str, object]) -> None:
        """Keep the statistics of the last build."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stats VALUES ('last_build', ?)", (json.dumps(stats),)
            )

    def info(self) -> dict[str, object]:
        """Size, entry counts and the last build's hit statistics."""
        counts = dict(
            self.db.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind").fetchall()
        )
        size = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
        refs = self.db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
        row = self.db.execute("SELECT value FROM stats WHERE name='last_build'").fetchone()
        return {
            "path": str(self.root),
            "size": size,
            "objects": counts.get(OBJECT, 0),
            "packs": counts.get(PACK, 0),
            "tensors": refs,
            "last_build": json.loads(row[0]) if row else None,
        }

    def gc(self, max_size: int) -> dict[str, int]:
        """Delete least recently used entries until the cache holds at most `max_size` bytes."""
        rows = self.db.execute(
            "SELECT kind, name, size FROM entries ORDER BY last_used DESC"
        ).fetchall()
        kept = 0
        removed = freed = 0
        for kind, name, size in rows:
            if kept + size <= max_size:
                kept += size
                continue
            self.discard(Location(kind, name, "", ""))
            removed += 1
            freed += size
        self._remove_orphans()
        return {"removed": removed, "freed": freed, "size": kept}

    def _remove_orphans(self) -> None:
        """Delete files the index does not know (e.g. left by a killed build)."""
        known = {
            self._entry_path(kind, name)
            for kind, name in self.db.execute("SELECT kind, name FROM entries")
        }
        for path in [*self.objects.glob("*"), *self.objects.glob("*/*"), *self.packs.glob("*")]:
            temporary = path.name.endswith(".tmp")
            if path.is_file() and path not in known and (not temporary or is_stale_temporary(path)):
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every entry and forget every remembered hash."""
        with self.transaction() as db:
            for table in ("files", "fingerprints", "refs", "entries", "stats"):
                db.execute(f"DELETE FROM {table}")
        shutil.rmtree(self.objects, ignore_errors=True)
        shutil.rmtree(self.packs, ignore_errors=True)
        self.objects.mkdir()
        self.packs.mkdir()


def file_sha256(path: Path, cache: Cache | None) -> str:
    """The sha256 of a file, remembered by stat in the cache (when there is one)."""
    stat = FileStat.of(path)
    known = cache.known_sha256(path, stat) if cache else None
    if known is None:
        known = sha256_of(path)
        if cache is not None:
            cache.remember_file(path, stat, known)
    return known


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held for the `with` block."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ObjectWriter:
    """Streams one tensor into a new object; `finish` names it by its digest."""

    def __init__(self, cache: Cache, info: TensorInfo):
        from sdrecipe.io.safetensors_writer import SafetensorsWriter

        self.cache = cache
        self.info = info
        self._writer = SafetensorsWriter(
            cache.objects / "object", {"tensor": info}, {}, unique_temporary=True
        )

    def write(self, data: memoryview | bytes, start: int) -> None:
        """Write bytes of the tensor, beginning `start` bytes into its data."""
        self._writer.write("tensor", data, start)

    def finish(self, digest: str) -> tuple[Location, int]:
        """Publish the object under its digest; return where it is and its size.

        Files only: the caller registers it with `Cache.add_objects`.
        """
        target = self.cache._entry_path(OBJECT, digest)
        target.parent.mkdir(exist_ok=True)
        self._writer.commit(target)
        return Location(OBJECT, digest, "tensor", digest), self._writer.size

    def abort(self) -> None:
        """Discard the unfinished object."""
        self._writer.abort()
