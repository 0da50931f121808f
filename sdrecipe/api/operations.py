"""The API's operations (see `sdrecipe.api`, which loads this module on first use)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from sdrecipe.api.reports import (
    BuildReport,
    Failure,
    NodeReport,
    OutputPlanReport,
    OutputReport,
    OutputStatus,
    PlanReport,
    Reproduction,
    StatusReport,
    Transfer,
    ValidateReport,
    VerifyReport,
)
from sdrecipe.cache.remote import RemoteCache, UnsafeRemote
from sdrecipe.cache.store import DEFAULT_MAX_SIZE, Cache
from sdrecipe.engine import events
from sdrecipe.engine.devices import device_class, named_class, place
from sdrecipe.engine.events import KEPT, CacheCounts, Listener
from sdrecipe.engine.options import Options
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.io.fingerprint import FileStat
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import preload_kernels
from sdrecipe.plan.recipe_set import (
    RECIPE_SUFFIXES,
    RecipeSet,
    load_recipe_set,
    planned_statuses,
    recipe_files,
)
from sdrecipe.plan.status import MATCHES_LOCK, NodeStatus, Status, proven_current
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.expr import method_calls
from sdrecipe.recipe.lock import read_lock

if TYPE_CHECKING:
    from sdrecipe.plan.prepare import Prepared
    from sdrecipe.views.recipe_graph import RecipeGraph


# Recipe files or folders as on the command line (after one recipe file, names of
# its outputs), or one of them alone.
Targets = str | Path | Sequence[str | Path]


def build(
    targets: Targets, options: Options | None = None, on_event: Listener | None = None
) -> BuildReport:
    """Bring the targets' outputs up to date, recipes in dependency order.

    A recipe that fails stops the build (its error is raised) unless
    `options.keep_going`: then the recipes that need it are skipped, and the
    report lists both in `failed`. With `options.scheduler`, each recipe is a
    task on a Dask cluster."""
    options = options or Options()
    listener = on_event or events.ignore
    paths, names = split_targets(targets)
    started = time.perf_counter()
    listener(events.BuildStarted(tuple(str(path) for path in paths)))
    ok = False
    outputs: list[OutputReport] = []
    failed: list[Failure] = []
    counts = CacheCounts()
    warnings: list[str] = []
    try:
        if options.scheduler is not None:
            from sdrecipe.engine.cluster import check_scheduler

            check_scheduler(options.scheduler)
            if names:
                raise RecipeError("--scheduler builds whole recipes: name no outputs")
            outputs, failed, counts = _build_on_cluster(paths, options, listener)
        else:
            recipe_set = load_recipe_set(recipe_files(paths), options.keep_going)
            failed = [Failure(str(p), str(e), e.exit_code) for p, e in recipe_set.broken.items()]
            for recipe in recipe_set.recipes:
                gone = {failure.recipe for failure in failed}
                blocked = [up for up in recipe_set.needs(recipe) if str(up.recipe.path) in gone]
                if blocked:
                    reason = f"skipped: it needs {blocked[0].recipe.path}, which failed"
                    failed.append(Failure(str(recipe.path), reason, 1))
                    listener(events.RecipeFinished(str(recipe.path), False, reason))
                    continue
                try:
                    built, used, said = build_recipe(recipe, names, options, listener)
                except SdrecipeError as exc:
                    listener(events.RecipeFinished(str(recipe.path), False, str(exc)))
                    if not options.keep_going:
                        raise
                    failed.append(Failure(str(recipe.path), str(exc), exc.exit_code))
                    continue
                outputs += built
                counts.add(used)
                warnings += said
        ok = not failed
    finally:
        seconds = time.perf_counter() - started
        listener(events.BuildFinished(ok, seconds, len(outputs), counts))
    return BuildReport(ok, tuple(outputs), tuple(failed), counts, tuple(warnings), seconds)


def build_recipe(
    recipe: Recipe, names: Sequence[str], options: Options, listener: Listener
) -> tuple[list[OutputReport], CacheCounts, list[str]]:
    """One recipe's build: proven current from its lock, or planned and built.
    A new cache is made only once the recipe and the cache folder have passed
    every check."""
    path = str(recipe.path)
    listener(events.RecipeStarted(path))
    notify = _notifier(listener)
    placement = place(options.device, options.device_memory)
    if placement is not None:
        limit = placement.memory
        cap = "" if limit is None else f", within {limit / 1e9:,.2f} GB of its memory"
        notify(f"computing on {placement.describe()}{cap}")
    cache = Cache.existing(options.cache_dir, not options.no_cache, notify=notify)
    if cache is not None and not options.force:
        current = proven_current(recipe, names or None, cache, device_class(placement))
        if current is not None:
            kept = []
            for name, (written, digest) in current.items():
                listener(
                    events.OutputStarted(path, name, str(written), Status.UP_TO_DATE, MATCHES_LOCK)
                )
                size = FileStat.of(written).size
                kept.append(
                    OutputReport(path, name, written, Status.UP_TO_DATE, KEPT, size, digest)
                )
                listener(events.OutputFinished(path, name, str(written), KEPT, size, digest))
            listener(events.RecipeFinished(path, True))
            return kept, CacheCounts(outputs_up_to_date=len(kept)), []
    if any(get_method(name).compiled for name in _methods(recipe)):
        preload_kernels()  # while torch loads and the inputs are read
    from sdrecipe.engine.builder import default_threads, update_outputs
    from sdrecipe.plan.prepare import prepare_recipe

    prepared = prepare_recipe(recipe, names or None, options.force, options.cache_dir)
    cache = cache or Cache(options.cache_dir, tensors=not options.no_cache, notify=notify)
    summary = update_outputs(
        prepared,
        options.threads or default_threads(),
        cache,
        options.force,
        remote=None
        if options.no_cache
        else open_remote(options.cache_url, options.cache_dir, listener),
        on_event=listener,
        placement=placement,
    )
    if cache.tensors:
        with cache.locked():
            trimmed = cache.trim()
        if trimmed and trimmed["removed"]:
            notify(
                f"trimmed the cache to its limit of {cache.max_size / 1e9:,.1f} GB: removed "
                f"{trimmed['removed']} least recently used entries "
                f"({trimmed['freed'] / 1e6:,.1f} MB); see `sdrecipe cache limit`"
            )
    listener(events.RecipeFinished(path, True))
    outputs = [OutputReport(path, **vars(output)) for output in summary.outputs]
    return outputs, summary.cache, list(summary.warnings)


def _methods(recipe: Recipe) -> set[str]:
    """The names of the methods `recipe`'s nodes call."""
    return {name for node in recipe.nodes.values() for name in method_calls(node.expr)}


def _build_on_cluster(
    paths: list[Path], options: Options, listener: Listener
) -> tuple[list[OutputReport], list[Failure], CacheCounts]:
    """Every recipe as a Dask task on `options.scheduler`'s cluster: the
    outputs (each naming its worker), the failures and the workers' cache counts."""
    from sdrecipe.engine.cluster import TaskResult, build_on_cluster, close, connect

    recipe_set = load_recipe_set(recipe_files(paths), options.keep_going)
    failed = [Failure(str(p), str(e), e.exit_code) for p, e in recipe_set.broken.items()]
    outputs: list[OutputReport] = []
    counts = CacheCounts()
    client = connect(str(options.scheduler))

    def arrived(result: TaskResult) -> None:
        if result.error:
            error = f"{result.error} (on {result.worker})"
            failed.append(Failure(result.recipe, error, result.exit_code))
            listener(events.RecipeFinished(result.recipe, False, error))
            return
        assert isinstance(result.report, BuildReport)
        outputs.extend(replace(output, worker=result.worker) for output in result.report.outputs)
        counts.add(result.report.cache)
        listener(events.RecipeFinished(result.recipe, True))

    try:
        build_on_cluster(recipe_set, client, build_on_worker, options, options.keep_going, arrived)
    finally:
        close(client)
    if failed and not options.keep_going:
        first = failed[0]
        error = SdrecipeError(first.error)
        error.exit_code = first.exit_code
        raise error
    return outputs, failed, counts


def build_on_worker(recipe: Path, options: Options) -> BuildReport:
    """One recipe's build on a Dask worker (its own local cache folder)."""
    return build([recipe], replace(options, scheduler=None, keep_going=False))


def plan(targets: Targets, options: Options | None = None) -> PlanReport:
    """What `build` would do, node by node, and why (nothing is written but
    remembered input hashes). Over several recipes, an input that an earlier
    recipe rewrites rebuilds what uses it."""
    options = options or Options()
    nodes = []
    for recipe, statuses in assess_statuses(*load_targets(targets), options):
        for found in statuses:
            output = recipe.outputs[found.output].path if found.output else None
            nodes.append(
                NodeReport(
                    str(recipe.path),
                    found.node,
                    found.status,
                    found.reason,
                    found.output,
                    None if output is None else str(output),
                    found.caching,
                )
            )
    return PlanReport(tuple(nodes))


def status(targets: Targets, options: Options | None = None) -> StatusReport:
    """Each output: up to date, or what a build would do and why. Outputs that
    the lock proves current are answered without reading any model."""
    options = options or Options()
    lines = [
        OutputStatus(
            str(recipe.path),
            found.output,
            str(recipe.outputs[found.output].path),
            found.status,
            found.reason,
        )
        for recipe, statuses in assess_statuses(*load_targets(targets), options, True)
        for found in statuses
        if found.output is not None
    ]
    return StatusReport(tuple(lines))


def assess_statuses(
    recipe_set: RecipeSet,
    names: Sequence[str],
    options: Options,
    outputs_only: bool = False,
    failed: dict[Path, SdrecipeError] | None = None,
    on_event: Listener | None = None,
) -> list[tuple[Recipe, list[NodeStatus]]]:
    """Each recipe with its node statuses (of the named outputs only, if any), in
    build order. With `outputs_only`, a recipe whose outputs the lock proves
    current is answered from the lock alone. With `failed`, a recipe that
    cannot be assessed (a missing input, say) is recorded there with its error
    and given no statuses, instead of stopping the rest. `on_event` hears the
    notes (such as waiting for the cache lock)."""
    cache = (
        None
        if options.no_cache
        else Cache.existing(options.cache_dir, notify=_notifier(on_event or events.ignore))
    )
    threads = options.threads
    placement = place(options.device, options.device_memory)

    def assess_one(recipe: Recipe) -> list[NodeStatus]:
        try:
            return assess_recipe(recipe)
        except SdrecipeError as exc:
            if failed is None:
                raise
            failed[recipe.path] = exc
            return []

    def assess_recipe(recipe: Recipe) -> list[NodeStatus]:
        if outputs_only and cache is not None and not options.force:
            current = proven_current(recipe, names or None, cache, device_class(placement))
            if current is not None:
                specs = recipe.outputs
                return [
                    NodeStatus(specs[name].node, Status.UP_TO_DATE, MATCHES_LOCK, name)
                    for name in current
                ]
        from sdrecipe.engine.builder import default_threads
        from sdrecipe.plan.assess import assess
        from sdrecipe.plan.prepare import prepare_recipe

        prepared = prepare_recipe(recipe, names or None, options.force, options.cache_dir, False)
        if prepared.not_downloaded:
            return _not_downloaded(prepared)
        with cache.locked() if cache else contextlib.nullcontext():
            lock = read_lock(recipe.path)
            return assess(
                prepared,
                cache,
                threads or default_threads(),
                options.force,
                lock=lock,
                device_class=device_class(placement),
            ).statuses

    planned = planned_statuses(recipe_set, assess_one)
    return [(recipe, planned[recipe.path]) for recipe in recipe_set.recipes]


def _not_downloaded(prepared: Prepared) -> list[NodeStatus]:
    """Statuses where a remote input is not downloaded: its tensors have no
    digests yet, so what needs it can only be assessed by a build."""
    graph = prepared.graph
    output_of = {graph.recipe.outputs[name].node: name for name in graph.outputs}
    statuses = []
    for node in graph.order:
        missing = sorted(prepared.not_downloaded & nx.ancestors(graph.dag, node))
        reason = (
            f"not assessed until input {missing[0]} is downloaded (a build downloads it)"
            if missing
            else "not assessed until the recipe's remote inputs are downloaded"
        )
        statuses.append(NodeStatus(node, Status.REBUILD, reason, output_of.get(node)))
    return statuses


def verify(
    targets: Targets, options: Options | None = None, on_event: Listener | None = None
) -> VerifyReport:
    """Rebuild the recipes' locked outputs from their inputs, without the cache,
    elsewhere, and compare them with the lock files."""
    from sdrecipe.engine.builder import default_threads
    from sdrecipe.engine.verify import verify as rebuild

    options = options or Options()
    threads = options.threads or default_threads()
    paths, names = split_targets(targets)
    if names:
        raise RecipeError(f"verify takes recipes and folders, and {names[0]!r} is neither")
    placement = place(options.device, options.device_memory)
    results = [
        Reproduction(
            str(recipe.path), r.name, r.expected, r.actual, r.reproducible, r.device, r.locked
        )
        for recipe in load_recipe_set(recipe_files(paths)).recipes
        for r in rebuild(recipe, threads, on_event or events.ignore, placement)
    ]
    return VerifyReport(all(r.reproducible for r in results), tuple(results))


def validate(
    recipe_path: str | Path, options: Options | None = None, text: str | None = None
) -> ValidateReport:
    """Check a recipe and its inputs' headers without building anything; with
    `text`, the recipe as it would read if `recipe_path` held that text (a file
    being written), its errors naming `recipe_path` and their lines."""
    from sdrecipe.plan.prepare import prepare_recipe
    from sdrecipe.recipe.loader import load_recipe, parse_recipe

    options = options or Options()
    path = Path(recipe_path)
    recipe = load_recipe(path) if text is None else parse_recipe(text, path)
    prepared = prepare_recipe(recipe, cache_root=options.cache_dir, download=False)
    return ValidateReport(
        valid=True,
        recipe=str(recipe_path),
        inputs={name: str(i.path) for name, i in prepared.recipe.inputs.items()},
        architectures={name: a.describe() for name, a in prepared.architectures.items()},
        order=tuple(prepared.graph.order),
        outputs={
            name: OutputPlanReport(
                str(output_plan.output.path),
                len(output_plan.tensors),
                sum(info.nbytes for info in output_plan.tensors.values()),
                dict(output_plan.counts()),
            )
            for name, output_plan in prepared.plan.outputs.items()
        },
        warnings=tuple(prepared.plan.warnings),
    )


def graph(targets: Targets, options: Options | None = None) -> tuple[RecipeGraph, str | None]:
    """The DAG of the targets' recipes (several are one graph, linked where one
    reads another's output), each node with its status as `plan` sees it; and
    why the statuses are unknown, when they are."""
    from sdrecipe.views.recipe_graph import graph_of

    options = options or Options()
    recipe_set, outputs = load_targets(targets)
    statuses: dict[Path, list[NodeStatus]] = {}
    unknown = None
    try:
        statuses = {r.path: found for r, found in assess_statuses(recipe_set, outputs, options)}
    except RecipeError as exc:
        unknown = f"status unknown: {exc}"
    return graph_of(recipe_set, outputs, statuses), unknown


def split_targets(targets: Targets) -> tuple[list[Path], list[str]]:
    """The recipes (files, folders) and output names that targets give: the
    first is a recipe or folder; later ones are recipes if named like one, else
    outputs of the one recipe."""
    if isinstance(targets, str | Path):
        targets = [targets]
    if not targets:
        raise RecipeError("name at least one recipe or folder")
    first, *rest = targets
    recipes, names = [Path(first)], []
    for target in rest:
        path = Path(target)
        if path.suffix in RECIPE_SUFFIXES or path.is_dir():
            recipes.append(path)
        else:
            names.append(str(target))
    if names and (len(recipes) > 1 or recipes[0].is_dir()):
        raise RecipeError("output names go with a single recipe file")
    return recipes, names


def load_targets(targets: Targets, keep_going: bool = False) -> tuple[RecipeSet, list[str]]:
    """The recipes that targets name, in build order, and the output names given
    (with `keep_going`, recipes that cannot be loaded are set aside)."""
    paths, names = split_targets(targets)
    return load_recipe_set(recipe_files(paths), keep_going), names


def open_remote(
    url: str | None, cache_dir: Path | None, listener: Listener = events.ignore
) -> RemoteCache | None:
    """The remote cache tier at `url`, if one is given; a local folder that is the
    local cache `cache_dir`, or inside it, or holds it, is refused."""
    if not url:
        return None
    try:
        remote = RemoteCache(url, notify=_notifier(listener))
    except UnsafeRemote as exc:
        raise RecipeError(f"--cache-url {url}: {exc}") from None
    except (ImportError, ValueError) as exc:
        raise RecipeError(
            f"--cache-url {url}: {exc} (s3:// needs the s3fs package, gs:// gcsfs, az:// adlfs)"
        ) from None
    folder = remote.local_root
    if folder is not None and cache_dir is not None:
        here, there = cache_dir.resolve(), folder.resolve()
        if here == there or here.is_relative_to(there) or there.is_relative_to(here):
            raise RecipeError(
                f"--cache-url {url} is the local cache folder {cache_dir}, or inside it or "
                "holds it: the remote cache must be another folder"
            )
    return remote


def _notifier(listener: Listener) -> Callable[[str], None]:
    """A `notify(text)` for the cache and remote tier that sends Note events."""
    return lambda text: listener(events.Note(text))


# --- the cache ---------------------------------------------------------------------


def cache_info(options: Options | None = None) -> dict[str, object]:
    """The local cache's disk use, size limit, entries and last build's hit
    statistics, and with `options.cache_url` the remote tier's."""
    options = options or Options()
    remote = open_remote(options.cache_url, options.cache_dir)
    shared = remote.info() if remote else None
    store = Cache.existing(options.cache_dir)
    if store is None:
        return {"path": str(options.cache_dir), "exists": False, "remote": shared}
    return {**store.info(), "exists": True, "remote": shared}


def cache_gc(options: Options | None = None, max_size: int | None = None) -> dict[str, object]:
    """Delete least recently used entries until the cache fits in `max_size`
    (default: its limit)."""
    options = options or Options()
    store = Cache.existing(options.cache_dir)
    result: dict[str, int] = {"removed": 0, "freed": 0, "size": 0}
    if store is not None:
        with store.locked():
            result = store.gc(max_size)
    return {**result, "cache": store is not None}


def cache_limit(options: Options | None = None, size: int | None = None) -> int:
    """The most bytes of its own the cache keeps; set to `size` if given."""
    options = options or Options()
    store = Cache(options.cache_dir) if size is not None else Cache.existing(options.cache_dir)
    if store is not None and size is not None:
        with store.locked():
            store.set_max_size(size)
    return store.max_size if store is not None else DEFAULT_MAX_SIZE


def cache_clear(options: Options | None = None) -> bool:
    """Delete every cache entry and remembered hash; False if there is no cache."""
    options = options or Options()
    store = Cache.existing(options.cache_dir)
    if store is None:
        return False
    with store.locked():
        store.clear()
    return True


def cache_transfer(recipe_path: Path, direction: str, options: Options) -> Transfer:
    """`pull` or `push` a recipe's cached outputs and tensors between the local
    cache and the remote one (`options.cache_url`): those of a build on
    `options.device` (the CPU without one) and, for a push, also those of each
    device class the recipe's lock records (what a GPU build cached)."""
    from sdrecipe.engine.builder import default_threads
    from sdrecipe.plan.assess import assess
    from sdrecipe.plan.prepare import prepare

    remote = open_remote(options.cache_url, options.cache_dir)
    if remote is None:
        raise RecipeError("--cache-url (or SDRECIPE_CACHE_URL) names the remote cache")
    prepared = prepare(recipe_path, cache_root=options.cache_dir)
    store = Cache(options.cache_dir)
    with store.locked():
        store.remove_stale_temporaries()  # of a killed build or pull
        lock = read_lock(recipe_path)
        classes = {named_class(options.device)}
        if direction == "push" and lock is not None:
            classes |= {output.device for output in lock.outputs.values() if output.device}
        identities: set[str] = set()
        output_ids: dict[str, None] = {}  # in order, once each
        for klass in sorted(classes):
            assessment = assess(
                prepared, store, options.threads or default_threads(), lock=lock, device_class=klass
            )
            identities.update(assessment.identities.every())
            output_ids.update(dict.fromkeys(assessment.output_ids.values()))
        move = remote.pull if direction == "pull" else remote.push
        moved = move(store, identities, list(output_ids))
    return Transfer(
        direction,
        remote.url,
        moved.outputs,
        moved.objects,
        moved.refs,
        moved.bytes,
        tuple(moved.corrupt),
    )
