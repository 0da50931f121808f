"""Names of the temporary files that every write goes through before its rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

# The signals that stop a build (Ctrl-C, `kill`): both end it with exit 130.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def temporary_path(path: Path, unique: bool = False) -> Path:
    """The hidden temporary file that `path` is written through.

    Its name ends in the writing process's id, so that temporaries left by a
    killed process can be told apart from those of a running one.
    """
    tag = f"-{uuid.uuid4().hex}" if unique else ""
    return path.with_name(f".{path.name}{tag}.sdrecipe-{os.getpid()}.tmp")


def publish(temporary: Path, target: Path) -> None:
    """Rename `temporary` over `target`. When both are already links to one file,
    rename(2) does nothing, so the temporary name is removed here."""
    os.replace(temporary, target)
    temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs, then pass one that came on to
    the handler in place before: for steps that must all happen or none, such as
    publishing several outputs and their lock, or waiting for worker threads
    before their files are removed. Signals reach Python code in the main
    thread only, so elsewhere (a Dask worker) there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        number: signal.signal(number, lambda number, frame: held.append(number))
        for number in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])


def staged_copy(source: Path, target: Path) -> Path:
    """`source`'s bytes under a temporary name beside `target`, ready to `publish`:
    a hard link where the file system allows, else a copy."""
    temporary = temporary_path(target, unique=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    return temporary


def is_stale_temporary(path: Path) -> bool:
    """True for a temporary file whose writing process no longer runs."""
    name = path.name
    if not name.endswith(".tmp") or ".sdrecipe-" not in name:
        return False
    pid = name.rsplit("-", 1)[-1].removesuffix(".tmp")
    return pid.isdigit() and not _is_running(int(pid))


def _is_running(pid: int) -> bool:
    """True when a process with this id exists (Linux and macOS alike)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or an id no process can have
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporaries (files or folders) that killed sdrecipe processes
    left in `folder`: partial outputs, links being restored, verify folders."""
    for candidate in folder.glob(".*.sdrecipe-*.tmp"):
        if is_stale_temporary(candidate):
            if candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path to write; renamed over `path` when the block succeeds,
    removed when it fails."""
    temporary = temporary_path(path, unique=True)
    try:
        yield temporary
        publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
