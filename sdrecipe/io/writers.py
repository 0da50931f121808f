"""One interface over the output formats sdrecipe writes, and choosing the writer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from sdrecipe.arch.detect import Architecture
from sdrecipe.arch.family import known
from sdrecipe.io.diffusers_writer import DiffusersWriter
from sdrecipe.io.encodings import Encoding
from sdrecipe.io.gguf_reader import gguf_prefix
from sdrecipe.io.gguf_writer import GgufWriter
from sdrecipe.io.lora_writer import LoraWriter
from sdrecipe.io.sharded_writer import open_safetensors_writer
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.recipe.model import Output


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


def open_writer(
    output: Output,
    tensors: dict[str, TensorInfo],
    metadata: dict[str, str],
    architecture: Architecture,
    tokenizers: Mapping[str, Path],
    drop_written: bool = False,
    encodings: Mapping[str, Encoding] | None = None,
) -> OutputWriter:
    """A writer for one output: a safetensors file (or its shards, with
    `max_shard_size`), a diffusers folder, a LoRA or a GGUF file (`encodings`
    give each tensor's GGML type; see `SafetensorsWriter` for `drop_written`;
    a LoRA is small and kept)."""
    if output.format == "diffusers":
        return DiffusersWriter(
            output.path,
            tensors,
            metadata,
            architecture,
            tokenizers,
            drop_written,
            output.max_shard_size,
        )
    if output.lora is not None:
        return LoraWriter(output.path, tensors, metadata, architecture.family, output.lora)
    if output.format == "gguf":
        family = known(architecture.family)
        assert family is not None and family.gguf is not None and output.quant is not None
        return GgufWriter(
            output.path,
            tensors,
            encodings,  # type: ignore[arg-type]
            metadata,
            family.gguf.architecture,
            output.quant,
            gguf_prefix(family),
            drop_written,
        )
    return open_safetensors_writer(
        output.path, tensors, metadata, output.max_shard_size, drop_written
    )
