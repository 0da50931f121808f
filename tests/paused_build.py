"""Run the sdrecipe command line, pausing the build at a chosen point.

    python tests/paused_build.py POINT COUNT FOLDER -- ARGS...

POINT is `key` (before the COUNT-th key task starts, in a worker), `object`
(before the COUNT-th new cache object is published, its temporary file
complete, in a worker) or `publish` (before the COUNT-th safetensors file is
renamed into place: with --no-cache, the COUNT-th output, in the main
thread). There the build creates FOLDER/paused and waits until FOLDER/resume
exists, so a test can signal or kill a build that is certainly mid-way,
instead of hoping that a sleep landed in the middle. Everything else is the
real build.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from sdrecipe.cache import store as cache
from sdrecipe.cli import main
from sdrecipe.engine import executor
from sdrecipe.io.safetensors_writer import SafetensorsWriter


def pause_before(owner: type, method: str, count: int, folder: Path) -> None:
    """Make the `count`-th call of `owner.method` wait for FOLDER/resume."""
    original = getattr(owner, method)
    calls = 0
    lock = threading.Lock()

    def paused(*args, **kwargs):
        nonlocal calls
        with lock:
            calls += 1
            reached = calls == count
        if reached:
            (folder / "paused").touch()
            while not (folder / "resume").exists():
                time.sleep(0.005)
        return original(*args, **kwargs)

    setattr(owner, method, paused)


if __name__ == "__main__":
    point, count, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    points = {
        "key": (executor.Executor, "run_key"),
        "object": (cache.ObjectWriter, "finish"),
        "publish": (SafetensorsWriter, "publish"),
    }
    owner, method = points[point]
    pause_before(owner, method, count, folder)
    sys.argv = ["sdrecipe", *sys.argv[sys.argv.index("--") + 1 :]]
    main()
