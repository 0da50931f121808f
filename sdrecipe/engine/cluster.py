"""Builds on a Dask cluster: each recipe of a set is one Dask task, submitted in
dependency order with the tasks of the recipes it reads as its dependencies.

A worker builds a recipe with `sdrecipe.api.build`, as on one machine (its
outputs are published only when complete, the lock written last), so a worker
that dies leaves no partial output, and Dask retries its task elsewhere. The
recipes, their inputs and outputs must be on a path every worker sees (a
shared file system); with a shared remote cache (`--cache-url`) the workers
also reuse each other's outputs and intermediates. A recipe's variants
(`matrix:`) build together on one worker, in one pass over the inputs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sdrecipe.engine.options import Options
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.plan.recipe_set import RecipeSet

RETRIES = 2
# Seconds to connect to a scheduler and hear Dask's handshake from it.
CONNECT_SECONDS = 10
SCHEMES = frozenset({"tcp", "tls", "ws", "wss", "ucx"})
# local:N runs N worker processes of one thread each on this machine: more than
# a few per core only adds start-up time and memory (local:200 took over a
# minute to start on 2 cores, local:100000 exhausted the machine), so N is at
# most WORKERS_PER_CORE workers for each of this machine's cores.
WORKERS_PER_CORE = 4


def most_local_workers() -> int:
    """The largest N that `local:N` accepts on this machine."""
    return WORKERS_PER_CORE * (os.cpu_count() or 1)


def check_scheduler(scheduler: str) -> None:
    """Raise RecipeError (exit 2) unless `scheduler` is `local:N` with
    1 <= N <= most_local_workers(), or a scheduler address SCHEME://HOST[:PORT];
    checked before any work, and without Dask."""
    if not scheduler.strip():
        raise RecipeError(
            "--scheduler is empty: give a Dask scheduler's address (tcp://HOST:8786) or "
            "local:N, or leave --scheduler out to build here"
        )
    if not scheduler.startswith("local:"):
        _check_address(scheduler)
        return
    count = scheduler.removeprefix("local:")
    if not (count.isascii() and count.isdecimal()) or int(count) < 1:
        raise RecipeError(f"--scheduler {scheduler}: local:N takes a number of workers")
    if int(count) > most_local_workers():
        raise RecipeError(
            f"--scheduler {scheduler}: local:N starts N worker processes on this machine, "
            f"at most {most_local_workers()} here ({WORKERS_PER_CORE} for each of its "
            f"{os.cpu_count() or 1} cores); for more, start a Dask cluster and give its "
            "scheduler's address (tcp://HOST:8786)"
        )


@dataclass(frozen=True)
class TaskResult:
    """What one recipe's task did: its report, or the error that failed it."""

    recipe: str
    worker: str
    report: object | None = None
    error: str | None = None
    exit_code: int = 0


def close(client: Any) -> None:
    """Close the client, and the local cluster it started."""
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


def connect(scheduler: str) -> Any:
    """A Dask client: `local:N` starts a local cluster of N worker processes
    (one thread each), anything else is a scheduler address."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise RecipeError("--scheduler needs Dask: pip install 'sdrecipe[cluster]'") from None
    check_scheduler(scheduler)
    if scheduler.startswith("local:"):
        count = scheduler.removeprefix("local:")
        cluster = LocalCluster(
            n_workers=int(count), threads_per_worker=1, processes=True, dashboard_address=None
        )
        return Client(cluster)
    _check_reachable(scheduler)
    _handshake(scheduler)
    try:
        return Client(scheduler, timeout=f"{CONNECT_SECONDS}s")
    except OSError as exc:
        raise RecipeError(f"--scheduler {scheduler}: cannot reach it ({exc})") from None


def _check_address(scheduler: str) -> None:
    """Refuse what is neither `local:N` nor a scheduler address, SCHEME://HOST[:PORT]."""
    address = urlsplit(scheduler)
    try:
        port_ok = address.port is None or address.port > 0
    except ValueError:
        port_ok = False
    if address.scheme not in SCHEMES or not address.hostname or not port_ok:
        raise RecipeError(
            f"--scheduler {scheduler}: give a Dask scheduler's address "
            "(tcp://HOST:8786, or tls://, ws://, wss://, ucx://) or local:N"
        )


def _check_reachable(scheduler: str) -> None:
    """Fail at once where a tcp:// scheduler's port refuses the connection (or
    its host cannot be found): Dask would retry for CONNECT_SECONDS, then blame
    the server for its silence."""
    address = urlsplit(scheduler)
    if address.scheme != "tcp" or address.port is None:
        return
    try:
        with socket.create_connection((address.hostname, address.port), CONNECT_SECONDS):
            pass
    except ConnectionRefusedError:
        raise RecipeError(
            f"--scheduler {scheduler}: the connection was refused (no scheduler listens "
            f"on port {address.port} there)"
        ) from None
    except OSError as exc:
        raise RecipeError(f"--scheduler {scheduler}: cannot reach it ({exc})") from None


def _handshake(scheduler: str) -> None:
    """Fail unless a Dask endpoint at `scheduler` completes Dask's handshake within
    CONNECT_SECONDS: Dask's own wait for it has no limit, so a server that
    accepts the connection and says nothing would hold the build for ever."""
    import asyncio

    from distributed.comm import connect as dask_connect

    async def shake() -> None:
        comm = await dask_connect(scheduler, timeout=CONNECT_SECONDS)
        await comm.close()

    try:
        asyncio.run(asyncio.wait_for(shake(), CONNECT_SECONDS))
    except asyncio.TimeoutError:
        raise RecipeError(
            f"--scheduler {scheduler}: no Dask scheduler answered within {CONNECT_SECONDS} s "
            "(something accepted the connection but does not speak Dask's protocol)"
        ) from None
    except OSError as exc:
        raise RecipeError(f"--scheduler {scheduler}: cannot reach it ({exc})") from None
    except Exception:  # Dask's comms raise their own kinds (even MemoryError) on a foreign reply
        raise RecipeError(
            f"--scheduler {scheduler}: the server there answered, but not as a Dask scheduler"
        ) from None


def build_on_cluster(
    recipe_set: RecipeSet,
    client: Any,
    build_one: Callable[[Path, Options], object],
    options: Options,
    keep_going: bool,
    report: Callable[[TaskResult], None],
) -> list[TaskResult]:
    """Submit every recipe, wait for all, and call `report` as each ends.
    `build_one(path, options)` runs on the workers; each uses its own local
    cache folder under the options' cache folder."""
    from dask.distributed import as_completed

    futures = {}
    for recipe in recipe_set.recipes:
        needs = [futures[up.recipe.path] for up in recipe_set.needs(recipe)]
        futures[recipe.path] = client.submit(
            _task,
            build_one,
            recipe.path,
            options,
            keep_going,
            needs,
            key=f"sdrecipe-build-{recipe.path}",
            retries=RETRIES,
            pure=False,
        )
    results = []
    for future in as_completed(list(futures.values())):
        result = future.result()
        results.append(result)
        report(result)
        if result.error and not keep_going:
            client.cancel(list(futures.values()))
            break
    return results


def _task(
    build_one: Callable[[Path, Options], object],
    path: Path,
    options: Options,
    keep_going: bool,
    needs: list[TaskResult],
) -> TaskResult:
    """One recipe's build on a worker (`needs`: the results of its upstream tasks)."""
    from dask.distributed import get_worker

    name = get_worker().name
    worker = f"{socket.gethostname()}/{name}"
    failed = [result.recipe for result in needs if result.error]
    if failed:
        error = f"skipped: it needs {failed[0]}, which failed"
        return TaskResult(str(path), worker, error=error, exit_code=1)
    # A local cache per worker: workers sharing one would wait for its lock in turn.
    own_cache = Path(options.cache_dir) / "workers" / f"{socket.gethostname()}-{name}"
    try:
        built = build_one(path, replace(options, cache_dir=own_cache))
    except SdrecipeError as exc:
        return TaskResult(str(path), worker, error=str(exc), exit_code=exc.exit_code)
    return TaskResult(str(path), worker, report=built)
