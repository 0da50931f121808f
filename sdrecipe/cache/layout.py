"""Where a cache folder keeps its entries, and which files there are its own.

- `objects/ab/<digest>.safetensors`: one computed intermediate tensor each,
  named by its blake3 digest, so identical tensors are stored once.
- `packs/<content digest>.safetensors`: finished outputs.

Names read from the index or from a remote are untrusted: only 64-digit hex
digests become file names, and cleanup deletes only files of the cache's own
naming in its object and pack folders.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OBJECT = "object"
PACK = "pack"

# Every digest the cache names a file by (blake3 or sha256) is 64 hex digits.
_DIGEST = re.compile(r"[0-9a-f]{64}")
# The files the cache writes in its object and pack folders: entries, and the
# temporaries they are written through (see `temporary_path`).
PREFIX = re.compile(r"[0-9a-f]{2}")
_ENTRY_FILE = re.compile(r"([0-9a-f]{64})\.safetensors")
_ENTRY_TEMPORARY = re.compile(
    r"\.(?:[0-9a-f]{64}\.safetensors|object)-[0-9a-f]{32}\.sdrecipe-\d+\.tmp"
)


def is_digest(value: object) -> bool:
    """True for 64 lowercase hex digits: the only names of cache entries."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


@dataclass(frozen=True)
class Location:
    """Where a cached tensor is: an object file, or a key inside a pack."""

    kind: str
    entry: str
    key: str
    digest: str


def is_location(location: Location) -> bool:
    """True if `location`, read from an index or a remote, is one the cache could
    have written: a known kind, digests for names, a key that is a string."""
    return (
        location.kind in (OBJECT, PACK)
        and is_digest(location.entry)
        and is_digest(location.digest)
        and isinstance(location.key, str)
    )


class Layout:
    """The entry folders of the cache folder `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.packs = root / "packs"

    def entry_path(self, kind: str, name: str) -> Path:
        """The file of entry `name`; ValueError unless `name` is a digest."""
        if not is_digest(name):
            raise ValueError(f"{name!r} is not the name of a cache entry")
        if kind == OBJECT:
            return self.objects / name[:2] / f"{name}.safetensors"
        return self.packs / f"{name}.safetensors"

    def own_files(self) -> Iterator[tuple[Path, tuple[str, str] | None]]:
        """Each file of the cache's own naming in its object and pack folders:
        with its (kind, name) for an entry, None for a temporary. Nothing else in
        those folders is the cache's to delete."""
        prefixes = [
            p
            for p in self.objects.iterdir()
            if PREFIX.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
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
