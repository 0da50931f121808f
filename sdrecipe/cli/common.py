"""What every command shares: errors as one paragraph and an exit code, the
common options, JSON output, and the rendering of build events as text and
progress bars."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import click

from sdrecipe.engine import events
from sdrecipe.engine.options import DEVICE_HELP, Options, is_device
from sdrecipe.errors import SdrecipeError, describe_os_error
from sdrecipe.io.mapped_files import install_sigbus_handler
from sdrecipe.text import printable

RECIPE = click.Path(dir_okay=False, path_type=Path)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one paragraph on stderr (and, with --json, an error
    object on stdout) and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        install_sigbus_handler()
        as_json = bool(kwargs.get("as_json"))
        try:
            return command(*args, **kwargs)
        except SdrecipeError as exc:
            fail("error", str(exc), exc.exit_code, as_json)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as other tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail("error", f"{where}{describe_os_error(exc)}", 1, as_json)
        except KeyboardInterrupt:
            interrupted(as_json)
        except Exception as exc:
            if os.environ.get("SDRECIPE_DEBUG"):
                raise
            fail(
                "internal error",
                f"{type(exc).__name__}: {exc} "
                "(rerun with SDRECIPE_DEBUG=1 for a traceback, and please report it)",
                1,
                as_json,
            )

    return wrapper


def fail(kind: str, message: str, exit_code: int, as_json: bool) -> None:
    click.echo(f"{kind}: {printable(message)}", err=True)
    if as_json:
        emit_json({"error": message, "kind": kind, "exit_code": exit_code})
    sys.exit(exit_code)


def note(text: str) -> None:
    """Tell the person at the terminal something as it happens (stderr)."""
    click.echo(f"note: {printable(text)}", err=True)


def say(text: str) -> None:
    """Print a line that may hold names from files: escaped."""
    click.echo(printable(text))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupted(as_json: bool) -> None:
    """Exit 130 after Ctrl-C or SIGTERM. An interrupt during publishing waits until
    the outputs and lock are all in place, so none is ever half-written."""
    fail("interrupted", "stopped; no output is left half-written", 130, as_json)


class Commands(click.Group):
    """The `sdrecipe` group: what every command shares, done once here.

    Ctrl-C and SIGTERM both stop a command with exit 130, even where the shell
    started it with SIGINT ignored (a background job); click's own usage errors
    also print the JSON error object when `--json` is among the arguments."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["sdrecipe.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        from sdrecipe.io.atomic import STOP_SIGNALS

        as_json = ctx.meta.get("sdrecipe.json", False)
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if as_json:
                kind = "usage" if isinstance(exc, click.UsageError) else "error"
                emit_json({"error": exc.format_message(), "kind": kind, "exit_code": exc.exit_code})
            raise
        except KeyboardInterrupt:
            interrupted(as_json)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> int | None:
    """A size option's bytes: 20GB, 500MB, 4GiB or a number."""
    if value is None:
        return None
    match = _SIZE.match(value)
    if not match:
        raise click.BadParameter(f"{value!r} is not a size such as 20GB, 500MB or 1024")
    number, unit, suffix = match.groups()
    base = 1024 if suffix and suffix.lower() == "ib" else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def _device_spec(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> str | None:
    if value is not None and not is_device(value):
        raise click.BadParameter(f"{value!r} is not a device; use {DEVICE_HELP}")
    return value


def device_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--device DEVICE` (env: SDRECIPE_DEVICE), checked as a device name."""
    return click.option(
        "--device",
        envvar="SDRECIPE_DEVICE",
        metavar="DEVICE",
        callback=_device_spec,
        help=help_text,
    )


def device_memory_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--device-memory",
        callback=parse_size,
        metavar="SIZE",
        help="Cap the device memory the build's values and buffers take, e.g. 8GB "
        "[default: no cap: one key per worker].",
    )(command)


def cache_dir_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="SDRECIPE_CACHE_DIR",
        default=Path("cache"),
        show_default=True,
        help="The tensor cache (env: SDRECIPE_CACHE_DIR).",
    )(command)


def cache_url_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache-url",
        envvar="SDRECIPE_CACHE_URL",
        help="A shared remote cache behind the local one: any fsspec URL, e.g. "
        "s3://bucket/sdrecipe-cache (env: SDRECIPE_CACHE_URL).",
    )(command)


def threads_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--threads", "-j", type=click.IntRange(min=1), help="Worker threads [default: cores]."
    )(command)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON only."
    )(command)


_OPTION_NAMES = (
    "threads",
    "cache_dir",
    "cache_url",
    "no_cache",
    "force",
    "device",
    "device_memory",
)


def checked_options(**fields: Any) -> Options:
    """`Options(**fields)`, options that do not go together a usage error (exit 2)."""
    try:
        return Options(**fields)
    except SdrecipeError as exc:
        raise click.UsageError(exc.message) from None


def build_options(uses_cache: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the shared options to a command and hand them over as one `options`."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            fields = {name: kwargs.pop(name) for name in _OPTION_NAMES if name in kwargs}
            return command(*args, options=checked_options(**fields), **kwargs)

        options = [
            threads_option,
            json_option,
            device_option(
                f"Compute on a device: {DEVICE_HELP} (auto: a GPU if torch sees one). "
                "Without it, the CPU as always; `cpu` takes the device path on the CPU, to "
                "check it (same bytes, slower). Methods whose arithmetic differs on a GPU "
                "record the device class in the lock (env: SDRECIPE_DEVICE)."
            ),
            device_memory_option,
        ]
        if uses_cache:
            options += [
                cache_dir_option,
                cache_url_option,
                click.option(
                    "--no-cache",
                    is_flag=True,
                    help="Neither read nor store cached tensors or outputs. Input hashes are "
                    "still remembered by file stat: they are not the tensor cache, and "
                    "rehashing every input on each run would only cost time.",
                ),
                click.option(
                    "--force",
                    is_flag=True,
                    help="Rebuild everything, even what is up to date, and allow merging "
                    "different architectures.",
                ),
            ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


class Renderer:
    """Build events as the person at the terminal sees them: notes and warnings
    on stderr, progress bars when stderr is a terminal, each output's line, and
    the summary line at the end. With `as_json`, only notes and warnings;
    with `failures` (a build that keeps going), each failed recipe's error as
    it happens; `events_file` receives every event as a JSON line."""

    def __init__(
        self,
        as_json: bool,
        headers: bool = False,
        events_file: IO[str] | None = None,
        failures: bool = False,
    ):
        self.as_json = as_json
        self.headers = headers
        self.failures = failures
        self.events_file = events_file
        self.bars = not as_json and sys.stderr.isatty()
        self._bar: Any = None
        self._phase: tuple[str, str] | None = None
        self._done = 0

    def __call__(self, event: events.Event) -> None:
        if self.events_file is not None:
            self.events_file.write(json.dumps(event.to_json(), default=str) + "\n")
            self.events_file.flush()
        if isinstance(event, events.Note):
            note(event.message)
        elif isinstance(event, events.BuildWarning):
            click.echo(f"warning: {printable(event.message)}", err=True)
        elif isinstance(event, events.RecipeFinished) and not event.ok and self.failures:
            click.echo(f"error: {printable(event.error or '')}", err=True)
        elif isinstance(event, events.Progress):
            self._progress(event)
        elif self.as_json:
            return
        elif isinstance(event, events.RecipeStarted) and self.headers:
            click.echo(f"== {event.recipe}")
        elif isinstance(event, events.OutputFinished):
            self._close_bar()
            say(f"{event.result} {event.output} -> {event.path} ({event.size / 1e6:,.1f} MB)")
            if event.merged is not None:
                passed = event.passed_through or {}
                click.echo(f"  {describe_counts(event.merged, passed, event.dropped or 0)}")
        elif isinstance(event, events.BuildFinished):
            self._close_bar()
            cache = event.cache
            if cache.outputs_up_to_date == event.outputs and not cache.tensors_computed:
                return  # nothing was done: the up-to-date lines say it all
            parts = [
                f"{cache.tensors_computed} tensors computed, {cache.tensors_from_cache} from cache"
            ]
            if cache.outputs_restored:
                parts.append(f"{_count(cache.outputs_restored, 'output')} restored from the cache")
            if cache.remote_pulled:
                pulled = _count(cache.remote_pulled, "entry", "entries")
                parts.append(f"{pulled} pulled from the remote cache")
            parts.append(
                f"read {cache.bytes_read / 1e6:,.1f} MB of input tensors, "
                f"wrote {cache.bytes_written / 1e6:,.1f} MB of output tensors"
            )
            click.echo(f"done in {event.seconds:.1f} s: " + "; ".join(parts))

    def _progress(self, event: events.Progress) -> None:
        if not self.bars or event.total <= 0:
            return
        phase = (event.recipe, event.phase)
        if self._bar is None or phase != self._phase:
            self._close_bar()
            if event.done >= event.total:
                return
            self._phase, self._done = phase, 0
            self._bar = click.progressbar(
                length=event.total, label=f"{event.phase:8}", file=sys.stderr, width=30
            )
            self._bar.__enter__()
        self._bar.update(event.done - self._done)
        self._done = event.done
        if event.done >= event.total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def describe_counts(merged: int, passed: dict[str, int], dropped: int) -> str:
    total = merged + sum(passed.values())
    text = f"{total} keys: {merged} merged, {sum(passed.values())} passed through"
    if passed:
        text += " (" + ", ".join(f"{count} {reason}" for reason, count in passed.items()) + ")"
    if dropped:
        text += f"; {dropped} keys only in other models were dropped"
    return text
