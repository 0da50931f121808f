"""Refuse outputs and view files that would destroy what sdrecipe did not write.

An output may not be, contain or lie inside an input (a baked VAE included),
the recipe, its lock file, another output or the cache folder; an existing
output path must be a file that sdrecipe wrote (its header holds sdrecipe's
provenance, or the recipe's lock names it), or for a diffusers output a folder
that sdrecipe wrote. A view file (`graph -o`, `diff --svg`) follows the same rule
over what its command reads, and may replace only a view that sdrecipe wrote
(see `sdrecipe.io.view_marks`) unless forced. Paths are compared after resolving
symlinks, and existing files also by identity, so `out/../x`, a symlink or a
hard link to an input is caught. Everything here reads file-system metadata and
at most a few header bytes, before anything is written, and imports no torch.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from sdrecipe.cache.store import check_cache_root
from sdrecipe.errors import RecipeError
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.output_formats import OUTPUT_FORMATS
from sdrecipe.io.shard_files import index_path, shard_family, shard_pattern
from sdrecipe.io.shard_index import index_files, is_shard_index
from sdrecipe.io.shard_layout import shards_apply
from sdrecipe.io.view_marks import VIEW_KINDS, carries_mark
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.lock import lock_path, read_lock
from sdrecipe.recipe.schema import LEGACY_PROVENANCE_FIELD, RECIPE_FIELD

# A diffusers folder that sdrecipe wrote carries its provenance in this file's
# header: the UNet's, or the transformer's (Flux.1, SD3).
MARKED_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
MARKED_TRANSFORMER_WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"
_MAX_MARKER_HEADER = 100 * 1024 * 1024


def check_outputs(recipe: Recipe, cache_root: Path | None, names: Iterable[str]) -> None:
    """Raise RecipeError (exit 2) if writing any of the outputs `names` could
    replace or delete a file that sdrecipe did not write."""
    protected = protected_paths(recipe, cache_root)
    places = _OutputPlaces(recipe)
    for name in names:
        spec = recipe.outputs[name]
        problem = target_problem(spec.path, spec.format, protected)
        if problem is None and shards_apply(spec):
            problem = _shards_problem(spec.path, protected)
        if problem is None:
            clash = places.clash(name)
            if clash:
                relation, other = clash
                raise RecipeError(
                    f"outputs {name!r} and {other!r} would write the same place: {spec.path} "
                    f"{relation} {recipe.outputs[other].path}",
                    recipe.path,
                    spec.line,
                )
        if problem is None and not OUTPUT_FORMATS[spec.format].folder:
            problem = _foreign_file(spec.path, recipe)
        if problem:
            raise RecipeError(
                f"output {name!r}: {spec.path} {problem}; sdrecipe never replaces what it did "
                "not write, so choose another output path",
                recipe.path,
                spec.line,
            )


def _foreign_file(path: Path, recipe: Recipe) -> str | None:
    """Why the existing file at an output's `path` may not be replaced: it
    carries no sdrecipe provenance and the recipe's lock does not name it
    (sdrecipe did not write it), else None."""
    if not path.is_file() or _carries_provenance(path):
        return None
    lock = read_lock(recipe.path)
    written = {
        os.path.realpath(recipe.path.parent / entry.path)
        for entry in (lock.outputs.values() if lock else ())
    }
    if os.path.realpath(path) in written:
        return None
    return (
        "exists, and sdrecipe did not write it (it holds no sdrecipe provenance and the "
        "recipe's lock does not name it); move it away if it may go"
    )


def _shards_problem(path: Path, protected: Sequence[tuple[str, Path]]) -> str | None:
    """Why writing the shards and index of the output at `path` could replace or
    delete what sdrecipe did not write, or None: the index is checked as the
    output's path is, and so is every file in its folder named as one of its
    shards would be, of any count (an input among them, or a link to one)."""
    index = index_path(path)
    problem = target_problem(index, "safetensors", protected)
    if problem:
        return f"has the shard index {index.name}, which {problem}"
    folder = Path(os.path.realpath(path.parent))
    pattern = shard_pattern(path)
    named = [(what, other) for what, other in protected if pattern.fullmatch(other.name)]
    for what, other in named:
        if Path(os.path.realpath(other.parent)) == folder:
            return f"would have {other.name} as a shard, which is {what}"
    try:
        existing = [found for found in folder.iterdir() if pattern.fullmatch(found.name)]
    except OSError:
        existing = []
    for shard in existing:
        problem = target_problem(shard, "safetensors", protected)
        if problem:
            return f"would have {shard.name} as a shard, which {problem}"
    return None


class _OutputPlaces:
    """Every output by resolved path, by each folder above it, and (if it
    exists) by file identity, so that finding an output's clash with another
    costs the depth of its path: a sweep has up to 1,000 outputs, and comparing
    every pair took minutes. A sharded output is also at its index, and
    clashes with an output named as one of its shards would be."""

    def __init__(self, recipe: Recipe):
        self.real: dict[str, Path] = {}
        self.places: dict[str, list[object]] = {}  # real path, and (device, inode)
        self.seeks: dict[str, list[object]] = {}  # marks of others it clashes with
        self.at: dict[object, list[str]] = {}
        self.under: dict[Path, list[str]] = {}
        for name, spec in recipe.outputs.items():
            real = self.real[name] = Path(os.path.realpath(spec.path))
            places = self.places[name] = [real]
            marks: list[object] = []
            seeks = self.seeks[name] = []
            if shards_apply(spec):
                places.append(index_path(real))
                marks.append(("shards of", real.parent, real.name))
                seeks.append(("a shard of", real.parent, real.name))
            family = shard_family(real)
            if family is not None:
                marks.append(("a shard of", *family))
                seeks.append(("shards of", *family))
            try:
                found = os.stat(spec.path)
            except OSError:
                pass
            else:
                places.append((found.st_dev, found.st_ino))
            for place in [*places, *marks]:
                self.at.setdefault(place, []).append(name)
            for folder in real.parents:
                self.under.setdefault(folder, []).append(name)

    def clash(self, name: str) -> tuple[str, str] | None:
        """How output `name` would touch another output (`is`, `contains`, `lies
        inside`) and which, or None."""
        real = self.real[name]
        for place in [*self.places[name], *self.seeks[name]]:
            for other in self.at.get(place, ()):
                if other != name:
                    return "is", other
        if real in self.under:
            return "contains", self.under[real][0]
        for folder in real.parents:
            if folder in self.at:
                return "lies inside", self.at[folder][0]
        return None


def protected_paths(recipe: Recipe, cache_root: Path | None) -> list[tuple[str, Path]]:
    """What writing for `recipe` must not touch, each with its description: the
    inputs, the recipe, its lock file and the cache folder."""
    protected = [(f"input {name!r}", spec.path) for name, spec in recipe.inputs.items()]
    for name, spec in recipe.inputs.items():
        shards = index_files(spec.path) if is_shard_index(spec.path) else None
        protected += [(f"a shard of input {name!r}", shard) for shard in (shards or [])[1:]]
    protected += [("the recipe", recipe.path), ("the recipe's lock file", lock_path(recipe.path))]
    if cache_root is not None:
        protected.append(("the cache folder", cache_root))
    return protected


def target_problem(
    path: Path, target_format: str, protected: Sequence[tuple[str, Path]], force: bool = False
) -> str | None:
    """Why writing `path` (an output's format, or a view's kind) could replace or
    delete what sdrecipe did not write, or None; `force` lets a view replace an
    existing file without sdrecipe's mark, never anything in `protected`."""
    for what, other in protected:
        relation = _overlap(path, other)
        if relation:
            return f"{relation} {what} ({other})"
    return _unwritable_target(path, target_format, force)


def check_cache_folder(recipe: Recipe, cache_root: Path) -> None:
    """Raise RecipeError (exit 2) unless `cache_root` may hold the cache (see
    `check_cache_root`) and neither is, contains nor lies inside an input: the
    cache deletes what it no longer needs. (Outputs: `check_outputs`.)"""
    check_cache_root(cache_root)
    for name, spec in recipe.inputs.items():
        relation = spec.url is None and _overlap(cache_root, spec.path)
        if relation:
            raise RecipeError(
                f"the cache folder {cache_root} {relation} input {name!r} ({spec.path}); the "
                "cache deletes what it no longer needs, so keep it apart from the recipe's "
                "inputs (--cache-dir, or SDRECIPE_CACHE_DIR)",
                recipe.path,
                spec.line,
            )


def _overlap(output: Path, other: Path) -> str | None:
    """How writing `output` would touch `other`, or None if it would not."""
    real_output, real_other = Path(os.path.realpath(output)), Path(os.path.realpath(other))
    if real_output == real_other or _same_file(output, other):
        return "is"
    if real_other.is_relative_to(real_output):
        return "contains"
    if real_output.is_relative_to(real_other):
        return "lies inside"
    return None


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _unwritable_target(path: Path, output_format: str, force: bool) -> str | None:
    """Why an existing `path` may not be replaced by an output or view, or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if output_format in OUTPUT_FORMATS and OUTPUT_FORMATS[output_format].folder:
        if not stat.S_ISDIR(mode):
            return "exists and is not a folder"
        if not written_by_sdrecipe(path):
            return "is a folder that sdrecipe did not write (it has no sdrecipe provenance)"
        return None
    if not stat.S_ISREG(mode):
        return "exists and is not a regular file"
    if output_format in VIEW_KINDS and not force and not _marked_view(path, output_format):
        return (
            f"exists and is not a {output_format} view that sdrecipe wrote (it has no "
            "sdrecipe mark; --force replaces it)"
        )
    return None


def _marked_view(path: Path, kind: str) -> bool:
    try:
        return carries_mark(path, kind)
    except OSError:
        return False


def written_by_sdrecipe(folder: Path) -> bool:
    """True for an empty folder, or a diffusers folder whose UNet (or
    transformer) file's header (or its first shard's) holds sdrecipe's provenance."""
    if not any(folder.iterdir()):
        return True
    return any(
        _carries_provenance(folder / weights)
        for weights in (MARKED_WEIGHTS, MARKED_TRANSFORMER_WEIGHTS)
    )


def _carries_provenance(marked: Path) -> bool:
    shards = None if marked.exists() else index_files(index_path(marked))
    if shards:  # written with `max_shard_size`: every shard carries the provenance
        marked = shards[1]
    try:
        with open(marked, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_MARKER_HEADER:
                return False
            header = load_json(handle.read(length))
        metadata = header.get("__metadata__", {})
        return any(field in metadata for field in (RECIPE_FIELD, LEGACY_PROVENANCE_FIELD))
    except (OSError, ValueError, struct.error, AttributeError):
        return False
