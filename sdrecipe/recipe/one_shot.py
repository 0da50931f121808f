"""Recipes for the one-shot commands `sdrecipe bake` and `sdrecipe extract`.

A one-shot merge still leaves a recipe behind, beside its output, so the
settings are never lost: rerunning the command (or `sdrecipe build` on the
recipe) is a no-op until something changes. An existing recipe with other
content is never replaced.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.io.adapter_files import is_adapter_path
from sdrecipe.io.atomic import write_text_atomically

RECIPE_SUFFIX = ".recipe.yaml"


def recipe_path_for(output: Path) -> Path:
    """Where a one-shot command keeps the recipe of `output`."""
    name = output.name
    stem = name[: -len(output.suffix)] if output.suffix else name
    return output.with_name(stem + RECIPE_SUFFIX)


def parse_adapter(argument: str) -> tuple[Path, float]:
    """`PATH` or `PATH=STRENGTH` (default strength 1); RecipeError for a strength
    that is not a finite number."""
    path, _, strength = argument.rpartition("=")
    if path:
        try:
            value = float(strength)
        except ValueError:
            return Path(argument), 1.0
        if not math.isfinite(value):
            raise RecipeError(f"the strength {strength!r} of {path} is not a finite number")
        return Path(path), value
    return Path(argument), 1.0


def check_bake_inputs(base: Path, adapters: list[Path]) -> None:
    """RecipeError unless `base` is a model and each of `adapters` an adapter."""
    _require_model(base, "the model to bake into (BASE)")
    for path in adapters:
        if not path.exists():
            raise RecipeError("does not exist", path)
        if not is_adapter_path(path):
            raise RecipeError(
                f"is not an adapter: {_described(path)}; bake adds adapters (LoRA, "
                "LyCORIS) to BASE",
                path,
            )


def check_extract_inputs(tuned: Path, base: Path) -> None:
    """RecipeError unless `tuned` and `base` are both models."""
    _require_model(tuned, "the fine-tuned model (TUNED)")
    _require_model(base, "the model it was tuned from (BASE)")


def _require_model(path: Path, role: str) -> None:
    if is_adapter_path(path):
        raise RecipeError(f"is an adapter (LoRA or LyCORIS), not {role}", path)


def _described(path: Path) -> str:
    """What a file that is not an adapter holds, in words (RecipeError if it is
    no model file either)."""
    from sdrecipe.arch.detect import detect
    from sdrecipe.io.readers import open_model

    reader = open_model(path)
    infos = reader.infos()
    if not infos:
        return "it holds no tensors, so no adapter modules"
    architecture = detect(infos, reader.metadata)
    if architecture.family == "unknown":
        return f"none of its {len(infos)} tensors is a LoRA's or LyCORIS module's factor"
    return f"it is a full model ({architecture.describe()})"


def input_name(path: Path, taken: set[str]) -> str:
    """A recipe name for an input file: its stem as an ASCII identifier (accents
    dropped, other characters `_`), made unique."""
    stem = unicodedata.normalize("NFKD", path.name.split(".")[0])
    stem = stem.encode("ascii", "ignore").decode()
    name = re.sub(r"\W", "_", stem) or "input"
    if name[0].isdigit():
        name = "_" + name
    unique, count = name, 2
    while unique in taken:
        unique, count = f"{name}_{count}", count + 1
    taken.add(unique)
    return unique


def _relative(path: Path, folder: Path) -> str:
    return os.path.relpath(path.absolute(), folder.absolute())


def bake_recipe(
    base: Path, adapters: list[tuple[Path, float]], output: dict, allow_unmatched: bool = False
) -> dict:
    """The recipe of `base + s1 * L1 + s2 * L2 ...`, written as `output`; with
    `allow_unmatched`, adapter modules that match no key of `base` are left out."""
    taken: set[str] = set()
    base_name = input_name(base, taken)
    inputs = {base_name: base}
    expression = base_name
    for path, strength in adapters:
        name = input_name(path, taken)
        inputs[name] = path
        sign = "-" if strength < 0 else "+"
        expression += f" {sign} {abs(strength):g} * {name}"
    node = {"expression": expression, "allow_unmatched": True} if allow_unmatched else expression
    return {"inputs": inputs, "nodes": {"baked": node}, "outputs": {"baked": output}}


def extract_recipe(tuned: Path, base: Path, output: dict) -> dict:
    """The recipe of a LoRA of `tuned - base`, written as `output`."""
    taken: set[str] = set()
    tuned_name, base_name = input_name(tuned, taken), input_name(base, taken)
    return {
        "inputs": {tuned_name: tuned, base_name: base},
        "nodes": {"learned": f"{tuned_name} - {base_name}"},
        "outputs": {"learned": output},
    }


# How the recipes that bake and extract write begin (their `comment`).
ONE_SHOT_HEADS = ("# Written by `sdrecipe bake`", "# Written by `sdrecipe extract`")


def write_recipe(recipe: Path, document: dict, comment: str) -> bool:
    """Write `document` to `recipe` (paths relative to its folder); True if the
    file is new. An existing recipe with the same text is kept, one with other
    text is refused, and so is an output file that no recipe of this command
    made (it would be replaced)."""
    folder = recipe.parent
    document = {
        **document,
        "inputs": {name: _relative(path, folder) for name, path in document["inputs"].items()},
        "outputs": {
            name: {**spec, "path": _relative(Path(spec["path"]), folder)}
            for name, spec in document["outputs"].items()
        },
    }
    text = f"# {comment}\n" + yaml.safe_dump(document, sort_keys=False)
    if recipe.exists():
        if _is_binary(recipe):
            raise RecipeError(
                "is not a recipe (it holds binary data: a model?), and sdrecipe does not "
                "replace it; pass --recipe a new .yaml path",
                recipe,
            )
        existing = recipe.read_text(encoding="utf-8", errors="replace")
        if existing == text:
            return False
        if not existing.startswith(ONE_SHOT_HEADS):
            raise RecipeError(
                "is not a recipe that `sdrecipe bake` or `sdrecipe extract` wrote, and "
                "sdrecipe does not replace it; pass --recipe a new .yaml path",
                recipe,
            )
        raise RecipeError(
            "a recipe with other settings is already there, and sdrecipe does not replace "
            "it; build it with `sdrecipe build`, or pass --recipe to keep this one elsewhere",
            recipe,
        )
    for spec in document["outputs"].values():
        output = folder / spec["path"]
        if output.exists():
            raise RecipeError(
                "is already there, and no recipe of this command made it: sdrecipe does not "
                "replace it; choose another output path",
                output,
            )
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(recipe, text)
    return True


def _is_binary(path: Path) -> bool:
    """True when the file's first 8 KiB hold a NUL byte (no text, so no recipe)."""
    with open(path, "rb") as handle:
        return b"\0" in handle.read(8192)


@contextmanager
def kept_only_if_built(recipe: Path, created: bool, command: str) -> Iterator[None]:
    """Remove a recipe this command just wrote if its build fails, so that a
    corrected rerun is not refused as "other settings"; an error that cites the
    removed recipe cites the command instead."""
    try:
        yield
    except BaseException as exc:
        if created:
            recipe.unlink(missing_ok=True)
            if (
                isinstance(exc, SdrecipeError)
                and exc.file is not None
                and Path(exc.file).resolve() == recipe.resolve()
            ):
                exc.file, exc.line = f"sdrecipe {command}", None
        raise
