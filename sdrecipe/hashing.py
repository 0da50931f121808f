"""Model file hashes that people and tools rely on: sha256, AutoV2 and AutoV1."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_BLOCK = 8 * 1024 * 1024
_LEGACY_OFFSET = 1024 * 1024
_LEGACY_LENGTH = 64 * 1024


@dataclass(frozen=True)
class FileHashes:
    """A file's full sha256 and the short forms derived from it."""

    sha256: str
    legacy: str

    @property
    def autov2(self) -> str:
        """Civitai's AutoV2: the first 10 hex digits of the sha256."""
        return self.sha256[:10]


def hash_file(path: Path) -> FileHashes:
    """sha256 of the whole file, read in blocks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
        handle.seek(_LEGACY_OFFSET)
        legacy = hashlib.sha256(handle.read(_LEGACY_LENGTH)).hexdigest()[:8]
    return FileHashes(sha256=digest.hexdigest(), legacy=legacy)


def hash_files(paths: list[Path], threads: int) -> list[FileHashes]:
    """Hash several files at once (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(hash_file, paths))
