"""The object store: computed intermediate tensors, each in its own object file
named by its digest, and the refs that map tensor identities to them (or to a
key inside a pack). Every read is checked against its digest: a corrupt entry
is reported, discarded and recomputed, never used."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sdrecipe.cache.index import transaction
from sdrecipe.cache.layout import OBJECT, Layout, Location, is_location
from sdrecipe.io.fingerprint import tensor_digest
from sdrecipe.io.tensor_info import TensorInfo

if TYPE_CHECKING:
    from sdrecipe.io.safetensors_reader import SafetensorsReader


class CorruptEntry(Exception):
    """A cache entry failed verification; `location` says which."""

    def __init__(self, location: Location, path: Path):
        super().__init__(f"cache entry {path} ({location.key}) is corrupt; discarded")
        self.location = location


class ObjectStore:
    """The tensors of the cache folder `layout`, indexed in `db`."""

    def __init__(self, db: sqlite3.Connection, layout: Layout):
        self.db = db
        self.layout = layout
        self._readers: dict[Path, SafetensorsReader] = {}

    def lookup(self, identities: Iterable[str]) -> dict[str, Location]:
        """The cached location of each identity that has one (rows that name no
        entry the cache could have written are not locations)."""
        found: dict[str, Location] = {}
        pending = list(identities)
        for start in range(0, len(pending), 500):
            batch = pending[start : start + 500]
            marks = ",".join("?" * len(batch))
            for row in self.db.execute(
                f"SELECT identity, kind, entry, key, digest FROM refs WHERE identity IN ({marks})",
                batch,
            ):
                location = Location(*row[1:])
                if is_location(location):
                    found[row[0]] = location
        return found

    def open_entry(self, location: Location) -> tuple[SafetensorsReader, str]:
        """A reader and key for a cached tensor, after checking its digest.

        Safe to call from worker threads: it reads files only. Raises CorruptEntry
        if the data does not match; the caller then `discard`s the entry.
        """
        from sdrecipe.io.safetensors_reader import SafetensorsReader

        path = self.layout.entry_path(location.kind, location.entry)
        try:
            reader = self._readers.get(path) or SafetensorsReader(path)
            info = reader.info(location.key)
            ok = tensor_digest(info, [reader.raw(location.key)]) == location.digest
        except Exception:
            ok = False
        if not ok:
            # Removed at once, so that a recomputed copy can take its name.
            self._readers.pop(path, None)
            path.unlink(missing_ok=True)
            raise CorruptEntry(location, path)
        self._readers[path] = reader
        return reader, location.key

    def discard(self, location: Location) -> None:
        """Delete an entry's file and everything that refers to it."""
        self._readers.pop(self.layout.entry_path(location.kind, location.entry), None)
        self.layout.entry_path(location.kind, location.entry).unlink(missing_ok=True)
        self.forget(location)

    def forget(self, location: Location) -> None:
        """Drop an entry and every reference to it from the index (not its file)."""
        with transaction(self.db) as db:
            db.execute("DELETE FROM refs WHERE kind=? AND entry=?", (location.kind, location.entry))
            db.execute(
                "DELETE FROM entries WHERE kind=? AND name=?", (location.kind, location.entry)
            )

    def add_objects(self, objects: Iterable[tuple[str, Location, int]]) -> None:
        """Register new objects (identity, location, size) and their refs."""
        objects = list(objects)
        now = time.time()
        with transaction(self.db) as db:
            db.executemany(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, NULL)",
                [(OBJECT, location.entry, size, now) for _, location, size in objects],
            )
        self.add_refs((identity, location) for identity, location, _ in objects)

    def add_refs(self, refs: Iterable[tuple[str, Location]]) -> None:
        """Record identity → location for many tensors, and mark their entries used."""
        now = time.time()
        with transaction(self.db) as db:
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
        with transaction(self.db) as db:
            db.executemany(
                "UPDATE entries SET last_used=? WHERE kind=? AND name=?",
                {(now, loc.kind, loc.entry) for loc in locations},
            )


class ObjectWriter:
    """Streams one tensor into a new object; `finish` names it by its digest."""

    def __init__(self, layout: Layout, info: TensorInfo):
        from sdrecipe.io.safetensors_writer import SafetensorsWriter

        self.layout = layout
        self.info = info
        # Named by its digest once complete; until then, errors name the folder.
        self._writer = SafetensorsWriter(
            layout.objects / "object",
            {"tensor": info},
            {},
            unique_temporary=True,
            role="a new cache entry",
            error_path=layout.objects,
        )

    def write(self, data: memoryview | bytes, start: int) -> None:
        """Write bytes of the tensor, beginning `start` bytes into its data."""
        self._writer.write("tensor", data, start)

    def finish(self, digest: str) -> tuple[Location, int]:
        """Publish the object under its digest; return where it is and its size.

        Files only: the caller registers it with `Cache.add_objects`.
        """
        target = self.layout.entry_path(OBJECT, digest)
        target.parent.mkdir(exist_ok=True)
        self._writer.commit(target)
        return Location(OBJECT, digest, "tensor", digest), self._writer.size

    def abort(self) -> None:
        """Discard the unfinished object."""
        self._writer.abort()
