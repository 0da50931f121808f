"""Reading the small files sdrecipe is given or finds (recipes, locks, shard
indexes, remote-cache records) safely: a regular file of bounded size, never a
pipe or a device, which could block or never end."""

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


class NotRegularFile(ValueError):
    """The path is something other than a regular file; the message names what."""


class FileTooLarge(ValueError):
    """The file holds more bytes than its reader accepts."""


def read_small_file(path: Path | str, limit: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them. Opened
    without waiting (a FIFO is refused, never waited on) and, unless
    `follow_symlinks`, never through a symbolic link (an OSError). Raises
    NotRegularFile or FileTooLarge, and OSErrors (FileNotFoundError included) as
    they come."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    descriptor = os.open(path, flags)
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise NotRegularFile(_FILE_KINDS.get(stat.S_IFMT(mode), "special file"))
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"larger than {limit} bytes")
    return data


def read_text_file(path: Path, what: str, limit: int) -> str:
    """The UTF-8 text of `path`, `what` it is ("the recipe") naming it in errors:
    RecipeError unless it is a regular file of at most `limit` bytes; a missing
    file raises FileNotFoundError, for the caller to say what that means."""
    try:
        data = read_small_file(path, limit)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RecipeError(f"cannot read {what}: {describe_os_error(exc)}", path) from None
    except NotRegularFile as exc:
        raise RecipeError(f"{what} is a {exc}, not a file of YAML text", path) from None
    except FileTooLarge:
        raise RecipeError(
            f"{what} is larger than {limit >> 20} MiB, which is more than such a YAML file "
            "holds (is this a model?)",
            path,
        ) from None
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
