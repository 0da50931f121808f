"""Content identity of model files (importable without torch).

One sequential read of a file gives both its sha256 (what people, Civitai and
the WebUI know a model by) and a blake3 digest of every tensor (what the cache
keys on). Digests cover dtype and shape as well as the bytes.

An output is known by its *content digest* (`content_digest`), made from its
header and its tensors' digests: a build has those digests already, so the
file it wrote is never read back to be hashed.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from sdrecipe.io.mapped_files import watch_mapping
from sdrecipe.io.shard_index import index_files, is_shard_index, read_index
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
        (total size, newest mtime, and a hash of every file's name, inode and mtime);
        for a shard index, of the index and its shards together."""
        result = os.stat(path)
        shards = index_files(path) if is_shard_index(path) else None
        if shards is not None:
            files = [(file.name, os.stat(file)) for file in shards]
        elif not stat.S_ISDIR(result.st_mode):
            return cls(result.st_size, result.st_mtime_ns, result.st_ino)
        else:
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


def folder_listing(file_digests: dict[str, str]) -> bytes:
    """A `sha256sum`-style listing: one `<digest>  <relative path>` line per file,
    sorted by path."""
    return "".join(f"{file_digests[name]}  {name}\n" for name in sorted(file_digests)).encode()


def folder_sha256(file_sha256s: dict[str, str]) -> str:
    """A folder's sha256: that of its listing of file sha256s."""
    return hashlib.sha256(folder_listing(file_sha256s)).hexdigest()


# Domain prefixes of content digests: no file's digest of one kind can be
# forged from another kind's hashed bytes.
_SAFETENSORS_DOMAIN = b"sdrecipe content digest: safetensors\0"
_BYTES_DOMAIN = b"sdrecipe content digest: bytes\0"
_FOLDER_DOMAIN = b"sdrecipe content digest: folder\0"
_GGUF_DOMAIN = b"sdrecipe content digest: gguf\0"


def content_digest(header: bytes, tensor_digests: Iterable[str]) -> str:
    """The content digest of a safetensors file: blake3 of its header bytes
    (length prefix included) and of its tensors' digests (`tensor_digest`) in
    storage order, the tensors filling the rest of the file without gaps.

    The header fixes every tensor's dtype, shape and place, so equal digests
    mean equal files, as a hash of the whole file would."""
    hasher = blake3.blake3(_SAFETENSORS_DOMAIN)
    hasher.update(header)
    for digest in tensor_digests:
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def gguf_content_digest(header: bytes, span_digests: Iterable[str]) -> str:
    """The content digest of a GGUF file: blake3 of its header (up to its data)
    and of the `tensor_digest` (as uint8) of each tensor's blocks and of the
    bytes between and after them, in file order."""
    hasher = blake3.blake3(_GGUF_DOMAIN)
    hasher.update(header)
    for digest in span_digests:
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def bytes_digest(path: Path) -> str:
    """The content digest of a file that is not gap-free safetensors: blake3 of its bytes."""
    hasher = blake3.blake3(_BYTES_DOMAIN)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def folder_digest(file_digests: dict[str, str]) -> str:
    """The content digest of a folder: blake3 of its listing of file content digests."""
    return blake3.blake3(_FOLDER_DOMAIN + folder_listing(file_digests)).hexdigest()


def sha256_of(path: Path) -> str:
    """The sha256 of a whole file, read through a memory map (no copies);
    for a folder, `folder_sha256` of its files; for a shard index, `folder_sha256`
    of the index and its shards, by file name."""
    if path.is_dir():
        return folder_sha256({name: plain_sha256(path / name) for name in folder_files(path)})
    if is_shard_index(path):
        return folder_sha256({file.name: plain_sha256(file) for file in read_index(path).files()})
    return plain_sha256(path)


def plain_sha256(path: Path) -> str:
    """The sha256 of the file at `path` itself, read through a memory map."""
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
    """Read `path` once: sha256 of everything, and blake3 of each tensor's byte span."""
    sha256 = hashlib.sha256()
    digests = span_digests(path, spans, sha256.update)
    return Fingerprint(sha256=sha256.hexdigest(), legacy=legacy_hash_of(path), tensors=digests)


def span_digests(
    path: Path,
    spans: dict[str, tuple[int, int, TensorInfo]],
    feed: Callable[[memoryview], object] = lambda data: None,
) -> dict[str, str]:
    """The `tensor_digest` of each tensor's byte span in `path`, from one read;
    `feed` is given every byte of the file as well (to hash the whole file).

    `spans` maps each key to its (start, end) absolute byte offsets and info; the
    spans must not overlap. The file is read through a memory map, block by
    block, feeding every hash from the same bytes.
    """
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
                feed(view[position:start])
                hasher = tensor_hasher(info)
                for block in range(start, end, _BLOCK):
                    with view[block : min(end, block + _BLOCK)] as piece:
                        feed(piece)
                        hasher.update(piece)
                digests[key] = hasher.hexdigest()
                position = end
            feed(view[position:size])
            view.release()
    return digests
