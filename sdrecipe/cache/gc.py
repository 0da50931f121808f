"""Garbage collection: the cache's size limit, least-recently-used collection,
and the removal of files the index does not know (left by a killed build)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable

from sdrecipe.cache.index import transaction
from sdrecipe.cache.layout import OBJECT, PACK, PREFIX, Layout, Location, is_digest
from sdrecipe.io.atomic import is_stale_temporary

# The cache's own disk use is trimmed to this after every build, least recently
# used first, unless `sdrecipe cache limit` sets another size.
DEFAULT_MAX_SIZE = 20_000_000_000


class Collector:
    """Keeps the cache folder `layout`, indexed in `db`, within its size limit;
    `discard` deletes one entry's file and everything that refers to it."""

    def __init__(self, db: sqlite3.Connection, layout: Layout, discard: Callable[[Location], None]):
        self.db = db
        self.layout = layout
        self.discard = discard

    @property
    def max_size(self) -> int:
        """The most bytes of its own the cache keeps (see `trim`)."""
        row = self.db.execute("SELECT value FROM settings WHERE name='max_size'").fetchone()
        return int(row[0]) if row else DEFAULT_MAX_SIZE

    def set_max_size(self, size: int) -> None:
        """Keep at most `size` bytes of the cache's own from now on."""
        with transaction(self.db) as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES ('max_size', ?)", (str(size),))

    def entry_sizes(self) -> list[tuple[str, str, int, int]]:
        """(kind, name, size, own bytes) of every entry, most recently used first.

        A pack that is still hard-linked as an output costs the cache nothing of
        its own: deleting it would free no space. Rows that name no entry the
        cache could have written are left out."""
        rows = self.db.execute(
            "SELECT kind, name, size FROM entries ORDER BY last_used DESC"
        ).fetchall()
        sized = []
        for kind, name, size in rows:
            if kind not in (OBJECT, PACK) or not is_digest(name) or not isinstance(size, int):
                continue
            own = size
            if kind == PACK:
                try:
                    own = 0 if os.stat(self.layout.entry_path(kind, name)).st_nlink > 1 else size
                except FileNotFoundError:
                    own = 0
            sized.append((kind, name, size, own))
        return sized

    def gc(self, max_size: int | None = None) -> dict[str, int]:
        """Delete least recently used entries until the cache's own bytes are at
        most `max_size` (default: its limit); `freed` counts bytes really freed."""
        limit = self.max_size if max_size is None else max_size
        kept = removed = freed = 0
        for kind, name, _size, own in self.entry_sizes():
            if kept + own <= limit:
                kept += own
                continue
            self.discard(Location(kind, name, "", ""))
            removed += 1
            freed += own
        self._remove_orphans()
        return {"removed": removed, "freed": freed, "size": kept}

    def trim(self) -> dict[str, int] | None:
        """After a build: `gc` to the limit if the cache has grown past it."""
        total = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
        return self.gc() if total > self.max_size else None

    def _remove_orphans(self) -> None:
        """Delete the cache's own files that the index does not know (e.g. left by
        a killed build), and temporaries whose writer no longer runs."""
        known = set(self.db.execute("SELECT kind, name FROM entries"))
        for path, entry in self.layout.own_files():
            orphan = entry not in known if entry else is_stale_temporary(path)
            if orphan:
                path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete the temporaries in the object and pack folders whose writing
        process no longer runs (a killed build or pull); call with the lock held."""
        for path, entry in self.layout.own_files():
            if entry is None and is_stale_temporary(path):
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every entry and forget every remembered hash."""
        with transaction(self.db) as db:
            for table in ("files", "fingerprints", "refs", "entries", "stats"):
                db.execute(f"DELETE FROM {table}")
        for path, _entry in self.layout.own_files():
            path.unlink(missing_ok=True)
        for prefix in self.layout.objects.iterdir():
            if PREFIX.fullmatch(prefix.name):
                with contextlib.suppress(OSError):
                    prefix.rmdir()  # only when empty
