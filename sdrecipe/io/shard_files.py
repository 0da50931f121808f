"""How the shards of a sharded safetensors output are named and filled (imports no torch).

An output with `max_shard_size` is written as Hugging Face's
`save_torch_state_dict` writes a model: tensors go into shards greedily, in
the order they are stored, a new shard starting where the next tensor would
pass the limit and a tensor larger than the limit taking a shard of its own;
the shards are `<stem>-00001-of-0000N.safetensors` beside the index
`<name>.safetensors.index.json`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SUFFIX = ".safetensors"


def index_path(path: Path) -> Path:
    """The index of the shards written for the output at `path`:
    `model.safetensors` → `model.safetensors.index.json`."""
    return path.with_name(f"{path.name}.index.json")


def shard_name(path: Path, number: int, count: int) -> str:
    """Shard `number` (from 1) of `count` of the output at `path`:
    `model.safetensors` → `model-00002-of-00003.safetensors`."""
    stem, suffix = path.name[: -len(SUFFIX)], path.name[-len(SUFFIX) :]
    return f"{stem}-{number:05d}-of-{count:05d}{suffix}"


def shard_pattern(path: Path) -> re.Pattern[str]:
    """Matches the name of any shard, of any count, of the output at `path`."""
    stem, suffix = path.name[: -len(SUFFIX)], path.name[-len(SUFFIX) :]
    return re.compile(rf"{re.escape(stem)}-\d{{5,}}-of-\d{{5,}}{re.escape(suffix)}")


def shard_family(path: Path) -> tuple[Path, str] | None:
    """For a file named as a shard is (`x-00001-of-00002.safetensors`), its
    folder and the name of the output it would be a shard of
    (`x.safetensors`); None for other names."""
    match = re.fullmatch(rf"(.+)-\d{{5,}}-of-\d{{5,}}({re.escape(SUFFIX)})", path.name, re.I)
    return (path.parent, match[1] + match[2]) if match else None


def split_shards(sizes: Iterable[tuple[str, int]], limit: int) -> list[list[str]]:
    """The keys of each shard, from `(key, bytes)` pairs in storage order, as
    `huggingface_hub.split_state_dict_into_shards_factory` splits them: a
    tensor that would take the current shard past `limit` starts a new one,
    and a tensor larger than `limit` is a shard of its own, placed at once."""
    shards: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for key, size in sizes:
        if size > limit:
            shards.append([key])
            continue
        if filled + size > limit:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += size
    if current:
        shards.append(current)
    return shards
