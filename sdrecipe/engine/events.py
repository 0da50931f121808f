"""What a build reports as it goes: typed events, each with a `type`.

Every stage hands its events to one listener (`on_event` of `sdrecipe.api`);
the CLI's progress bars, its text and the summary line are renderings of
them, and `sdrecipe build --events FILE` writes them as JSON lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class CacheCounts:
    """How the caches served a build: tensors from the cache and computed,
    outputs restored and up to date, corrupt entries found, entries pulled from
    the remote tier, bytes of input tensors read and of output tensors written."""

    tensors_from_cache: int = 0
    tensors_computed: int = 0
    outputs_restored: int = 0
    outputs_up_to_date: int = 0
    corrupt_entries: int = 0
    remote_pulled: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def add(self, other: CacheCounts) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Event:
    """One thing that happened; `to_json()` is its JSON line."""

    type: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **plain(self)}


def plain(value: Any) -> Any:
    """`value` as JSON data: dataclasses as objects, paths and enumerations as text."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


Listener = Callable[[Event], None]

# What a build did to an output (`OutputFinished.result`).
BUILT = "built"
RESTORED = "restored from cache"
KEPT = "up to date"


def ignore(event: Event) -> None:
    """The listener that wants nothing."""


@dataclass(frozen=True)
class BuildStarted(Event):
    type = "build_started"
    recipes: tuple[str, ...]


@dataclass(frozen=True)
class BuildFinished(Event):
    """The end of a build and its totals: what the summary line shows."""

    type = "build_finished"
    ok: bool
    seconds: float
    outputs: int
    cache: CacheCounts


@dataclass(frozen=True)
class RecipeStarted(Event):
    type = "recipe_started"
    recipe: str


@dataclass(frozen=True)
class RecipeFinished(Event):
    """A recipe's end: `error` says why it failed or was skipped."""

    type = "recipe_finished"
    recipe: str
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class NodePlanned(Event):
    """A node's status before the build starts, and why."""

    type = "node"
    recipe: str
    node: str
    status: str
    reason: str


@dataclass(frozen=True)
class OutputStarted(Event):
    type = "output_started"
    recipe: str
    output: str
    path: str
    status: str
    reason: str


@dataclass(frozen=True)
class OutputFinished(Event):
    """An output in place: `result` says how (built, restored from cache, up to
    date); the key counts are None where the lock alone proved it current."""

    type = "output_finished"
    recipe: str
    output: str
    path: str
    result: str
    size: int
    digest: str
    merged: int | None = None
    passed_through: dict[str, int] | None = None
    dropped: int | None = None


@dataclass(frozen=True)
class Progress(Event):
    """Bytes done of a phase (hashing the inputs, merging)."""

    type = "progress"
    recipe: str
    phase: str
    done: int
    total: int


@dataclass(frozen=True)
class CacheHit(Event):
    """A tensor (by output key) or a whole output that came from the cache."""

    type = "cache_hit"
    recipe: str
    what: str
    name: str


@dataclass(frozen=True)
class CacheMiss(Event):
    """A tensor (by output key) that had to be computed."""

    type = "cache_miss"
    recipe: str
    what: str
    name: str


@dataclass(frozen=True)
class CacheCorrupt(Event):
    """A cache entry that failed its check: discarded, and its content rebuilt."""

    type = "cache_corrupt"
    recipe: str
    message: str


@dataclass(frozen=True)
class RemoteTransfer(Event):
    """What moved between the local cache and the remote one."""

    type = "remote"
    recipe: str
    direction: str
    url: str
    outputs: int
    objects: int
    refs: int
    bytes: int


@dataclass(frozen=True)
class BuildWarning(Event):
    type = "warning"
    recipe: str
    message: str


@dataclass(frozen=True)
class Note(Event):
    """Something the person at the terminal should know as it happens."""

    type = "note"
    message: str


# Every event class by its `type`, for readers of an events file.
EVENT_TYPES = {cls.type: cls for cls in Event.__subclasses__()}


def as_progress(listener: Listener, recipe: str) -> Callable[[str, int], Callable[[int], None]]:
    """A `progress(phase, total) -> advance(done)` reporter that sends Progress events."""

    def start(phase: str, total: int) -> Callable[[int], None]:
        done = 0

        def advance(step: int) -> None:
            nonlocal done
            done += step
            listener(Progress(recipe, phase, done, total))

        return advance

    return start
