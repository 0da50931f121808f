"""`sdrecipe cache`: inspect, trim and share the tensor cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sdrecipe import api
from sdrecipe.cli.common import (
    RECIPE,
    cache_dir_option,
    cache_url_option,
    device_option,
    emit_json,
    json_option,
    parse_size,
    reports_errors,
    threads_option,
)
from sdrecipe.engine.options import DEVICE_HELP, Options


@click.group()
def cache() -> None:
    """Inspect, trim and share the tensor cache."""


@cache.command("info")
@cache_dir_option
@cache_url_option
@json_option
@reports_errors
def cache_info(cache_dir: Path, cache_url: str | None, as_json: bool) -> None:
    """Disk use, size limit, entries and the last build's hit statistics, and
    with --cache-url the remote tier's entries and size.

    Outputs are hard-linked into the cache, so their bytes are shared with the
    output files: `size` counts only the cache's own bytes (what `gc` can free),
    `shared_with_outputs` the rest."""
    info = api.cache_info(Options(cache_dir=cache_dir, cache_url=cache_url))
    if as_json:
        emit_json(info)
        return
    shared: Any = info["remote"]
    if shared:
        click.echo(
            f"remote cache {shared['url']}: {shared['size'] / 1e6:,.1f} MB, "
            f"{shared['outputs']} outputs, {shared['objects']} intermediate tensors, "
            f"{shared['tensors']} tensor identities"
        )
    if not info["exists"]:
        click.echo(f"cache {cache_dir}: none yet (a build creates it)")
        return
    click.echo(
        f"cache {info['path']}: {info['size'] / 1e6:,.1f} MB of its own (limit "
        f"{info['max_size'] / 1e9:,.1f} GB), plus {info['shared_with_outputs'] / 1e6:,.1f} MB "
        "shared with outputs through hard links"
    )
    click.echo(
        f"  {info['objects']} intermediate tensors, {info['packs']} outputs, "
        f"{info['tensors']} tensor identities"
    )
    last = info["last_build"]
    if last:
        click.echo(
            "  last build: "
            + ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in last.items())
        )


def _exchange_command(direction: str) -> Callable[..., Any]:
    @click.argument("recipe", type=RECIPE)
    @cache_dir_option
    @cache_url_option
    @threads_option
    @device_option(
        f"The tensors of a build on this device ({DEVICE_HELP}; env: SDRECIPE_DEVICE): "
        "methods whose arithmetic differs on a GPU are cached per device class. "
        + (
            "A push also uploads those of each device class the lock records."
            if direction == "push"
            else "Without it, those a build on the CPU uses."
        )
    )
    @json_option
    @reports_errors
    def command(
        recipe: Path,
        cache_dir: Path,
        cache_url: str | None,
        threads: int | None,
        device: str | None,
        as_json: bool,
    ) -> None:
        if not cache_url:
            raise click.UsageError("--cache-url (or SDRECIPE_CACHE_URL) names the remote cache")
        options = Options(threads=threads, cache_dir=cache_dir, cache_url=cache_url, device=device)
        moved = api.cache_transfer(recipe, direction, options)
        if as_json:
            emit_json(moved.to_json())
            return
        click.echo(
            f"{direction}ed {moved.outputs} outputs and {moved.refs} tensors "
            f"({moved.bytes / 1e6:,.1f} MB) {'from' if direction == 'pull' else 'to'} {moved.url}"
        )

    command.__doc__ = (
        f"{'Download' if direction == 'pull' else 'Upload'} RECIPE's cached outputs and "
        f"tensors {'from' if direction == 'pull' else 'to'} the remote cache (--cache-url)."
    )
    return cache.command(direction)(command)


cache_pull = _exchange_command("pull")
cache_push = _exchange_command("push")


@cache.command("gc")
@cache_dir_option
@click.option(
    "--max-size",
    callback=parse_size,
    help="Keep at most this much of the cache's own bytes (e.g. 500MB, 2GiB) "
    "[default: the cache's limit, see `cache limit`].",
)
@json_option
@reports_errors
def cache_gc(cache_dir: Path, max_size: int | None, as_json: bool) -> None:
    """Delete least recently used entries until the cache fits in --max-size."""
    result: Any = api.cache_gc(Options(cache_dir=cache_dir), max_size)
    if as_json:
        emit_json(result)
        return
    if not result["cache"]:
        click.echo(f"there is no cache at {cache_dir}: nothing to remove")
        return
    click.echo(
        f"removed {result['removed']} entries, freeing {result['freed'] / 1e6:,.1f} MB; "
        f"the cache now holds {result['size'] / 1e6:,.1f} MB of its own"
    )


@cache.command("limit")
@click.argument("size", required=False, callback=parse_size)
@cache_dir_option
@reports_errors
def cache_limit(size: int | None, cache_dir: Path) -> None:
    """Show, or set to SIZE (e.g. 50GB), the most bytes of its own the cache keeps.

    After every build, least recently used entries are deleted until the cache
    fits (default 20 GB). The limit is stored in the cache folder."""
    limit = api.cache_limit(Options(cache_dir=cache_dir), size)
    click.echo(f"cache {cache_dir}: limit {limit / 1e9:,.2f} GB")


@cache.command("clear")
@cache_dir_option
@reports_errors
def cache_clear(cache_dir: Path) -> None:
    """Delete every cache entry and every remembered hash."""
    if api.cache_clear(Options(cache_dir=cache_dir)):
        click.echo(f"cleared {cache_dir}")
    else:
        click.echo(f"there is no cache at {cache_dir}: nothing to clear")
