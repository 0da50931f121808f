"""One interface over every model format sdrecipe reads, and choosing the reader."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from sdrecipe.errors import RecipeError
from sdrecipe.fingerprint import Fingerprint
from sdrecipe.io.checkpoint_reader import CheckpointReader
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.tensor_info import TensorInfo

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelReader(Protocol):
    """What the build needs from an input model, whatever its format."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def infos(self) -> dict[str, TensorInfo]: ...

    def tensor(self, key: str) -> torch.Tensor: ...

    def raw(self, key: str) -> memoryview: ...

    def fingerprint(self) -> Fingerprint: ...


def format_of(path: Path) -> str:
    """`safetensors`, `checkpoint` (pickled PyTorch) or `diffusers` (a folder)."""
    if path.is_dir():
        return "diffusers"
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    return "safetensors"


def open_model(path: Path) -> ModelReader:
    """A reader for the model at `path`; headers only are read here."""
    kind = format_of(path)
    if kind == "checkpoint":
        return CheckpointReader(path)
    if kind == "diffusers":
        raise RecipeError(
            "diffusers folders cannot be read yet; convert the folder to a single "
            "safetensors file first",
            path,
        )
    return SafetensorsReader(path)
