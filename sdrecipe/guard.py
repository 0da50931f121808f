"""Refuse outputs that would destroy what sdrecipe did not write.

An output may not be, contain or lie inside an input (a baked VAE included),
the recipe, its lock file, another output or the cache folder; an existing
output path must be a regular file, or for a diffusers output a folder that
sdrecipe wrote. Paths are compared after resolving symlinks, and existing
files also by identity, so `out/../x`, a symlink or a hard link to an input is
caught. Everything here reads file-system metadata and at most a few header
bytes, before anything is written, and imports no torch.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from sdrecipe.errors import RecipeError
from sdrecipe.io.bounded_json import load_json
from sdrecipe.lock import lock_path
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.schema import LEGACY_PROVENANCE_FIELD, RECIPE_FIELD

# A diffusers folder that sdrecipe wrote carries its provenance in this file's header.
MARKED_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
_MAX_MARKER_HEADER = 100 * 1024 * 1024


def check_outputs(recipe: Recipe, cache_root: Path | None, names: Iterable[str]) -> None:
    """Raise RecipeError (exit 2) if writing any of the outputs `names` could
    replace or delete a file that sdrecipe did not write."""
    protected = {f"input {name!r}": spec.path for name, spec in recipe.inputs.items()}
    protected["the recipe"] = recipe.path
    protected["the recipe's lock file"] = lock_path(recipe.path)
    if cache_root is not None:
        protected["the cache folder"] = cache_root
    for name in names:
        spec = recipe.outputs[name]
        problem = _unwritable_target(spec.path, spec.format)
        for what, path in protected.items():
            relation = _overlap(spec.path, path)
            if relation:
                problem = f"{relation} {what} ({path})"
        if problem:
            raise RecipeError(
                f"output {name!r}: {spec.path} {problem}; sdrecipe never replaces what it did "
                "not write, so choose another output path",
                recipe.path,
                spec.line,
            )
        for other, other_spec in recipe.outputs.items():
            relation = other != name and _overlap(spec.path, other_spec.path)
            if relation:
                raise RecipeError(
                    f"outputs {name!r} and {other!r} would write the same place: {spec.path} "
                    f"{relation} {other_spec.path}",
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


def _unwritable_target(path: Path, output_format: str) -> str | None:
    """Why an existing `path` may not be replaced by an output, or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if output_format == "diffusers":
        if not stat.S_ISDIR(mode):
            return "exists and is not a folder"
        if not written_by_sdrecipe(path):
            return "is a folder that sdrecipe did not write (it has no sdrecipe provenance)"
        return None
    if not stat.S_ISREG(mode):
        return "exists and is not a regular file"
    return None


def written_by_sdrecipe(folder: Path) -> bool:
    """True for an empty folder, or a diffusers folder whose UNet file's header
    holds sdrecipe's provenance."""
    if not any(folder.iterdir()):
        return True
    try:
        with open(folder / MARKED_WEIGHTS, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_MARKER_HEADER:
                return False
            header = load_json(handle.read(length))
        metadata = header.get("__metadata__", {})
        return any(field in metadata for field in (RECIPE_FIELD, LEGACY_PROVENANCE_FIELD))
    except (OSError, ValueError, struct.error, AttributeError):
        return False
