"""The no-op check: are the outputs current, decided from the lock and file stats alone.

This path imports no torch and reads no model data, so an up-to-date build
returns at once. Anything it cannot prove current goes to the full build.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sdrecipe.cache.store import DIGEST, SHA256, Cache
from sdrecipe.io.atomic import remove_stale_temporaries
from sdrecipe.io.fingerprint import FileStat
from sdrecipe.io.shard_layout import written_path
from sdrecipe.plan.graph import build_graph
from sdrecipe.plan.guard import check_cache_folder, check_outputs
from sdrecipe.recipe import load_recipe
from sdrecipe.recipe.lock import built_from, read_lock


def current_outputs(
    recipe_path: Path, selected: Iterable[str] | None, cache: Cache
) -> dict[str, Path] | None:
    """The selected outputs and their paths if every one is provably current, else None.

    Unsafe output paths are refused here too, and temporaries that killed
    builds left beside the outputs are removed."""
    recipe = load_recipe(recipe_path)
    graph = build_graph(recipe, selected)
    check_cache_folder(recipe, cache.root)
    check_outputs(recipe, cache.root, graph.outputs)
    for name in graph.outputs:
        remove_stale_temporaries(recipe.outputs[name].path.parent)
    lock = read_lock(recipe_path)
    if lock is None:
        return None
    current = {}
    for name in graph.outputs:
        entry = lock.outputs.get(name)
        if entry is None:
            return None
        shas = {}
        for leaf in graph.output_inputs(name):
            spec = recipe.inputs[leaf]
            sha = _known(cache, SHA256, spec.path)
            if sha is None or (spec.sha256 and spec.sha256 != sha):
                return None
            shas[leaf] = sha
        path = written_path(recipe.outputs[name])
        if built_from(recipe.text, shas) != entry.built_from:
            return None
        if _known(cache, DIGEST, path) != entry.digest:
            return None
        current[name] = path
    return current


def _known(cache: Cache, memo: str, path: Path) -> str | None:
    """What the cache remembers of `path` (its `memo`) for its current stat."""
    try:
        stat = FileStat.of(path)
    except OSError:
        return None
    return cache.known(memo, path, stat)
