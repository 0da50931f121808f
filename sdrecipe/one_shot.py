"""Recipes for the one-shot commands `sdrecipe bake` and `sdrecipe extract`.

A one-shot merge still leaves a recipe behind, beside its output, so the
settings are never lost: rerunning the command (or `sdrecipe build` on the
recipe) is a no-op until something changes. An existing recipe with other
content is never replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import write_text_atomically

RECIPE_SUFFIX = ".recipe.yaml"


def recipe_path_for(output: Path) -> Path:
    """Where a one-shot command keeps the recipe of `output`."""
    name = output.name
    stem = name[: -len(output.suffix)] if output.suffix else name
    return output.with_name(stem + RECIPE_SUFFIX)


def parse_adapter(argument: str) -> tuple[Path, float]:
    """`PATH` or `PATH=STRENGTH` (default strength 1)."""
    path, _, strength = argument.rpartition("=")
    if path:
        try:
            return Path(path), float(strength)
        except ValueError:
            pass
    return Path(argument), 1.0


def input_name(path: Path, taken: set[str]) -> str:
    """A recipe name for an input file: its stem as an identifier, made unique."""
    stem = path.name.split(".")[0]
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


def bake_recipe(base: Path, adapters: list[tuple[Path, float]], output: dict) -> dict:
    """The recipe of `base + s1 * L1 + s2 * L2 ...`, written as `output`."""
    taken: set[str] = set()
    base_name = input_name(base, taken)
    inputs = {base_name: base}
    expression = base_name
    for path, strength in adapters:
        name = input_name(path, taken)
        inputs[name] = path
        sign = "-" if strength < 0 else "+"
        expression += f" {sign} {abs(strength):g} * {name}"
    return {"inputs": inputs, "nodes": {"baked": expression}, "outputs": {"baked": output}}


def extract_recipe(tuned: Path, base: Path, output: dict) -> dict:
    """The recipe of a LoRA of `tuned - base`, written as `output`."""
    taken: set[str] = set()
    tuned_name, base_name = input_name(tuned, taken), input_name(base, taken)
    return {
        "inputs": {tuned_name: tuned, base_name: base},
        "nodes": {"learned": f"{tuned_name} - {base_name}"},
        "outputs": {"learned": output},
    }


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
        if recipe.read_text(encoding="utf-8", errors="replace") == text:
            return False
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


@contextmanager
def kept_only_if_built(recipe: Path, created: bool) -> Iterator[None]:
    """Remove a recipe this command just wrote if its build fails, so that a
    corrected rerun is not refused as "other settings"."""
    try:
        yield
    except BaseException:
        if created:
            recipe.unlink(missing_ok=True)
        raise
