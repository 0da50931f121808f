"""Content identity of model files (importable without torch).

One sequential read of a file gives both its sha256 (what people, Civitai and
the WebUI know a model by) and a blake3 digest of every tensor (what the cache
keys on). Digests cover dtype and shape as well as the bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from sdrecipe.io.tensor_info import TensorInfo

_BLOCK = 8 * 1024 * 1024
_LEGACY_OFFSET = 1024 * 1024
_LEGACY_LENGTH = 64 * 1024


@dataclass(frozen=True)
class FileStat:
    """What identifies an unchanged file without reading it, as git's index does."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStat:
        """The current stat of `path`."""
        result = os.stat(path)
        return cls(result.st_size, result.st_mtime_ns, result.st_ino)


@dataclass(frozen=True)
class Fingerprint:
    """A model file's sha256, AutoV1 legacy hash, and per-tensor blake3 digests."""

    sha256: str
    legacy: str
    tensors: dict[str, str]

    @property
    def autov2(self) -> str:
        """Civitai's AutoV2: the first 10 hex digits of the sha256."""
        return self.sha256[:10]


def tensor_hasher(info: TensorInfo) -> blake3.blake3:
    """A blake3 hasher primed with the tensor's dtype and shape; feed it the data."""
    dtype = str(info.dtype).removeprefix("torch.")
    prefix = f"{dtype}{list(info.shape)}\0".encode()
    return blake3.blake3(prefix)


def tensor_digest(info: TensorInfo, data: Iterable[memoryview | bytes]) -> str:
    """The digest of a tensor whose bytes come in `data`, in order."""
    hasher = tensor_hasher(info)
    for piece in data:
        hasher.update(piece)
    return hasher.hexdigest()


def fingerprint_file(path: Path, spans: dict[str, tuple[int, int, TensorInfo]]) -> Fingerprint:
    """Read `path` once: sha256 of everything, and blake3 of each tensor's byte span.

    `spans` maps each key to its (start, end) absolute byte offsets and info; the
    spans must not overlap.
    """
    sha256 = hashlib.sha256()
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    digests: dict[str, str] = {}
    index = 0
    hasher = None
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    position = 0
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            block = view[:count]
            sha256.update(block)
            end = position + count
            while index < len(ordered):
                key, (start, stop, info) = ordered[index]
                if start >= end and start != stop:
                    break
                if hasher is None:
                    hasher = tensor_hasher(info)
                low, high = max(start, position), min(stop, end)
                if high > low:
                    hasher.update(block[low - position : high - position])
                if stop > end:
                    break
                digests[key] = hasher.hexdigest()
                hasher = None
                index += 1
            position = end
        handle.seek(_LEGACY_OFFSET)
        legacy = hashlib.sha256(handle.read(_LEGACY_LENGTH)).hexdigest()[:8]
    for key, (_, _, info) in ordered[index:]:
        digests[key] = tensor_digest(info, [])  # only zero-size tensors can be left
    return Fingerprint(sha256=sha256.hexdigest(), legacy=legacy, tensors=digests)
