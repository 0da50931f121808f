"""The index of a sharded safetensors model, read and checked (imports no torch).

transformers and diffusers store a large model as numbered shards beside an
index, `model.safetensors.index.json`:
`{"metadata": {...}, "weight_map": {key: shard file name}}`. sdrecipe reads
such a model when a recipe names its index. Shards are plain file names in the
index's folder: nothing outside that folder is ever opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdrecipe.errors import RecipeError, describe_os_error
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.mapped_files import require_regular_file
from sdrecipe.io.text_files import FileTooLarge, NotRegularFile, read_small_file

# `model.safetensors.index.json`, `x.safetensors.index.fp16.json` (diffusers' old variant
# naming), `pytorch_model.bin.index.json` (refused as an input, with a reason).
INDEX_NAME = re.compile(r".+\.index(\.[\w-]+)?\.json", re.IGNORECASE)
# `model-00001-of-00003.safetensors`, `diffusion_pytorch_model.fp16-00001-of-00002.safetensors`.
SHARD_NAME = re.compile(r".+-(\d+)-of-(\d+)\.safetensors", re.IGNORECASE)
MAX_INDEX_BYTES = 64 * 1024 * 1024
# {"metadata": {...}, "weight_map": {...}} nests 2 levels; some tools nest metadata more.
MAX_INDEX_DEPTH = 8


@dataclass(frozen=True)
class ShardIndex:
    """A checked index: every key's shard, and the shards' names, sorted."""

    path: Path
    weight_map: dict[str, str]
    shards: tuple[str, ...]

    def shard_path(self, name: str) -> Path:
        """Where shard `name` lies: beside the index."""
        return self.path.parent / name

    def files(self) -> list[Path]:
        """The index and its shards: every file the model is made of."""
        return [self.path, *(self.shard_path(name) for name in self.shards)]


def is_shard_index(path: Path) -> bool:
    """True when `path` is named as a shard index is (`*.index.json`)."""
    return INDEX_NAME.fullmatch(path.name) is not None


def read_index(path: Path, suffix: str = ".safetensors") -> ShardIndex:
    """The index at `path`, checked: a JSON object with a non-empty `weight_map`
    of keys to plain file names ending in `suffix` that exist beside it as regular
    files. RecipeError (exit 2), naming the file and the key, for anything else."""
    require_regular_file(path)
    try:
        data = read_small_file(path, MAX_INDEX_BYTES)
    except OSError as exc:
        raise RecipeError(f"cannot read the shard index: {describe_os_error(exc)}", path) from None
    except NotRegularFile as exc:  # replaced since the check above
        raise RecipeError(f"the shard index is a {exc}, not a file", path) from None
    except FileTooLarge:
        raise RecipeError(
            f"the shard index is larger than {MAX_INDEX_BYTES // 2**20} MiB: not an index", path
        ) from None
    try:
        document = load_json(data, max_depth=MAX_INDEX_DEPTH)
    except ValueError as exc:
        raise RecipeError(f"the shard index is not valid JSON: {exc}", path) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise RecipeError(
            'the shard index has no "weight_map" (an object of tensor names to shard files)',
            path,
        )
    for key, name in weight_map.items():
        _check_shard_name(path, key, name, suffix)
    index = ShardIndex(path, dict(weight_map), tuple(sorted(set(weight_map.values()))))
    first_key = {name: key for key, name in reversed(weight_map.items())}
    for name in index.shards:
        shard = index.shard_path(name)
        if not shard.exists():
            raise RecipeError(
                f"the index maps {first_key[name]!r} to {name}, which is missing from "
                f"{path.parent} (incomplete download?)",
                path,
            )
        require_regular_file(shard)
    return index


def _check_shard_name(index: Path, key: str, name: object, suffix: str) -> None:
    """Refuse a shard name that is not a plain file name of the index's folder."""
    if not isinstance(name, str):
        raise RecipeError(f"the index maps {key!r} to {name!r}, which is not a file name", index)
    if name in ("", ".", "..") or any(mark in name for mark in ("/", "\\", "\0", "..")):
        raise RecipeError(
            f"the index maps {key!r} to {name!r}: a shard must be a file name in the index's "
            "folder, without a path separator or `..`",
            index,
        )
    if not name.lower().endswith(suffix):
        raise RecipeError(
            f"the index maps {key!r} to {name}, which is not a {suffix} file (sdrecipe reads "
            f"sharded {suffix} models only; convert the shards to safetensors)",
            index,
        )


def index_files(path: Path) -> list[Path] | None:
    """The index at `path` and its shards, or None when it cannot be read as one
    (the reader says why, when the model is opened)."""
    try:
        return read_index(path).files()
    except RecipeError:
        return None


def lone_shard_error(path: Path) -> RecipeError | None:
    """The error for a recipe that names one shard of a sharded model (it would
    be merged as if its keys were the whole model), or None for other files."""
    match = SHARD_NAME.fullmatch(path.name)
    if match is None or int(match[2]) < 2:
        return None
    try:
        indexes = sorted(
            found.name
            for found in path.parent.iterdir()
            if INDEX_NAME.fullmatch(found.name) and ".safetensors" in found.name.lower()
        )
    except OSError:
        indexes = []
    hint = (
        f"name its index instead: {path.parent / indexes[0]}"
        if indexes
        else "name the model's index JSON (`*.safetensors.index.json`) instead"
    )
    return RecipeError(
        f"this is shard {int(match[1])} of {int(match[2])} of a sharded model, not a whole "
        f"model; {hint}",
        path,
    )
