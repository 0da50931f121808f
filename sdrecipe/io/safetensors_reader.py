"""Zero-copy, memory-mapped reading of safetensors files."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from sdrecipe.errors import RecipeError
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.dtypes import CODE_TO_DTYPE
from sdrecipe.io.fingerprint import (
    Fingerprint,
    bytes_digest,
    content_digest,
    fingerprint_file,
    folder_digest,
    folder_files,
    span_digests,
)
from sdrecipe.io.gguf_reader import GgufReader
from sdrecipe.io.mapped_files import map_file, require_regular_file
from sdrecipe.io.shard_index import index_files, is_shard_index
from sdrecipe.io.tensor_info import TensorInfo

_MAX_HEADER = 100 * 1024 * 1024
# Tensor entries nest 3 levels; metadata values are strings (some tools nest more).
_MAX_HEADER_DEPTH = 8


class SafetensorsReader:
    """A safetensors file whose header is parsed and checked up front.

    Tensor data is never copied on read: `tensor()` returns a view of the
    memory-mapped file, so only the pages a build touches are ever loaded.
    """

    def __init__(self, path: Path):
        self.path = path
        require_regular_file(path)
        try:
            with open(path, "rb") as handle:
                self._read_header(handle)
        except OSError as exc:
            raise RecipeError(f"cannot read the model: {exc.strerror or exc}", path) from None
        self._mmap: mmap.mmap | None = None

    def _read_header(self, handle: BinaryIO) -> None:
        """Read and check the header of the file open as `handle`: its metadata,
        and every tensor's dtype, shape and place, in order and within the file."""
        self.file_size = size = handle.seek(0, 2)
        handle.seek(0)
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise self._error("the file is too short to be safetensors")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > _MAX_HEADER:
            raise self._error("not a safetensors file (bad header size)")
        if header_size > size - 8:
            raise self._error(
                f"the file is truncated: its header alone needs {header_size + 8} bytes "
                f"and the file has {size} (incomplete download?)"
            )
        header_bytes = handle.read(header_size)
        try:
            header = load_json(header_bytes, max_depth=_MAX_HEADER_DEPTH)
        except ValueError as exc:
            raise self._error(f"not a safetensors file (the header is not JSON: {exc})") from None
        if not isinstance(header, dict):
            raise self._error("not a safetensors file (the header is not a mapping)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._error("the __metadata__ entry is not a mapping")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in metadata.items()}
        self._header = prefix + header_bytes
        self.data_start = 8 + header_size
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        end_of_previous = self.data_start
        for key, entry in sorted(header.items(), key=lambda item: _start(item[1])):
            info, offset = self._check_entry(key, entry)
            if offset < end_of_previous:
                raise self._error(f"tensor {key!r} overlaps the tensor stored before it")
            self._infos[key], self._offsets[key] = info, offset
            end_of_previous = offset + info.nbytes

    def _error(self, message: str) -> RecipeError:
        return RecipeError(message, self.path)

    def _check_entry(self, key: str, entry: object) -> tuple[TensorInfo, int]:
        try:
            dtype = CODE_TO_DTYPE[entry["dtype"]]  # type: ignore[index]
            shape = tuple(int(dim) for dim in entry["shape"])  # type: ignore[index]
            begin, end = (int(offset) for offset in entry["data_offsets"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            raise self._error(f"tensor {key!r} has a malformed header entry: {entry!r}") from None
        info = TensorInfo(dtype, shape)
        if min(shape, default=0) < 0 or end - begin != info.nbytes or begin < 0:
            raise self._error(f"tensor {key!r}: data offsets do not match its dtype and shape")
        if self.data_start + end > self.file_size:
            raise self._error(
                f"tensor {key!r} lies past the end of the file: the file is truncated "
                "(incomplete download?)"
            )
        return info, self.data_start + begin

    def keys(self) -> list[str]:
        """Tensor names in the order their data is stored."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of `key`."""
        return self._infos[key]

    def infos(self) -> dict[str, TensorInfo]:
        """Dtype and shape of every tensor, in storage order."""
        return dict(self._infos)

    def _mapped(self) -> mmap.mmap:
        if self._mmap is None:
            self._mmap = map_file(self.path, self.file_size)
        return self._mmap

    def fingerprint(self) -> Fingerprint:
        """The file's sha256 and each tensor's digest, from one read of the file."""
        return fingerprint_file(self.path, self.spans())

    def content_digest(self) -> str:
        """The file's content digest (see `fingerprint.content_digest`), from one
        read; a file whose tensors leave gaps gets the digest of its bytes."""
        position = self.data_start
        for key, offset in self._offsets.items():
            if offset != position:
                return bytes_digest(self.path)
            position += self._infos[key].nbytes
        if position != self.file_size:
            return bytes_digest(self.path)
        digests = span_digests(self.path, self.spans())
        return content_digest(self._header, (digests[key] for key in self._offsets))

    def spans(self) -> dict[str, tuple[int, int, TensorInfo]]:
        """Each tensor's absolute (start, end) byte offsets in the file, and its info."""
        return {
            key: (offset, offset + self._infos[key].nbytes, self._infos[key])
            for key, offset in self._offsets.items()
        }

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy view of `key`'s data; callers must not modify it."""
        info = self._infos[key]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(
            self._mapped(), dtype=info.dtype, count=info.numel, offset=self._offsets[key]
        )
        return flat.view(info.shape)

    def raw(self, key: str) -> memoryview:
        """The stored bytes of `key`, without a copy."""
        start = self._offsets[key]
        return memoryview(self._mapped())[start : start + self._infos[key].nbytes]


def _start(entry: object) -> int:
    try:
        return int(entry["data_offsets"][0])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, IndexError):
        return -1


def output_digest(path: Path) -> str:
    """The content digest of an output: a safetensors file's (`content_digest`),
    a folder's (`folder_digest` of its files'), a sharded model's (the
    `folder_digest` of its index and shards, by file name), or any other file's
    bytes'."""
    if path.is_dir():
        return folder_digest({name: file_digest(path / name) for name in folder_files(path)})
    files = index_files(path) if is_shard_index(path) else None
    if files is not None:
        index, *shards = files
        digests = {index.name: bytes_digest(index)}
        return folder_digest({**digests, **{shard.name: file_digest(shard) for shard in shards}})
    return file_digest(path)


def file_digest(path: Path) -> str:
    """The content digest of one file: a safetensors file's, a GGUF file's
    (`gguf_content_digest`), or its bytes'."""
    try:
        reader = GgufReader(path) if path.suffix.lower() == ".gguf" else SafetensorsReader(path)
    except RecipeError:
        return bytes_digest(path)
    return reader.content_digest()
