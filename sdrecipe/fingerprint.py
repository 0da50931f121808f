"""Content identity of model files (importable without torch).

One sequential read of a file gives both its sha256 (what people, Civitai and
the WebUI know a model by) and a blake3 digest of every tensor (what the cache
keys on). Digests cover dtype and shape as well as the bytes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from sdrecipe.io.mapped_files import watch_mapping
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
        """The current stat of `path`; for a folder, of all its files together
        (total size, newest mtime, and a hash of every file's name, inode and mtime)."""
        result = os.stat(path)
        if not stat.S_ISDIR(result.st_mode):
            return cls(result.st_size, result.st_mtime_ns, result.st_ino)
        files = [(name, os.stat(path / name)) for name in folder_files(path)]
        identity = hashlib.sha256(
            repr([(name, s.st_ino, s.st_mtime_ns, s.st_size) for name, s in files]).encode()
        ).digest()
        return cls(
            sum(s.st_size for _, s in files),
            max((s.st_mtime_ns for _, s in files), default=result.st_mtime_ns),
            int.from_bytes(identity[:7], "little"),
        )


@dataclass(frozen=True)
class Fingerprint:
    """A model file's sha256, AutoV1 legacy hash, and per-tensor blake3 digests."""

    sha256: str
    legacy: str
    tensors: dict[str, str]


def folder_files(folder: Path) -> list[str]:
    """The regular files of a model folder, as sorted relative paths; hidden
    names (temporaries, `.cache`) and FIFOs, devices and sockets are skipped."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        relative = Path(root).relative_to(folder)
        found.extend(
            str(relative / name)
            for name in files
            if not name.startswith(".") and (Path(root) / name).is_file()
        )
    return sorted(found)


def folder_sha256(file_sha256s: dict[str, str]) -> str:
    """A folder's sha256: that of its `sha256sum`-style listing, one
    `<sha256>  <relative path>` line per file, sorted by path."""
    listing = "".join(f"{file_sha256s[name]}  {name}\n" for name in sorted(file_sha256s))
    return hashlib.sha256(listing.encode()).hexdigest()


def sha256_of(path: Path) -> str:
    """The sha256 of a whole file, read through a memory map (no copies);
    for a folder, `folder_sha256` of its files."""
    if path.is_dir():
        return folder_sha256({name: sha256_of(path / name) for name in folder_files(path)})
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        watch_mapping(path, size)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            for start in range(0, len(view), _BLOCK):
                digest.update(view[start : start + _BLOCK])
            view.release()
    return digest.hexdigest()


def legacy_hash_of(path: Path) -> str:
    """The WebUI's old AutoV1 hash: sha256 of the 64 KiB at 1 MiB, first 8 hex digits."""
    with open(path, "rb") as handle:
        handle.seek(_LEGACY_OFFSET)
        return hashlib.sha256(handle.read(_LEGACY_LENGTH)).hexdigest()[:8]


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
    spans must not overlap. The file is read through a memory map, block by
    block, feeding both hashes from the same bytes.
    """
    sha256 = hashlib.sha256()
    digests: dict[str, str] = {}
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        end = max((span[1] for span in spans.values()), default=0)
        watch_mapping(path, end)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            position = 0
            for key, (start, end, info) in sorted(spans.items(), key=lambda item: item[1][0]):
                sha256.update(view[position:start])
                hasher = tensor_hasher(info)
                for block in range(start, end, _BLOCK):
                    with view[block : min(end, block + _BLOCK)] as piece:
                        sha256.update(piece)
                        hasher.update(piece)
                digests[key] = hasher.hexdigest()
                position = end
            sha256.update(view[position:size])
            view.release()
    return Fingerprint(sha256=sha256.hexdigest(), legacy=legacy_hash_of(path), tensors=digests)
