"""What the API's operations return: typed reports whose `to_json()` is what
the CLI prints with `--json`, one shape per command whichever way it was answered."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrecipe.engine.events import CacheCounts, plain


class Report:
    """A report: its JSON is its fields, recursively."""

    def to_json(self) -> dict[str, Any]:
        return plain(self)


@dataclass(frozen=True)
class OutputReport(Report):
    """An output after a build: `status` is what it needed (up to date, from
    cache, rebuild), `result` what the build did (built, restored from cache,
    up to date). Key counts are None where the build proved the output current
    from the lock alone and planned nothing; `worker` names the Dask worker."""

    recipe: str
    name: str
    path: Path
    status: str
    result: str
    size: int
    digest: str
    merged: int | None = None
    passed_through: dict[str, int] | None = None
    dropped: int | None = None
    worker: str | None = None


@dataclass(frozen=True)
class Failure(Report):
    """A recipe that failed, or was skipped because one it needs failed."""

    recipe: str
    error: str
    exit_code: int


@dataclass(frozen=True)
class BuildReport(Report):
    """What `build` did: every output of every recipe built, in build order."""

    ok: bool
    outputs: tuple[OutputReport, ...] = ()
    failed: tuple[Failure, ...] = ()
    cache: CacheCounts = field(default_factory=CacheCounts)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class NodeReport(Report):
    """A node's status before a build, and why; `output` names the output it is
    written as, `caching` whether its tensors are cached."""

    recipe: str
    node: str
    status: str
    reason: str
    output: str | None
    path: str | None
    caching: str


@dataclass(frozen=True)
class PlanReport(Report):
    """What `build` would do, node by node, recipe by recipe in build order."""

    nodes: tuple[NodeReport, ...]


@dataclass(frozen=True)
class OutputStatus(Report):
    """One output's status and why."""

    recipe: str
    output: str
    path: str
    status: str
    reason: str


@dataclass(frozen=True)
class StatusReport(Report):
    """Each output of the recipes: up to date, or what a build would do and why."""

    outputs: tuple[OutputStatus, ...]


@dataclass(frozen=True)
class Reproduction(Report):
    """One output rebuilt from its inputs, against the lock."""

    recipe: str
    name: str
    expected: str
    actual: str
    reproducible: bool
    # The device class whose bytes were rebuilt, where the output's follow one
    # (None: the same on every device); `locked`: the class the lock records.
    device: str | None = None
    locked: str | None = None


@dataclass(frozen=True)
class VerifyReport(Report):
    """Whether every locked output rebuilds to the same bytes."""

    reproducible: bool
    outputs: tuple[Reproduction, ...]


@dataclass(frozen=True)
class OutputPlanReport(Report):
    """An output as `validate` sees it: where it goes, its keys, bytes and how
    each key comes to be."""

    path: str
    keys: int
    bytes: int
    counts: dict[str, int]


@dataclass(frozen=True)
class ValidateReport(Report):
    """A recipe checked with its inputs' headers, nothing built."""

    valid: bool
    recipe: str
    inputs: dict[str, str]
    architectures: dict[str, str]
    order: tuple[str, ...]
    outputs: dict[str, OutputPlanReport]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Transfer(Report):
    """What `cache pull` or `cache push` moved."""

    direction: str
    url: str
    outputs: int
    objects: int
    refs: int
    bytes: int
    corrupt: tuple[str, ...] = ()
