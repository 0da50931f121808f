"""An output's `max_shard_size`, and where an output written as shards lies
(imports no torch).

A format whose file may be sharded (`OutputFormat.sharded_file`) is written, with
`max_shard_size`, as shards beside an index (named as `sdrecipe.io.shard_files`
says). A model that fits in one shard is one plain file at the output's path,
with no index.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from sdrecipe.io.output_formats import output_format
from sdrecipe.io.shard_files import index_path

if TYPE_CHECKING:
    from sdrecipe.recipe.model import Output

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
    """True when `output` is a single file that may be sharded: a format whose
    file may be, with `max_shard_size`."""
    return output.max_shard_size is not None and output_format(output.format).sharded_file


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
