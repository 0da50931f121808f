"""Output packs: finished outputs kept whole under their content digest,
hard-linked (copied only across file systems), so caching an output costs no
extra write, and found again by the key of the output that built them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sdrecipe.cache.index import transaction
from sdrecipe.cache.layout import PACK, Layout, is_digest
from sdrecipe.io.atomic import publish, staged_copy


class Packs:
    """The packs of the cache folder `layout`, indexed in `db`."""

    def __init__(self, db: sqlite3.Connection, layout: Layout):
        self.db = db
        self.layout = layout

    def add_pack(self, output: Path, digest: str, output_id: str) -> str:
        """Link a finished output, whose content digest is `digest`, into the
        cache (copy across file systems)."""
        target = self.layout.entry_path(PACK, digest)
        if not target.exists():
            publish(staged_copy(output, target), target)
        with transaction(self.db) as db:
            db.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                (PACK, digest, target.stat().st_size, time.time(), output_id),
            )
        return digest

    def find_pack(self, output_id: str) -> Path | None:
        """A cached output whose key is `output_id`, if there is one."""
        row = self.db.execute(
            "SELECT name FROM entries WHERE kind=? AND output_key=?", (PACK, output_id)
        ).fetchone()
        path = row and is_digest(row[0]) and self.layout.entry_path(PACK, row[0])
        return path if path and path.exists() else None
