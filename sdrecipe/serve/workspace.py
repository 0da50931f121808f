"""What the web view knows of its folder: a snapshot of the recipes, their
outputs' statuses (the one status rule) and graphs, taken anew when a file
they name changes; and which files the server may read."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdrecipe import api
from sdrecipe.engine.events import Listener
from sdrecipe.engine.options import Options
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.plan.recipe_set import RECIPE_SUFFIXES, RecipeSet, load_recipe_set
from sdrecipe.plan.status import NodeStatus, Status
from sdrecipe.recipe import Recipe

MISSING_INPUT = "missing input"
INVALID = "invalid recipe"
# What the server lets a page open: model files and diffusers folders.
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


class Forbidden(SdrecipeError):
    """A path the server does not serve: outside the folder and the recipes' files."""

    exit_code = 2


class NotFound(SdrecipeError):
    """No such build, or no such file (yet)."""

    exit_code = 2


@dataclass(frozen=True)
class OutputRow:
    """An output as the recipe list shows it; `variables` are its matrix values."""

    name: str
    path: str
    status: str
    reason: str
    exists: bool
    variables: dict[str, str | int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipeRow:
    """A recipe file of the folder: its outputs, or why it cannot be assessed."""

    file: str
    outputs: tuple[OutputRow, ...]
    error: str | None = None
    sweep: bool = False


@dataclass(frozen=True)
class Snapshot:
    """The folder as last assessed; `version` counts the snapshots taken."""

    recipes: tuple[RecipeRow, ...] = ()
    recipe_set: RecipeSet | None = None
    statuses: dict[Path, list[NodeStatus]] = field(default_factory=dict)
    version: int = 0

    def recipe(self, file: str) -> Recipe:
        """The loaded recipe named `file` (relative to the folder)."""
        for recipe in self.recipe_set.recipes if self.recipe_set else ():
            if recipe.path.name == file:
                return recipe
        row = next((row for row in self.recipes if row.file == file), None)
        if row is not None and row.error:
            raise RecipeError(row.error)
        raise RecipeError(f"no recipe {file!r} in the folder")

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "recipes": [
                {
                    "file": row.file,
                    "error": row.error,
                    "sweep": row.sweep,
                    "outputs": [vars(output) for output in row.outputs],
                }
                for row in self.recipes
            ],
        }


class Workspace:
    """A folder of recipes, the options its builds use, and its latest snapshot."""

    def __init__(self, folder: Path, options: Options):
        self.folder = folder.resolve()
        self.options = options
        self.snapshot = Snapshot()

    def recipe_files(self) -> list[Path]:
        """The folder's recipe files, in name order."""
        return sorted(
            path
            for path in self.folder.iterdir()
            if path.suffix in RECIPE_SUFFIXES
            and path.is_file()
            and path.resolve().is_relative_to(self.folder)  # no symlink out of the folder
        )

    def assess(self, on_event: Listener | None = None) -> Snapshot:
        """Load and assess every recipe (reading headers, never tensor data) and
        keep the result as the snapshot; `on_event` hears the notes (waiting for
        the cache lock, say)."""
        recipe_set = load_recipe_set(self.recipe_files(), keep_going=True)
        failed: dict[Path, SdrecipeError] = {}
        assessed = api.assess_statuses(recipe_set, [], self.options, False, failed, on_event)
        statuses = {recipe.path: found for recipe, found in assessed if recipe.path not in failed}
        rows = [
            _row(recipe, statuses.get(recipe.path), failed.get(recipe.path))
            for recipe in recipe_set.recipes
        ]
        rows += [RecipeRow(path.name, (), str(error)) for path, error in recipe_set.broken.items()]
        rows.sort(key=lambda row: row.file)
        self.snapshot = Snapshot(tuple(rows), recipe_set, statuses, self.snapshot.version + 1)
        return self.snapshot

    def mark_built(self, recipe: Path, output: str, result: str) -> bool:
        """Show an output the running build has just finished as up to date,
        until the build ends and the folder is assessed again (a build holds
        the cache, so no assessment runs meanwhile). False if not shown here."""
        snapshot = self.snapshot
        reason = f"{result} by the running build"
        rows = list(snapshot.recipes)
        for index, row in enumerate(rows):
            if row.file != recipe.name or recipe.parent.resolve() != self.folder:
                continue
            outputs = tuple(
                replace(o, status="up to date", reason=reason) if o.name == output else o
                for o in row.outputs
            )
            rows[index] = replace(row, outputs=outputs)
            # Its node too, so that the graph and the node's panel say the same.
            statuses = dict(snapshot.statuses)
            for path, found in statuses.items():
                if path.name == recipe.name:
                    statuses[path] = [
                        replace(s, status=Status.UP_TO_DATE, reason=reason)
                        if s.output == output
                        else s
                        for s in found
                    ]
            self.snapshot = replace(
                snapshot, recipes=tuple(rows), statuses=statuses, version=snapshot.version + 1
            )
            return True
        return False

    def watched(self) -> tuple[tuple[str, int, int], ...]:
        """The stat of every file a snapshot depends on: the folder's recipes and
        locks, and each recipe's inputs and outputs. A change means a new snapshot."""
        paths = [
            path for path in self.folder.iterdir() if path.suffix in (*RECIPE_SUFFIXES, ".lock")
        ]
        paths += self.named_files()
        return tuple(sorted(_stat(path) for path in paths))

    def named_files(self) -> list[Path]:
        """The inputs and outputs the snapshot's recipes name (local files only)."""
        recipes = self.snapshot.recipe_set.recipes if self.snapshot.recipe_set else ()
        found: list[Path] = []
        for recipe in recipes:
            found += [spec.path for spec in recipe.inputs.values() if spec.url is None]
            found += [spec.path for spec in recipe.outputs.values()]
        return found

    def readable(self, raw: str) -> Path:
        """The file `raw` names (relative to the folder, or absolute), if the server
        may read it: inside the folder (symlinks resolved), or a file a recipe
        names as an input or output. Anything else is Forbidden."""
        if not raw or "\x00" in raw:
            raise Forbidden("no such file")
        given = Path(raw)
        path = (given if given.is_absolute() else self.folder / given).resolve()
        named = {candidate.resolve() for candidate in self.named_files()}
        if path in named or path.is_relative_to(self.folder):
            return path
        raise Forbidden(f"{raw} is outside {self.folder} and no recipe there names it")

    def model_files(self) -> list[str]:
        """What a file picker offers: model files in the folder's tree and the
        inputs and outputs its recipes name, as paths relative to the folder
        where they lie in it."""
        found: dict[str, None] = {}
        for path in _walk(self.folder):
            if path.suffix.lower() in MODEL_SUFFIXES or (path / "model_index.json").is_file():
                found[os.path.relpath(path, self.folder)] = None
        for path in self.named_files():
            if path.exists():
                found[os.path.relpath(path.resolve(), self.folder)] = None
        return sorted(found)


def _row(
    recipe: Recipe, statuses: list[NodeStatus] | None, failure: SdrecipeError | None
) -> RecipeRow:
    """The recipe's outputs with their statuses; where it could not be assessed,
    *missing input* (an input file is not there) or *invalid recipe*, and why."""
    by_output = {status.output: status for status in statuses or () if status.output}
    error = None if failure is None else str(failure)
    missing = any(not i.path.exists() for i in recipe.inputs.values() if i.url is None)
    outputs = []
    for name, spec in recipe.outputs.items():
        found = by_output.get(name)
        status = found.status.value if found else MISSING_INPUT if missing else INVALID
        outputs.append(
            OutputRow(
                name,
                str(spec.path),
                status,
                found.reason if found else (error or ""),
                spec.path.exists(),
                dict(spec.variables),
            )
        )
    sweep = any(spec.variables for spec in recipe.outputs.values())
    return RecipeRow(recipe.path.name, tuple(outputs), error, sweep)


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), stat.st_mtime_ns, stat.st_size)


def _walk(folder: Path, depth: int = 4) -> Iterable[Path]:
    """Files and folders under `folder`, not following symlinks out of it."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(folder):
            continue
        yield entry
        if entry.is_dir() and depth > 1:
            yield from _walk(entry, depth - 1)
