"""An output's status, decided here for `build`, `plan`, `status`, `graph` and
the API alike.

Two questions, one answer each:
- `proven_current`: are the outputs current, from the lock and file stats
  alone? It imports no torch and reads no model data, so an up-to-date build
  or `status` returns at once; what it cannot prove goes to the assessment.
- `output_status`: given what the assessment found (the output on disk, a
  cached copy, cached tensors), is the output up to date, from cache, or to
  rebuild?
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sdrecipe.cache.store import DIGEST, SHA256, Cache
from sdrecipe.io.atomic import remove_stale_temporaries
from sdrecipe.io.fingerprint import FileStat
from sdrecipe.io.shard_layout import written_path
from sdrecipe.methods.registry import CPU
from sdrecipe.plan.graph import build_graph, output_device
from sdrecipe.plan.guard import check_cache_folder, check_outputs
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.lock import built_from, read_lock


class Status(str, Enum):
    """What a node or output needs before it is current."""

    UP_TO_DATE = "up to date"
    FROM_CACHE = "from cache"
    REBUILD = "rebuild"
    NOT_NEEDED = "not needed"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# Why an output whose file is current is up to date, whichever way that was found.
MATCHES_LOCK = "output matches the lock"


@dataclass(frozen=True)
class OutputFacts:
    """What is known about an output file before building."""

    exists: bool
    current: bool
    pack_available: bool


@dataclass(frozen=True)
class NodeStatus:
    """One node's status and why; `output` names the output it is written as, if any."""

    node: str
    status: Status
    reason: str
    output: str | None = None
    caching: str = ""


def output_status(facts: OutputFacts, all_cached: bool, force: bool) -> Status:
    """The one rule for an output: up to date (current on disk), from cache (a
    cached copy, or every tensor it needs to write is cached), else rebuild."""
    if force:
        return Status.REBUILD
    if facts.current:
        return Status.UP_TO_DATE
    if facts.pack_available or all_cached:
        return Status.FROM_CACHE
    return Status.REBUILD


def proven_current(
    recipe: Recipe, selected: Iterable[str] | None, cache: Cache, device_class: str = CPU
) -> dict[str, tuple[Path, str]] | None:
    """The selected outputs' paths and content digests if every one is provably
    current for a build on `device_class`, else None (an output whose bytes
    follow the device class is current only on the class it was built on:
    before the lock recorded it, the CPU).

    Unsafe output paths are refused first (before the lock is read), and
    temporaries that killed builds left beside the outputs are removed."""
    graph = build_graph(recipe, selected)
    check_cache_folder(recipe, cache.root)
    check_outputs(recipe, cache.root, graph.outputs)
    for name in graph.outputs:
        remove_stale_temporaries(recipe.outputs[name].path.parent)
    lock = read_lock(recipe.path)
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
        if built_from(recipe, shas) != entry.built_from:
            return None
        if _known(cache, DIGEST, path) != entry.digest:
            return None
        wanted = output_device(graph, name, device_class)
        if wanted is not None and wanted != (entry.device or CPU):
            return None
        current[name] = (path, entry.digest)
    return current


def _known(cache: Cache, memo: str, path: Path) -> str | None:
    """What the cache remembers of `path` (its `memo`) for its current stat."""
    try:
        stat = FileStat.of(path)
    except OSError:
        return None
    return cache.known(memo, path, stat)
