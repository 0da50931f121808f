"""The one options model of a build, shared by the API, the CLI and the cluster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Options:
    """The options that build, plan, status and verify share.

    `cache_dir` is the local tensor cache, `cache_url` a remote tier behind it
    (any fsspec URL); `no_cache` neither reads nor stores cached tensors or
    outputs; `force` rebuilds everything and allows merging different
    architectures; `keep_going` builds the recipes that do not need a failed
    one; `scheduler` builds each recipe as a task on a Dask cluster."""

    threads: int | None = None
    cache_dir: Path = Path("cache")
    cache_url: str | None = None
    no_cache: bool = False
    force: bool = False
    keep_going: bool = False
    scheduler: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
