"""The content-addressed tensor store in `cache/`: the `Cache` class, composed
of one module per job.

Layout:
- `objects/ab/<digest>.safetensors`: one computed intermediate tensor each,
  named by its blake3 digest, so identical tensors are stored once
  (`objects`).
- `packs/<content digest>.safetensors`: finished outputs, hard-linked (copied
  only across file systems), so caching an output costs no extra write
  (`packs`).
- `index.sqlite`: what each tensor identity maps to, the remembered
  fingerprints of input files and content digests of outputs (by stat, `memo`),
  use times (`gc`), and the statistics of the last build (`stats`); see `index`.
- `CACHEDIR.TAG`: the marker that says sdrecipe made this folder its cache
  (`folder`, which also says which folders may be one).

Names read from the index or from a remote are untrusted (`layout`). Every
entry is written to a temporary file and renamed into place, and every read is
checked against its digest: a corrupt entry is reported, discarded and
recomputed, never used. Builds sharing a cache are serialised by a file lock
(`build_lock`).

The index part imports no torch, so an up-to-date build decides in a blink;
the tensor readers and writers are imported where tensors are touched.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sdrecipe.cache.build_lock import build_lock
from sdrecipe.cache.folder import check_cache_root, mark
from sdrecipe.cache.gc import DEFAULT_MAX_SIZE, Collector
from sdrecipe.cache.index import open_index
from sdrecipe.cache.index import transaction as index_transaction
from sdrecipe.cache.layout import OBJECT, PACK, Layout, Location, is_digest, is_location
from sdrecipe.cache.memo import DIGEST, SHA256, FileMemo, file_sha256, output_digest
from sdrecipe.cache.objects import CorruptEntry, ObjectStore, ObjectWriter
from sdrecipe.cache.packs import Packs
from sdrecipe.cache.stats import Statistics
from sdrecipe.errors import BuildError
from sdrecipe.io.fingerprint import FileStat, Fingerprint
from sdrecipe.io.tensor_info import TensorInfo

if TYPE_CHECKING:
    from sdrecipe.io.safetensors_reader import SafetensorsReader

# The names callers import from here, wherever they are defined.
__all__ = [
    "DEFAULT_MAX_SIZE",
    "DIGEST",
    "OBJECT",
    "PACK",
    "SHA256",
    "Cache",
    "CorruptEntry",
    "Location",
    "ObjectWriter",
    "check_cache_root",
    "file_sha256",
    "is_digest",
    "is_location",
    "output_digest",
]


class Cache(Layout):
    """A cache directory. Use `with cache.locked():` around anything that writes.

    With `tensors` False only the memo of file hashes is used: no tensor or
    output is read from or stored in the cache (`--no-cache`). `notify` receives
    what a person should know as it happens (e.g. that a build waits for the lock).
    """

    def __init__(
        self, root: Path, tensors: bool = True, notify: Callable[[str], None] = lambda text: None
    ):
        super().__init__(root)
        self.tensors = tensors
        self.notify = notify
        check_cache_root(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            mark(root)
            for folder in (self.objects, self.packs):
                folder.mkdir(exist_ok=True)
            self.db = open_index(root, notify)
        except (OSError, sqlite3.Error) as exc:
            raise BuildError(f"cannot open the cache: {exc}", root) from None
        self._memo = FileMemo(self.db)
        self._objects = ObjectStore(self.db, self)
        self._packs = Packs(self.db, self)
        self._collector = Collector(self.db, self, self._objects.discard)
        self._statistics = Statistics(self.db, root)

    @classmethod
    def existing(
        cls, root: Path, tensors: bool = True, notify: Callable[[str], None] = lambda text: None
    ) -> Cache | None:
        """The cache at `root` if there is one; read-only commands create none."""
        return cls(root, tensors, notify) if (root / "index.sqlite").is_file() else None

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the cache's exclusive lock; if another process holds it, say so and wait."""
        return build_lock(self.root, self.notify)

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction on the index."""
        return index_transaction(self.db)

    # --- files: input fingerprints and output hashes, remembered by stat (memo) ------

    def known(self, memo: str, path: Path, stat: FileStat) -> str | None:
        """The `memo` (SHA256 or DIGEST) recorded for `path` if its stat is unchanged."""
        return self._memo.known(memo, path, stat)

    def remember(self, memo: str, path: Path, stat: FileStat, value: str) -> None:
        """Record `path`'s `memo` (SHA256 or DIGEST) against its stat."""
        self._memo.remember(memo, path, stat, value)

    def known_fingerprint(self, path: Path, stat: FileStat) -> Fingerprint | None:
        """The fingerprint of `path` if it was taken with the same stat."""
        return self._memo.known_fingerprint(path, stat)

    def remember_fingerprint(self, path: Path, stat: FileStat, fingerprint: Fingerprint) -> None:
        """Record `path`'s fingerprint (and so its sha256) against its stat."""
        self._memo.remember_fingerprint(path, stat, fingerprint)

    # --- tensors (objects) ---------------------------------------------------------------

    def lookup(self, identities: Iterable[str]) -> dict[str, Location]:
        """The cached location of each identity that has one."""
        return self._objects.lookup(identities)

    def open_entry(self, location: Location) -> tuple[SafetensorsReader, str]:
        """A reader and key for a cached tensor, after checking its digest
        (CorruptEntry if it does not match); safe from worker threads."""
        return self._objects.open_entry(location)

    def discard(self, location: Location) -> None:
        """Delete an entry's file and everything that refers to it."""
        self._objects.discard(location)

    def forget(self, location: Location) -> None:
        """Drop an entry and every reference to it from the index (not its file)."""
        self._objects.forget(location)

    def object_writer(self, info: TensorInfo) -> ObjectWriter:
        """A writer for one new object; name it with `finish(digest)`."""
        return ObjectWriter(self, info)

    def add_objects(self, objects: Iterable[tuple[str, Location, int]]) -> None:
        """Register new objects (identity, location, size) and their refs."""
        self._objects.add_objects(objects)

    def add_refs(self, refs: Iterable[tuple[str, Location]]) -> None:
        """Record identity → location for many tensors, and mark their entries used."""
        self._objects.add_refs(refs)

    def touch(self, locations: Iterable[Location]) -> None:
        """Mark entries as just used (for least-recently-used collection)."""
        self._objects.touch(locations)

    # --- whole outputs (packs) ------------------------------------------------------------

    def add_pack(self, output: Path, digest: str, output_id: str) -> str:
        """Link a finished output, whose content digest is `digest`, into the cache."""
        return self._packs.add_pack(output, digest, output_id)

    def find_pack(self, output_id: str) -> Path | None:
        """A cached output whose key is `output_id`, if there is one."""
        return self._packs.find_pack(output_id)

    # --- statistics (stats) and maintenance (gc) ----------------------------------------

    def record_stats(self, stats: dict[str, object]) -> None:
        """Keep the statistics of the last build."""
        self._statistics.record_stats(stats)

    def info(self) -> dict[str, object]:
        """Disk use (own and shared with outputs), entry counts, the size limit and
        the last build's hit statistics."""
        return self._statistics.info(self._collector.entry_sizes(), self._collector.max_size)

    @property
    def max_size(self) -> int:
        """The most bytes of its own the cache keeps (see `trim`)."""
        return self._collector.max_size

    def set_max_size(self, size: int) -> None:
        """Keep at most `size` bytes of the cache's own from now on."""
        self._collector.set_max_size(size)

    def gc(self, max_size: int | None = None) -> dict[str, int]:
        """Delete least recently used entries down to `max_size` (default: the limit)."""
        return self._collector.gc(max_size)

    def trim(self) -> dict[str, int] | None:
        """After a build: `gc` to the limit if the cache has grown past it."""
        return self._collector.trim()

    def remove_stale_temporaries(self) -> None:
        """Delete the temporaries whose writing process no longer runs (lock held)."""
        self._collector.remove_stale_temporaries()

    def clear(self) -> None:
        """Delete every entry and forget every remembered hash."""
        self._collector.clear()
