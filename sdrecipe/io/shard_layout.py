"""How a sharded safetensors output is laid out (imports no torch).

An output with `max_shard_size` is written as Hugging Face's
`save_torch_state_dict` writes a model: tensors go into shards greedily, in
the order they are stored, a new shard starting where the next tensor would
pass the limit and a tensor larger than the limit taking a shard of its own;
the shards are `<stem>-00001-of-0000N.safetensors` beside the index
`<name>.safetensors.index.json`. A model that fits in one shard is one plain
file at the output's path, with no index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdrecipe.recipe.model import Output

SUFFIX = ".safetensors"
# Hugging Face's units: GB = 10^9 bytes, GiB = 2^30.
UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_EXAMPLES = "a number of bytes, or a size such as 5GB, 500MB or 2GiB (GB = 10^9 bytes, GiB = 2^30)"


def parse_shard_size(value: object) -> int:
    """`max_shard_size` in bytes, from a whole number of bytes or a size with a
    unit (`5GB`, `500MB`, `2GiB`, `1.5GB`); ValueError for anything else, or for
    less than one byte. A unit's `B` is a capital letter: transformers reads `Gb`
    as gigabits, so `5gb` is refused rather than guessed."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be {_EXAMPLES}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value.strip())
        unit = match[2].lower() if match else None
        if match is None or unit not in UNITS:
            raise ValueError(f"must be {_EXAMPLES}")
        if match[2].endswith("b"):
            prefix = match[2][:-1]
            fixed = f"{match[1]}{prefix[:1].upper()}{prefix[1:].lower()}B"
            raise ValueError(f"write the unit with a capital B, e.g. {fixed} (b can mean bits)")
        size = int(Decimal(match[1]) * UNITS[unit])
    if size < 1:
        raise ValueError(f"must be at least 1 byte ({_EXAMPLES})")
    return size


def shards_apply(output: Output) -> bool:
    """True when `output` is a single safetensors file that may be sharded."""
    return output.max_shard_size is not None and output.format == "safetensors"


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


def written_path(output: Output) -> Path:
    """The file that stands for `output` on disk: its path, except for a
    sharded output (`max_shard_size`) whose path holds nothing and whose index
    exists, which is that index."""
    if not shards_apply(output) or output.path.exists():
        return output.path
    index = index_path(output.path)
    return index if index.exists() else output.path


def output_places(output: Output) -> list[Path]:
    """The paths an output may be written at: its path, and for a safetensors
    output with `max_shard_size` its index (its shards lie beside it)."""
    return [output.path, index_path(output.path)] if shards_apply(output) else [output.path]
