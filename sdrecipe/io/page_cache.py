"""Keeping the page cache for what a build still needs when memory is short.

A build reads its inputs and never reads its output again. When the inputs and
the output together do not fit in memory (full-size SDXL: three 6.9 GB inputs
and a 6.9 GB output against 24 GB), the output's pages push out input pages
that this build, and the next build from the same inputs, must then read from
the disk again. `WrittenBehind` asks the kernel to drop each finished part of
the output once it is on disk, so the inputs stay cached.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

SUPPORTED = hasattr(os, "posix_fadvise")
# Finished output bytes left in the page cache before the oldest are dropped:
# by then their writeback, started when they were finished, is mostly done
# (pages still being written are kept; the kernel reclaims them later).
DROP_LAG = 512 << 20


def memory_is_short(nbytes: int, meminfo: Path = Path("/proc/meminfo")) -> bool:
    """True when `nbytes` (a build's inputs and outputs) exceed the memory the
    system has available, page cache included; False where that is unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return nbytes > int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return False


class WrittenBehind:
    """Drops an output file's finished parts from the page cache once on disk.

    `spans` gives each part's (offset, length) in the file. When `wrote` has
    counted all of a part's bytes, its writeback is started; once `lag` more
    bytes are finished, its pages are dropped. Thread-safe."""

    def __init__(self, fd: int, spans: dict[str, tuple[int, int]], lag: int | None = None):
        self._fd = fd
        self._spans = spans
        self._unwritten = {name: length for name, (_, length) in spans.items()}
        self._lag = DROP_LAG if lag is None else lag
        self._lock = threading.Lock()
        self._finished: collections.deque[tuple[int, int]] = collections.deque()
        self._pending = 0

    def wrote(self, name: str, length: int) -> None:
        """`length` more bytes of part `name` are written. A hint the kernel
        refuses ends the dropping, never the build (the data is written)."""
        with self._lock:
            left = self._unwritten[name] = self._unwritten[name] - length
            if left > 0 or self._fd < 0:
                return
            try:
                self._finish(*self._spans[name])
            except OSError:
                self._fd = -1

    def _finish(self, offset: int, length: int) -> None:
        # On dirty pages DONTNEED starts their writeback and drops nothing yet.
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        self._finished.append((offset, length))
        self._pending += length
        while self._pending > self._lag:
            start, size = self._finished.popleft()
            self._pending -= size
            os.posix_fadvise(self._fd, start, size, os.POSIX_FADV_DONTNEED)
