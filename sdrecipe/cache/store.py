"""The content-addressed tensor store in `cache/`.

Layout:
- `objects/ab/<digest>.safetensors`: one computed intermediate tensor each,
  named by its blake3 digest, so identical tensors are stored once.
- `packs/<content digest>.safetensors`: finished outputs, hard-linked (copied
  only across file systems), so caching an output costs no extra write.
- `index.sqlite`: what each tensor identity maps to, the remembered
  fingerprints of input files and content digests of outputs (by stat), use
  times, and the statistics of the last build.
- `CACHEDIR.TAG`: the marker that says sdrecipe made this folder its cache.

A cache folder is one sdrecipe made and marked, or a new or empty one (an
unmarked folder of an earlier version is adopted when every name in it, in
`objects/` and in `packs/` is of the cache's own naming); anything else, and
any folder inside a `.git`, is refused. Names read from the index or from a
remote are untrusted: only 64-digit hex digests become file names, and cleanup
deletes only files of the cache's own naming in its object and pack folders.

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
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdrecipe.errors import BuildError, RecipeError
from sdrecipe.io.atomic import is_stale_temporary, publish, staged_copy, write_text_atomically
from sdrecipe.io.fingerprint import FileStat, Fingerprint, sha256_of, tensor_digest
from sdrecipe.io.tensor_info import TensorInfo

if TYPE_CHECKING:
    from sdrecipe.io.safetensors_reader import SafetensorsReader

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
# The cache's own disk use is trimmed to this after every build, least recently
# used first, unless `sdrecipe cache limit` sets another size.
DEFAULT_MAX_SIZE = 20_000_000_000

OBJECT = "object"
PACK = "pack"
# What the index remembers of a file by its stat: each memo's table and column.
SHA256 = "sha256"
DIGEST = "content digest"
_MEMOS = {SHA256: ("files", "sha256"), DIGEST: ("content_digests", "digest")}

# Every digest the cache names a file by (blake3 or sha256) is 64 hex digits.
_DIGEST = re.compile(r"[0-9a-f]{64}")
# The files the cache writes in its object and pack folders: entries, and the
# temporaries they are written through (see `temporary_path`).
_PREFIX = re.compile(r"[0-9a-f]{2}")
_ENTRY_FILE = re.compile(r"([0-9a-f]{64})\.safetensors")
_ENTRY_TEMPORARY = re.compile(
    r"\.(?:[0-9a-f]{64}\.safetensors|object)-[0-9a-f]{32}\.sdrecipe-\d+\.tmp"
)
# What an unmarked folder may hold to be adopted as a cache of an earlier version
# (a repository may keep the empty cache folder with a .gitkeep or .gitignore).
_ANY_TEMPORARY = r"\.[^/]+\.sdrecipe-\d+\.tmp"
_OWN_NAMES = {
    "": re.compile(
        r"index\.sqlite(?:\.damaged-[0-9-]+)?(?:-wal|-shm)?|\.lock|\.open\.lock|objects|packs"
        rf"|inputs|CACHEDIR\.TAG|\.gitkeep|\.gitignore|{_ANY_TEMPORARY}"
    ),
    "objects": re.compile(rf"[0-9a-f]{{2}}|{_ANY_TEMPORARY}"),
    "packs": re.compile(rf"[0-9a-f]{{64}}\.safetensors|{_ANY_TEMPORARY}"),
    "inputs": re.compile(rf"[0-9a-f]{{64}}(?:\.[^/]*)?|sources\.json|{_ANY_TEMPORARY}"),
}
# The marker of a folder sdrecipe made its cache: a standard cache directory
# tag (backup tools skip the folder), with a line that names sdrecipe.
MARKER = "CACHEDIR.TAG"
_MARKER_TEXT = """Signature: 8a477f597d28d172789f06886806bc55
# This file is a cache directory tag created by sdrecipe: this folder is its
# tensor cache. For information about cache directory tags see
# https://bford.info/cachedir/
"""


def is_digest(value: object) -> bool:
    """True for 64 lowercase hex digits: the only names of cache entries."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def is_location(location: Location) -> bool:
    """True if `location`, read from an index or a remote, is one the cache could
    have written: a known kind, digests for names, a key that is a string."""
    return (
        location.kind in (OBJECT, PACK)
        and is_digest(location.entry)
        and is_digest(location.digest)
        and isinstance(location.key, str)
    )


def check_cache_root(root: Path) -> None:
    """Raise RecipeError (exit 2) unless `root` may be a cache folder: it is not
    in a `.git`, and it is new, empty, marked as sdrecipe's cache, or holds only
    names of the cache's own (a cache made before folders were marked)."""
    where = f"the cache folder {root} (--cache-dir, or SDRECIPE_CACHE_DIR)"
    if ".git" in Path(os.path.realpath(root)).parts:
        raise RecipeError(
            f"{where} is inside a git repository's .git folder; choose a folder outside it"
        )
    if _is_marked(root):
        return
    try:
        foreign = sorted(
            f"{folder}/{name}".lstrip("/")
            for folder, names in _listings(root).items()
            for name in names
            if not _OWN_NAMES[folder].fullmatch(name)
        )
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RecipeError(f"{where} cannot be used: {exc.strerror or exc}") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise RecipeError(
            f"{where} holds files that are not sdrecipe's ({shown}) and no {MARKER} of "
            "sdrecipe's; the cache deletes what it no longer needs, so it only takes a new or "
            "empty folder, or one it made: choose another"
        )


def _is_marked(root: Path) -> bool:
    """True if `root` holds sdrecipe's cache marker (a regular file)."""
    if not (root / MARKER).is_file():
        return False
    try:
        with open(root / MARKER, encoding="utf-8", errors="replace") as handle:
            text = handle.read(4096)
    except OSError:
        return False
    return text.startswith(_MARKER_TEXT.splitlines()[0]) and "created by sdrecipe" in text


def _listings(root: Path) -> dict[str, list[str]]:
    """The names in `root` and in those of its own subfolders that exist."""
    names = os.listdir(root)
    listings = {"": names}
    for folder in ("objects", "packs", "inputs"):
        if folder in names:
            listings[folder] = os.listdir(root / folder)
    return listings


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
    """A cache directory. Use `with cache.locked():` around anything that writes.

    With `tensors` False only the memo of file hashes is used: no tensor or
    output is read from or stored in the cache (`--no-cache`). `notify` receives
    what a person should know as it happens (e.g. that a build waits for the lock).
    """

    def __init__(
        self, root: Path, tensors: bool = True, notify: Callable[[str], None] = lambda text: None
    ):
        self.root = root
        self.objects = root / "objects"
        self.packs = root / "packs"
        self.tensors = tensors
        self.notify = notify
        check_cache_root(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not _is_marked(root):
                write_text_atomically(root / MARKER, _MARKER_TEXT)
            for folder in (self.objects, self.packs):
                folder.mkdir(exist_ok=True)
            # Switching to WAL can fail at once when two processes open a new
            # index together, so opening is serialised by its own short lock.
            with _file_lock(root / ".open.lock"):
                self.db = self._open_index()
        except (OSError, sqlite3.Error) as exc:
            raise BuildError(f"cannot open the cache: {exc}", root) from None
        self._readers: dict[Path, SafetensorsReader] = {}

    @classmethod
    def existing(
        cls, root: Path, tensors: bool = True, notify: Callable[[str], None] = lambda text: None
    ) -> Cache | None:
        """The cache at `root` if there is one; read-only commands create none."""
        return cls(root, tensors, notify) if (root / "index.sqlite").is_file() else None

    def _open_index(self) -> sqlite3.Connection:
        """Open the index; a damaged one is only a memo, so it is moved aside
        with a notice and started afresh (unindexed entries are collected by gc)."""
        path = self.root / "index.sqlite"
        try:
            return _connect(path)
        except sqlite3.DatabaseError as exc:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = path.with_name(f"index.sqlite.damaged-{stamp}-{os.getpid()}")
            for suffix in ("", "-wal", "-shm"):
                damaged = Path(f"{path}{suffix}")
                if damaged.exists():
                    os.replace(damaged, Path(f"{aside}{suffix}"))
            self.notify(
                f"the cache index {path} was damaged ({exc}); moved it to {aside.name} and "
                "started a new one (cached tensors are recomputed as needed)"
            )
            return _connect(path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's exclusive lock; if another process holds it, say so and wait."""
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read(500).strip() or "another process"
                self.notify(f"waiting for the cache lock on {self.root}, held by {holder}")
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[1:])[:300]})")
            handle.flush()
            try:
                yield
            finally:
                handle.truncate(0)
                handle.flush()
                fcntl.flock(handle, fcntl.LOCK_UN)

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
        with self.transaction() as db:
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
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?)",
                (fingerprint.sha256, fingerprint.legacy, json.dumps(fingerprint.tensors)),
            )
        self.remember(SHA256, path, stat, fingerprint.sha256)

    # --- tensors ------------------------------------------------------------------------

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

    def entry_path(self, kind: str, name: str) -> Path:
        """The file of entry `name`; ValueError unless `name` is a digest."""
        if not is_digest(name):
            raise ValueError(f"{name!r} is not the name of a cache entry")
        if kind == OBJECT:
            return self.objects / name[:2] / f"{name}.safetensors"
        return self.packs / f"{name}.safetensors"

    def open_entry(self, location: Location) -> tuple[SafetensorsReader, str]:
        """A reader and key for a cached tensor, after checking its digest.

        Safe to call from worker threads: it reads files only. Raises CorruptEntry
        if the data does not match; the caller then `discard`s the entry.
        """
        from sdrecipe.io.safetensors_reader import SafetensorsReader

        path = self.entry_path(location.kind, location.entry)
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
        self._readers.pop(self.entry_path(location.kind, location.entry), None)
        self.entry_path(location.kind, location.entry).unlink(missing_ok=True)
        self.forget(location)

    def forget(self, location: Location) -> None:
        """Drop an entry and every reference to it from the index (not its file)."""
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

    def add_pack(self, output: Path, digest: str, output_id: str) -> str:
        """Link a finished output, whose content digest is `digest`, into the
        cache (copy across file systems)."""
        target = self.entry_path(PACK, digest)
        if not target.exists():
            publish(staged_copy(output, target), target)
        with self.transaction() as db:
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
        path = row and is_digest(row[0]) and self.entry_path(PACK, row[0])
        return path if path and path.exists() else None

    # --- statistics and maintenance ---------------------------------------------------

    def record_stats(self, stats: dict[str, object]) -> None:
        """Keep the statistics of the last build."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stats VALUES ('last_build', ?)", (json.dumps(stats),)
            )

    @property
    def max_size(self) -> int:
        """The most bytes of its own the cache keeps (see `trim`)."""
        row = self.db.execute("SELECT value FROM settings WHERE name='max_size'").fetchone()
        return int(row[0]) if row else DEFAULT_MAX_SIZE

    def set_max_size(self, size: int) -> None:
        """Keep at most `size` bytes of the cache's own from now on."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES ('max_size', ?)", (str(size),))

    def _entry_sizes(self) -> list[tuple[str, str, int, int]]:
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
                    own = 0 if os.stat(self.entry_path(kind, name)).st_nlink > 1 else size
                except FileNotFoundError:
                    own = 0
            sized.append((kind, name, size, own))
        return sized

    def info(self) -> dict[str, object]:
        """Disk use (own and shared with outputs), entry counts, the size limit and
        the last build's hit statistics."""
        sizes = self._entry_sizes()
        own = sum(entry[3] for entry in sizes)
        refs = self.db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
        row = self.db.execute("SELECT value FROM stats WHERE name='last_build'").fetchone()
        return {
            "path": str(self.root),
            "size": own,
            "shared_with_outputs": sum(entry[2] for entry in sizes) - own,
            "max_size": self.max_size,
            "objects": sum(1 for entry in sizes if entry[0] == OBJECT),
            "packs": sum(1 for entry in sizes if entry[0] == PACK),
            "tensors": refs,
            "last_build": json.loads(row[0]) if row else None,
        }

    def gc(self, max_size: int | None = None) -> dict[str, int]:
        """Delete least recently used entries until the cache's own bytes are at
        most `max_size` (default: its limit); `freed` counts bytes really freed."""
        limit = self.max_size if max_size is None else max_size
        kept = removed = freed = 0
        for kind, name, _size, own in self._entry_sizes():
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
        for path, entry in self._own_files():
            orphan = entry not in known if entry else is_stale_temporary(path)
            if orphan:
                path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete the temporaries in the object and pack folders whose writing
        process no longer runs (a killed build or pull); call with the lock held."""
        for path, entry in self._own_files():
            if entry is None and is_stale_temporary(path):
                path.unlink(missing_ok=True)

    def _own_files(self) -> Iterator[tuple[Path, tuple[str, str] | None]]:
        """Each file of the cache's own naming in its object and pack folders:
        with its (kind, name) for an entry, None for a temporary. Nothing else in
        those folders is the cache's to delete."""
        prefixes = [
            p
            for p in self.objects.iterdir()
            if _PREFIX.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
        ]
        folders = [(self.objects, None), (self.packs, PACK), *((p, OBJECT) for p in prefixes)]
        for folder, kind in folders:
            for path in folder.iterdir():
                entry = _ENTRY_FILE.fullmatch(path.name)
                if not path.is_file() or path.is_symlink():
                    continue
                if entry and kind and (kind == PACK or entry[1][:2] == folder.name):
                    yield path, (kind, entry[1])
                elif _ENTRY_TEMPORARY.fullmatch(path.name):
                    yield path, None

    def clear(self) -> None:
        """Delete every entry and forget every remembered hash."""
        with self.transaction() as db:
            for table in ("files", "fingerprints", "refs", "entries", "stats"):
                db.execute(f"DELETE FROM {table}")
        for path, _entry in self._own_files():
            path.unlink(missing_ok=True)
        for prefix in self.objects.iterdir():
            if _PREFIX.fullmatch(prefix.name):
                with contextlib.suppress(OSError):
                    prefix.rmdir()  # only when empty


def file_sha256(path: Path, cache: Cache | None) -> str:
    """The sha256 of a file, remembered by stat in the cache (when there is one)."""
    return _remembered(SHA256, sha256_of, path, cache)


def output_digest(path: Path, cache: Cache | None) -> str:
    """An output's content digest, remembered by stat in the cache (when there is
    one); reading the file imports torch."""
    return _remembered(DIGEST, _read_output_digest, path, cache)


def _read_output_digest(path: Path) -> str:
    from sdrecipe.io.safetensors_reader import output_digest as read_digest

    return read_digest(path)


def _remembered(memo: str, compute: Callable[[Path], str], path: Path, cache: Cache | None) -> str:
    stat = FileStat.of(path)
    known = cache.known(memo, path, stat) if cache else None
    if known is None:
        known = compute(path)
        if cache is not None:
            cache.remember(memo, path, stat, known)
    return known


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


class ObjectWriter:
    """Streams one tensor into a new object; `finish` names it by its digest."""

    def __init__(self, cache: Cache, info: TensorInfo):
        from sdrecipe.io.safetensors_writer import SafetensorsWriter

        self.cache = cache
        self.info = info
        # Named by its digest once complete; until then, errors name the folder.
        self._writer = SafetensorsWriter(
            cache.objects / "object",
            {"tensor": info},
            {},
            unique_temporary=True,
            role="a new cache entry",
            error_path=cache.objects,
        )

    def write(self, data: memoryview | bytes, start: int) -> None:
        """Write bytes of the tensor, beginning `start` bytes into its data."""
        self._writer.write("tensor", data, start)

    def finish(self, digest: str) -> tuple[Location, int]:
        """Publish the object under its digest; return where it is and its size.

        Files only: the caller registers it with `Cache.add_objects`.
        """
        target = self.cache.entry_path(OBJECT, digest)
        target.parent.mkdir(exist_ok=True)
        self._writer.commit(target)
        return Location(OBJECT, digest, "tensor", digest), self._writer.size

    def abort(self) -> None:
        """Discard the unfinished object."""
        self._writer.abort()
