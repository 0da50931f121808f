"""Writing a view to a file: atomically, only to a file named for its kind,
never over what its command reads, and over an existing file only if it is a
view that sdrecipe wrote (or with --force), so that a view never replaces a
model, a recipe or any other file. Each written view carries sdrecipe's mark
(see `sdrecipe.io.view_marks`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import atomic_file
from sdrecipe.io.view_marks import JSON_FIELD, MARK, PNG_TEXT, TEXT_HEADS
from sdrecipe.plan.guard import target_problem
from sdrecipe.views.scene import Scene

VIEW_SUFFIXES = {
    "svg": (".svg",),
    "png": (".png",),
    "mermaid": (".mmd", ".md"),
    "dot": (".dot", ".gv"),
    "json": (".json",),
}


@dataclass(frozen=True)
class ViewFile:
    """Where a view of `kind` goes, and what it must not touch (`protected`:
    each path its command reads, with a description)."""

    path: Path
    kind: str
    protected: Sequence[tuple[str, Path]]
    force: bool = False

    def check(self) -> None:
        """Raise RecipeError (exit 2) unless the view may be written to `path`."""
        suffixes = VIEW_SUFFIXES[self.kind]
        if self.path.suffix.lower() not in suffixes:
            raise RecipeError(
                f"{self.path}: a {self.kind} view is written to a {' or '.join(suffixes)} "
                "file, so that it never replaces a model, a recipe or another file"
            )
        problem = target_problem(self.path, self.kind, self.protected, self.force)
        if problem:
            raise RecipeError(
                f"{self.path} {problem}; sdrecipe never replaces what it did not write, so "
                "choose another file for the view"
            )
        if not self.path.parent.is_dir():
            raise RecipeError(f"{self.path}: the folder {self.path.parent} does not exist")


def view_file(
    path: Path, kind: str, protected: Sequence[tuple[str, Path]], force: bool = False
) -> ViewFile:
    """The checked place for a view: call before any work, so that a refusal costs none."""
    target = ViewFile(path, kind, protected, force)
    target.check()
    return target


def write_view(target: ViewFile, content: str | Scene | dict[str, Any]) -> None:
    """Write `content` (text, a JSON object, or a scene to render as the kind)
    with sdrecipe's mark, checking the place once more just before."""
    target.check()
    with atomic_file(target.path) as temporary:
        if isinstance(content, Scene) and target.kind == "png":
            content.to_png(temporary, dict([PNG_TEXT]))
        else:
            temporary.write_text(_marked_text(target.kind, content), encoding="utf-8")


def _marked_text(kind: str, content: str | Scene | dict[str, Any]) -> str:
    """A text view of `kind` beginning with sdrecipe's mark."""
    if isinstance(content, dict):
        return json.dumps({JSON_FIELD: MARK, **content}, indent=2) + "\n"
    return TEXT_HEADS[kind] + (content.to_svg() if isinstance(content, Scene) else content)
