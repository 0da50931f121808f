"""Streaming, atomic writing of safetensors files.

The header is written first, with every tensor's offset fixed in advance, so
tensor data can then be written piece by piece, from any thread, straight to
its place. Everything goes to a hidden temporary file beside the target, which
is renamed over the target only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrecipe.errors import BuildError, describe_os_error
from sdrecipe.io.atomic import publish, temporary_path
from sdrecipe.io.dtypes import DTYPE_TO_CODE
from sdrecipe.io.fingerprint import content_digest
from sdrecipe.io.page_cache import SUPPORTED, WrittenBehind
from sdrecipe.io.tensor_info import TensorInfo

_ALIGNMENT = 8


@dataclass(frozen=True)
class Slot:
    """Where a tensor's data lives in the file being written."""

    info: TensorInfo
    offset: int


def layout_order(tensors: dict[str, TensorInfo]) -> list[str]:
    """The order tensors are stored in: wider dtypes first, so that every tensor
    stays aligned to its item size; otherwise the given order."""
    return sorted(tensors, key=lambda key: -tensors[key].dtype.itemsize)


def encode_header(
    tensors: dict[str, TensorInfo], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included) and each tensor's data offset."""
    order = layout_order(tensors)
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    relative: dict[str, int] = {}
    position = 0
    for key in order:
        info = tensors[key]
        entries[key] = {
            "dtype": DTYPE_TO_CODE[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [position, position + info.nbytes],
        }
        relative[key] = position
        position += info.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(len(text) + 8) % _ALIGNMENT)
    header = struct.pack("<Q", len(text)) + text
    return header, {key: len(header) + offset for key, offset in relative.items()}


class SafetensorsWriter:
    """Writes one safetensors file through a temporary file; `finish()` completes
    it and `publish()` renames it into place. Errors name `role` and `error_path`.

    Tensors may be written in any order, from any thread.
    With `drop_written`, each finished tensor leaves the page cache once it is
    on disk (see `sdrecipe.io.page_cache`).
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
        unique_temporary: bool = False,
        role: str = "the output",
        error_path: Path | None = None,
        drop_written: bool = False,
        layout: tuple[bytes, dict[str, int]] | None = None,
    ):
        self.path = path
        self.role = role
        self.error_path = error_path or path
        self.temporary = temporary_path(path, unique_temporary)
        # `layout`: another format's header and data offsets (see GgufWriter).
        header, offsets = layout or encode_header(tensors, metadata)
        self._header = header
        self.slots = {key: Slot(tensors[key], offsets[key]) for key in offsets}
        self.size = max(
            (slot.offset + slot.info.nbytes for slot in self.slots.values()), default=len(header)
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise BuildError(f"{role}'s path is a folder", path)
            self._fd: int | None = os.open(
                self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise self._error("create", exc) from None
        self._behind = None
        if drop_written and SUPPORTED:
            spans = {key: (slot.offset, slot.info.nbytes) for key, slot in self.slots.items()}
            self._behind = WrittenBehind(self._fd, spans)
        try:
            self._write_at(header, 0)
        except BaseException:
            self.abort()
            raise

    def _write_at(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                written = os.pwrite(self._fd, view, offset)  # type: ignore[arg-type]
            except OSError as exc:
                raise self._error("write", exc) from None
            view = view[written:]
            offset += written

    def _error(self, action: str, exc: OSError) -> BuildError:
        return BuildError(f"cannot {action} {self.role}: {describe_os_error(exc)}", self.error_path)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of tensor `key`."""
        return self.slots[key].info

    def write(self, key: str, data: memoryview | bytes, start: int = 0) -> None:
        """Write bytes of tensor `key`, beginning `start` bytes into its data."""
        slot = self.slots[key]
        size = memoryview(data).nbytes
        if start + size > slot.info.nbytes:
            raise BuildError(f"internal error: {key} written past its end", self.path)
        self._write_at(data, slot.offset + start)
        if self._behind is not None:
            self._behind.wrote(key, size)

    def write_tensor(self, key: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write a contiguous tensor's bytes into `key`'s data at byte `start`."""
        self.write(key, tensor.reshape(-1).view(torch.uint8).numpy().data, start)

    def content_digest(self, tensor_digests: Mapping[str, str]) -> str | None:
        """The file's content digest from its tensors' digests, without reading
        it back; None when a tensor's digest is missing."""
        if tensor_digests.keys() != self.slots.keys():
            return None
        return content_digest(self._header, (tensor_digests[key] for key in self.slots))

    def finish(self) -> None:
        """Close the complete temporary file; `publish` then puts it in place."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None

    def publish(self, destination: Path | None = None) -> None:
        """Rename the finished file over the target (or `destination`)."""
        if destination is not None:
            self.path = destination
        try:
            publish(self.temporary, self.path)
        except OSError as exc:
            self.temporary.unlink(missing_ok=True)
            raise self._error("publish", exc) from None

    def commit(self, destination: Path | None = None) -> None:
        """`finish`, then `publish`."""
        self.finish()
        self.publish(destination)

    def abort(self) -> None:
        """Discard the temporary file; the target is left as it was."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.temporary.unlink(missing_ok=True)
