"""Statistics: the last build's hit counts, and what `sdrecipe cache info` shows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from sdrecipe.cache.index import transaction
from sdrecipe.cache.layout import OBJECT, PACK


class Statistics:
    """The statistics of the cache folder `root`, kept in its index `db`."""

    def __init__(self, db: sqlite3.Connection, root: Path):
        self.db = db
        self.root = root

    def record_stats(self, stats: dict[str, object]) -> None:
        """Keep the statistics of the last build."""
        with transaction(self.db) as db:
            db.execute(
                "INSERT OR REPLACE INTO stats VALUES ('last_build', ?)", (json.dumps(stats),)
            )

    def info(self, sizes: list[tuple[str, str, int, int]], max_size: int) -> dict[str, object]:
        """Disk use (own and shared with outputs) of the entries' `sizes` ((kind,
        name, size, own bytes) each), entry counts, the size limit and the last
        build's hit statistics."""
        own = sum(entry[3] for entry in sizes)
        refs = self.db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
        row = self.db.execute("SELECT value FROM stats WHERE name='last_build'").fetchone()
        return {
            "path": str(self.root),
            "size": own,
            "shared_with_outputs": sum(entry[2] for entry in sizes) - own,
            "max_size": max_size,
            "objects": sum(1 for entry in sizes if entry[0] == OBJECT),
            "packs": sum(1 for entry in sizes if entry[0] == PACK),
            "tensors": refs,
            "last_build": json.loads(row[0]) if row else None,
        }
