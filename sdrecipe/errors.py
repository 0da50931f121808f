"""Error types that the CLI turns into one-paragraph messages and exit codes."""

from __future__ import annotations

import errno
from pathlib import Path


class SdrecipeError(Exception):
    """Base of all errors the user is meant to read; never shown with a traceback."""

    exit_code = 1

    def __init__(self, message: str, file: Path | str | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.message}"


class RecipeError(SdrecipeError):
    """The recipe or its inputs are invalid; found before any output is written (exit 2)."""

    exit_code = 2


class BuildError(SdrecipeError):
    """A build failed while running (exit 1)."""

    exit_code = 1


def describe_os_error(exc: OSError) -> str:
    """The reason of an I/O error in words, with a hint where one helps."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space, or trim the cache with `sdrecipe cache gc`)"
    return reason
