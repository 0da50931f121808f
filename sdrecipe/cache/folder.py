"""Which folders may be the cache, and the marker that says sdrecipe made one.

A cache folder is one sdrecipe made and marked, or a new or empty one (an
unmarked folder of an earlier version is adopted when every name in it, in
`objects/` and in `packs/` is of the cache's own naming); anything else, and
any folder inside a `.git`, is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import write_text_atomically

# What an unmarked folder may hold to be adopted as a cache of an earlier version
# (a repository may keep the empty cache folder with a .gitkeep or .gitignore).
_ANY_TEMPORARY = r"\.[^/]+\.sdrecipe-\d+\.tmp"
_OWN_NAMES = {
    "": re.compile(
        r"index\.sqlite(?:\.damaged-[0-9-]+)?(?:-wal|-shm)?|\.lock|\.open\.lock|objects|packs"
        rf"|inputs|CACHEDIR\.TAG|\.gitkeep|\.gitignore|{_ANY_TEMPORARY}"
    ),
    "objects": re.compile(rf"[0-9a-f]{{2}}|{_ANY_TEMPORARY}"),
    "packs": re.compile(rf"[0-9a-f]{{64}}\.safetensors|{_ANY_TEMPORARY}"),
    "inputs": re.compile(rf"[0-9a-f]{{64}}(?:\.[^/]*)?|sources\.json|{_ANY_TEMPORARY}"),
}
# The marker of a folder sdrecipe made its cache: a standard cache directory
# tag (backup tools skip the folder), with a line that names sdrecipe.
MARKER = "CACHEDIR.TAG"
_MARKER_TEXT = """Signature: 8a477f597d28d172789f06886806bc55
# This file is a cache directory tag created by sdrecipe: this folder is its
# tensor cache. For information about cache directory tags see
# https://bford.info/cachedir/
"""


def check_cache_root(root: Path) -> None:
    """Raise RecipeError (exit 2) unless `root` may be a cache folder: it is not
    in a `.git`, and it is new, empty, marked as sdrecipe's cache, or holds only
    names of the cache's own (a cache made before folders were marked)."""
    where = f"the cache folder {root} (--cache-dir, or SDRECIPE_CACHE_DIR)"
    if ".git" in Path(os.path.realpath(root)).parts:
        raise RecipeError(
            f"{where} is inside a git repository's .git folder; choose a folder outside it"
        )
    if _is_marked(root):
        return
    try:
        foreign = sorted(
            f"{folder}/{name}".lstrip("/")
            for folder, names in _listings(root).items()
            for name in names
            if not _OWN_NAMES[folder].fullmatch(name)
        )
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RecipeError(f"{where} cannot be used: {exc.strerror or exc}") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise RecipeError(
            f"{where} holds files that are not sdrecipe's ({shown}) and no {MARKER} of "
            "sdrecipe's; the cache deletes what it no longer needs, so it only takes a new or "
            "empty folder, or one it made: choose another"
        )


def mark(root: Path) -> None:
    """Write sdrecipe's cache marker into the existing folder `root`, unless it has one."""
    if not _is_marked(root):
        write_text_atomically(root / MARKER, _MARKER_TEXT)


def _is_marked(root: Path) -> bool:
    """True if `root` holds sdrecipe's cache marker (a regular file)."""
    if not (root / MARKER).is_file():
        return False
    try:
        with open(root / MARKER, encoding="utf-8", errors="replace") as handle:
            text = handle.read(4096)
    except OSError:
        return False
    return text.startswith(_MARKER_TEXT.splitlines()[0]) and "created by sdrecipe" in text


def _listings(root: Path) -> dict[str, list[str]]:
    """The names in `root` and in those of its own subfolders that exist."""
    names = os.listdir(root)
    listings = {"": names}
    for folder in ("objects", "packs", "inputs"):
        if folder in names:
            listings[folder] = os.listdir(root / folder)
    return listings
