"""Telling adapter files from model files, by their keys (imports no torch)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from sdrecipe.adapters.modules import is_adapter
from sdrecipe.io.bounded_json import load_json

_MAX_HEADER = 100 * 1024 * 1024


def is_adapter_path(path: Path) -> bool:
    """True when `path` is a safetensors file whose keys are an adapter's. Any
    problem reading it says False: opening it as a model reports the problem."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            return has_adapter_header(handle)
    except OSError:
        return False


def has_adapter_header(handle: BinaryIO) -> bool:
    """True when the safetensors header read from `handle` lists an adapter's
    keys (two reads: the length, then the header; ranged reads on a remote file)."""
    try:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > _MAX_HEADER:
            return False
        header = load_json(handle.read(size), max_depth=8)
    except (ValueError, struct.error):
        return False
    return isinstance(header, dict) and is_adapter([k for k in header if k != "__metadata__"])
