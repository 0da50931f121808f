"""One interface over every model format sdrecipe reads, and choosing the reader."""

from __future__ import annotations

from pathlib import Path

from sdrecipe.io.adapter_reader import AdapterFile, AdapterReader
from sdrecipe.io.checkpoint_reader import CheckpointReader
from sdrecipe.io.diffusers_reader import DiffusersReader
from sdrecipe.io.fingerprint import Fingerprint
from sdrecipe.io.formats import format_of
from sdrecipe.io.gguf_reader import open_gguf
from sdrecipe.io.mapped_files import require_regular_file
from sdrecipe.io.model_reader import ModelReader, StandaloneVaeReader, is_standalone_vae
from sdrecipe.io.quantized import dequantized
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.shard_index import lone_shard_error
from sdrecipe.io.sharded_reader import ShardedSafetensorsReader


def tensor_digests(reader: ModelReader, fingerprint: Fingerprint) -> dict[str, str]:
    """Each key's digest, from the file's fingerprint: the file's own, or for an
    adapter, a digest of the factors that make the key's delta."""
    if isinstance(reader, AdapterReader):
        return reader.tensor_digests(fingerprint)
    return fingerprint.tensors


def open_adapter(path: Path) -> AdapterFile:
    """An adapter file's modules (headers only)."""
    return AdapterFile(SafetensorsReader(path))


def open_model(path: Path) -> ModelReader:
    """A reader for the model at `path`, quantized weights seen dequantized
    (`sdrecipe.io.quantized`, `sdrecipe.io.gguf_reader`); headers only are read here."""
    kind = format_of(path)
    reader: ModelReader
    if kind != "diffusers":
        require_regular_file(path)
    if kind == "gguf":
        return open_gguf(path)
    if kind == "checkpoint":
        reader = CheckpointReader(path)
    elif kind == "diffusers":
        return DiffusersReader(path)
    elif kind == "sharded-safetensors":
        reader = ShardedSafetensorsReader(path)
    else:
        lone_shard = lone_shard_error(path)
        if lone_shard is not None:
            raise lone_shard
        reader = SafetensorsReader(path)
    reader = dequantized(reader)
    return StandaloneVaeReader(reader) if is_standalone_vae(reader.keys()) else reader
