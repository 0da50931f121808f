"""Writing a view to a file: atomically, and only to a file named for its kind,
so that a view never replaces a model, a recipe or any other file."""

from __future__ import annotations

from pathlib import Path

from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import atomic_file
from sdrecipe.views.scene import Scene

VIEW_SUFFIXES = {
    "svg": (".svg",),
    "png": (".png",),
    "mermaid": (".mmd", ".md"),
    "dot": (".dot", ".gv"),
    "json": (".json",),
}


def write_view(path: Path, kind: str, content: str | Scene) -> None:
    """Write `content` (text, or a scene to render as `kind`) to `path`."""
    suffixes = VIEW_SUFFIXES[kind]
    if path.suffix.lower() not in suffixes:
        raise RecipeError(
            f"{path}: a {kind} view is written to a {' or '.join(suffixes)} file, so that "
            "it never replaces a model, a recipe or another file"
        )
    with atomic_file(path) as temporary:
        if isinstance(content, Scene) and kind == "png":
            content.to_png(temporary)
        else:
            text = content.to_svg() if isinstance(content, Scene) else content
            temporary.write_text(text, encoding="utf-8")
