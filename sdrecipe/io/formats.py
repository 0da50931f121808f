"""Which model format a path holds, told from the path alone (imports no torch)."""

from __future__ import annotations

from pathlib import Path

# Pickled PyTorch checkpoints: sdrecipe reads them safely but never writes them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def format_of(path: Path) -> str:
    """`safetensors`, `checkpoint` (pickled PyTorch) or `diffusers` (a folder)."""
    if path.is_dir():
        return "diffusers"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "checkpoint"
    return "safetensors"
