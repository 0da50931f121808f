"""Reading the small text files sdrecipe is given (recipes, locks) safely: a
regular file of bounded size in UTF-8, never a pipe or a device, which could
block or never end."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sdrecipe.errors import RecipeError, describe_os_error

_FILE_KINDS = {
    stat.S_IFDIR: "folder",
    stat.S_IFIFO: "named pipe (FIFO)",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


def read_text_file(path: Path, what: str, limit: int) -> str:
    """The UTF-8 text of `path`, `what` it is ("the recipe") naming it in errors:
    RecipeError unless it is a regular file of at most `limit` bytes; a missing
    file raises FileNotFoundError, for the caller to say what that means."""
    try:
        # Non-blocking, so that opening a FIFO returns at once and is refused below.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RecipeError(f"cannot read {what}: {describe_os_error(exc)}", path) from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "special file")
        raise RecipeError(f"{what} is a {kind}, not a file of YAML text", path)
    with os.fdopen(descriptor, "rb") as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise RecipeError(f"cannot read {what}: {describe_os_error(exc)}", path) from None
    if len(data) > limit:
        raise RecipeError(
            f"{what} is larger than {limit >> 20} MiB, which is more than such a YAML file "
            "holds (is this a model?)",
            path,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); "
            "is this a model or another binary file?",
            path,
            line,
        ) from None
