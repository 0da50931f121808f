"""The build lock, `.lock`: builds sharing a cache take turns."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def build_lock(root: Path, notify: Callable[[str], None]) -> Iterator[None]:
    """Hold the exclusive lock of the cache folder `root`; if another process
    holds it, say so through `notify` and wait."""
    with open(root / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(500).strip() or "another process"
            notify(f"waiting for the cache lock on {root}, held by {holder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[1:])[:300]})")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
