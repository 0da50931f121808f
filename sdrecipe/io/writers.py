"""One interface over the output formats sdrecipe writes, and choosing the writer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from sdrecipe.arch.detect import Architecture
from sdrecipe.io.diffusers_writer import DiffusersWriter
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.io.tensor_info import TensorInfo


class OutputWriter(Protocol):
    """What the executor needs from an output: single-file keys, written in
    pieces from any thread, completed by `finish`, then put in place by `publish`
    or discarded by `abort`."""

    path: Path

    def info(self, key: str) -> TensorInfo: ...

    def write(self, key: str, data: memoryview | bytes, start: int = 0) -> None: ...

    def finish(self) -> None: ...

    def publish(self) -> None: ...

    def abort(self) -> None: ...


def open_writer(
    path: Path,
    output_format: str,
    tensors: dict[str, TensorInfo],
    metadata: dict[str, str],
    architecture: Architecture,
    tokenizers: Mapping[str, Path],
) -> OutputWriter:
    """A writer for one output: a safetensors file, or a diffusers folder."""
    if output_format == "diffusers":
        return DiffusersWriter(path, tensors, metadata, architecture, tokenizers)
    return SafetensorsWriter(path, tensors, metadata)
