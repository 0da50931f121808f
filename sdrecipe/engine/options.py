"""The one options model of a build, shared by the API, the CLI and the cluster."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdrecipe.errors import RecipeError

# What `--device` accepts.
DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto"
_SPEC = re.compile(r"cpu|cuda(:\d+)?|mps|auto")
# The least `--device-memory`: a cap of a few rows a key would crawl.
MIN_DEVICE_MEMORY = 1_000_000


def is_device(spec: str) -> bool:
    """Whether `--device` accepts `spec`."""
    return _SPEC.fullmatch(spec) is not None


def check_device(spec: str) -> str:
    """`spec` if `--device` accepts it, else RecipeError (exit 2)."""
    if not is_device(spec):
        raise RecipeError(f"--device {spec!r}: not a device; use {DEVICE_HELP}")
    return spec


@dataclass(frozen=True)
class Options:
    """The options that build, plan, status and verify share.

    `cache_dir` is the local tensor cache, `cache_url` a remote tier behind it
    (any fsspec URL); `no_cache` neither reads nor stores cached tensors or
    outputs; `force` rebuilds everything and allows merging different
    architectures; `keep_going` builds the recipes that do not need a failed
    one; `scheduler` builds each recipe as a task on a Dask cluster; `device`
    (`cpu`, `cuda`, `cuda:N`, `mps`, `auto`) runs the arithmetic on a device, its
    values and buffers within `device_memory` bytes (see
    `sdrecipe.engine.devices`; None: the direct CPU path)."""

    threads: int | None = None
    cache_dir: Path = Path("cache")
    cache_url: str | None = None
    no_cache: bool = False
    force: bool = False
    keep_going: bool = False
    scheduler: str | None = None
    device: str | None = None
    device_memory: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.device is not None:
            if not isinstance(self.device, str):
                raise RecipeError(f"device: {self.device!r} is not a device; use {DEVICE_HELP}")
            check_device(self.device)
        memory = self.device_memory
        if memory is None:
            return
        if self.device is None:
            raise RecipeError("--device-memory caps a device's memory: name the --device too")
        if not isinstance(memory, int) or isinstance(memory, bool) or memory < MIN_DEVICE_MEMORY:
            raise RecipeError(
                f"--device-memory {memory!r}: give a number of bytes of at least "
                f"{MIN_DEVICE_MEMORY:,} (1 MB), such as 8GB"
            )
