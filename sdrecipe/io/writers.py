"""What the executor needs from the writer of an output, whatever its format
(each format opens its own: `sdrecipe.io.output_formats`; imports no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from sdrecipe.io.tensor_info import TensorInfo


class OutputWriter(Protocol):
    """What the executor needs from an output: single-file keys, written in
    pieces from any thread, completed by `finish`, then put in place by `publish`
    or discarded by `abort`; `content_digest` spares reading the output back."""

    path: Path

    def info(self, key: str) -> TensorInfo: ...

    def write(self, key: str, data: memoryview | bytes, start: int = 0) -> None: ...

    def content_digest(self, tensor_digests: Mapping[str, str]) -> str | None:
        """The output's content digest from the digests of the tensors written,
        or None when the file must be read to know it."""

    def finish(self) -> None: ...

    def publish(self) -> None: ...

    def abort(self) -> None: ...
