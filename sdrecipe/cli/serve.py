"""`sdrecipe serve`: the local web view of a folder of recipes."""

from __future__ import annotations

import socket
import sys
import threading
import webbrowser
from pathlib import Path

import click

from sdrecipe.cli.common import (
    cache_dir_option,
    checked_options,
    device_memory_option,
    device_option,
    note,
    reports_errors,
    threads_option,
)
from sdrecipe.engine.options import DEVICE_HELP

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command()
@click.argument(
    "folder",
    default="recipes",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="The port to listen on (0: any free port).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a web browser.")
@click.option(
    "--history",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the builds' summaries and events are kept [default: FOLDER/.sdrecipe/builds].",
)
@cache_dir_option
@threads_option
@device_option(
    f"The device its builds compute on, as `sdrecipe build --device`: {DEVICE_HELP} "
    "(env: SDRECIPE_DEVICE); statuses follow its device class."
)
@device_memory_option
@reports_errors
def serve(
    folder: Path,
    host: str,
    port: int,
    open_browser: bool,
    history: Path | None,
    cache_dir: Path,
    threads: int | None,
    device: str | None,
    device_memory: int | None,
) -> None:
    """Serve a web view of FOLDER's recipes (default: recipes/): their outputs'
    statuses and DAGs, builds with live progress, models, heatmaps, sweeps and a
    new-recipe form. It prints its address with a session token; every change
    made through it needs that token. Stop it with Ctrl-C (a running build is
    stopped as Ctrl-C stops `sdrecipe build`: nothing is left half-written)."""
    try:
        import uvicorn

        from sdrecipe.serve.app import create_app
        from sdrecipe.serve.security import new_token
    except ImportError as exc:
        raise click.UsageError(
            f"sdrecipe serve needs the web extra ({exc.name} is missing): "
            "pip install 'sdrecipe[serve]'"
        ) from None
    options = checked_options(
        threads=threads, cache_dir=cache_dir.resolve(), device=device, device_memory=device_memory
    )
    from sdrecipe.engine.devices import place

    place(options.device, options.device_memory)  # a device this torch cannot use: exit 2 now
    if host not in LOOPBACK:
        note(
            f"listening on {host}: anyone who can reach it and has the printed address "
            "(with its token) can read your models' details and start builds"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        raise click.UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener.listen(128)  # connections wait in the backlog while the first snapshot is taken
    port = listener.getsockname()[1]
    token = new_token()
    app = create_app(folder, options, token, host, port, history.resolve() if history else None)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/?token={token}"
    click.echo(f"sdrecipe serve: {folder.resolve()} at {url}")
    sys.stdout.flush()
    if open_browser:
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[listener])
