"""Which model format a path holds, told from the path alone (imports no torch)."""

from __future__ import annotations

from pathlib import Path

from sdrecipe.io.shard_index import is_shard_index

# Pickled PyTorch checkpoints: sdrecipe reads them safely but never writes them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def format_of(path: Path) -> str:
    """`safetensors`, `checkpoint` (pickled PyTorch), `diffusers` (a folder),
    `sharded-safetensors` (an index JSON beside numbered shards) or `gguf`."""
    if path.is_dir():
        return "diffusers"
    if is_shard_index(path):
        return "sharded-safetensors"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "checkpoint"
    if path.suffix.lower() == ".gguf":
        return "gguf"
    return "safetensors"
