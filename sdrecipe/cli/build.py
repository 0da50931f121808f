"""Commands that build or say what a build would do: build, plan, status,
verify, validate, and the one-shot bake and extract."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import click

from sdrecipe import api
from sdrecipe.api.reports import BuildReport, PlanReport
from sdrecipe.cli.common import (
    RECIPE,
    Renderer,
    build_options,
    cache_dir_option,
    emit_json,
    json_option,
    reports_errors,
    say,
)
from sdrecipe.engine import events
from sdrecipe.engine.options import Options
from sdrecipe.errors import RecipeError
from sdrecipe.text import printable

TARGETS = click.argument("targets", nargs=-1, required=True, metavar="RECIPE [RECIPE|OUTPUT]...")


@click.command()
@TARGETS
@build_options()
@click.option(
    "--keep-going", "-k", is_flag=True, help="Go on with the recipes that do not need a failed one."
)
@click.option(
    "--scheduler",
    help="Build each recipe as a task on a Dask cluster: a scheduler address "
    "(tcp://HOST:8786), or local:N for a local cluster of N worker processes.",
)
@click.option("--dry-run", is_flag=True, help="Only show what would be done (as `plan`).")
@click.option(
    "--events",
    "events_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write every build event to this file as JSON lines (one object per line, "
    "each with a `type`).",
)
@reports_errors
def build(
    targets: tuple[str, ...],
    keep_going: bool,
    scheduler: str | None,
    dry_run: bool,
    events_path: Path | None,
    options: Options,
    as_json: bool,
) -> None:
    """Build the outputs of RECIPE (or only the named OUTPUTs and what they need).

    Several recipes, or a folder of them, build as one graph: a recipe that reads
    another's output is built after it; with --scheduler, as tasks on a Dask
    cluster."""
    options = Options(**{**vars(options), "keep_going": keep_going, "scheduler": scheduler})
    if dry_run:
        if events_path is not None:
            raise click.UsageError("--events records a build, and --dry-run builds nothing")
        show_plan(api.plan(targets, options), as_json)
        return
    with events_file(events_path, targets, options.cache_dir) as written:
        report = run_build(targets, options, as_json, written)
    if report.failed and not as_json:
        total = {output.recipe for output in report.outputs} | {f.recipe for f in report.failed}
        click.echo(f"{len(report.failed)} of {len(total)} recipes failed:")
        for failure in report.failed:
            say(f"  {failure.recipe}: {failure.error}")
    if report.failed:
        sys.exit(1)


def run_build(
    targets: tuple[str, ...], options: Options, as_json: bool, written: IO[str] | None = None
) -> BuildReport:
    """Build through the API, rendering its events; print the JSON report with --json."""
    recipes, _ = api.split_targets(targets)
    many = not options.scheduler and (len(recipes) > 1 or recipes[0].is_dir())
    renderer = Renderer(as_json, many, written, failures=options.keep_going)
    report = api.build(targets, options, renderer)
    if as_json:
        emit_json(report.to_json())
    else:
        for output in report.outputs:
            if output.worker is not None:
                say(f"{output.result} {output.name} -> {output.path} on {output.worker}")
    return report


@contextlib.contextmanager
def events_file(
    path: Path | None, targets: tuple[str, ...], cache_dir: Path
) -> Iterator[IO[str] | None]:
    """The --events file, opened for writing. It may not be, or lie in, what the
    build reads or writes (the recipes, their locks, inputs and outputs, the
    cache), and a file there is replaced only if it is an events file sdrecipe
    wrote."""
    if path is None:
        yield None
        return
    from sdrecipe.io.shard_layout import output_places
    from sdrecipe.plan.guard import protected_paths, target_problem
    from sdrecipe.plan.recipe_set import RECIPE_SUFFIXES

    recipes = api.load_targets(targets, keep_going=True)[0].recipes
    protected = [pair for recipe in recipes for pair in protected_paths(recipe, cache_dir)]
    protected += [
        (f"output {name!r} of {recipe.path}", place)
        for recipe in recipes
        for name, spec in recipe.outputs.items()
        for place in output_places(spec)
    ]
    problem = target_problem(path, "events", protected)
    if problem is None and path.suffix in RECIPE_SUFFIXES:
        problem = "is named like a recipe, which a folder build would read"
    if problem is None and path.exists() and not _is_events_file(path):
        problem = "exists and is not an events file sdrecipe wrote"
    if problem is None and not path.parent.is_dir():
        problem = f"lies in {path.parent}, which is not a folder"
    if problem:
        raise RecipeError(f"--events {path} {problem}; name another file")
    path.unlink(missing_ok=True)
    with path.open("x", encoding="utf-8") as handle:
        yield handle


def _is_events_file(path: Path) -> bool:
    """Whether the regular file at `path` begins as sdrecipe's events files do,
    or is empty (as one is when its build stopped before it began)."""
    try:
        with path.open("rb") as existing:
            first = json.loads(existing.readline(65536) or b'{"type": "build_started"}')
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("type") == "build_started"


@click.command()
@TARGETS
@build_options()
@reports_errors
def plan(targets: tuple[str, ...], options: Options, as_json: bool) -> None:
    """Show, for each node of RECIPE, whether it is up to date, comes from the cache,
    or is rebuilt, and why (--no-cache: as if the cache were empty). Over several
    recipes, an input that an earlier recipe rewrites rebuilds what uses it."""
    show_plan(api.plan(targets, options), as_json)


def show_plan(report: PlanReport, as_json: bool) -> None:
    if as_json:
        emit_json(report.to_json())
        return
    recipes = list(dict.fromkeys(node.recipe for node in report.nodes))
    for recipe in recipes:
        if len(recipes) > 1:
            say(f"== {recipe}")
        nodes = [node for node in report.nodes if node.recipe == recipe]
        width = max(len(node.node) for node in nodes)
        for node in nodes:
            target = f" -> {node.path}" if node.path else ""
            reason = f"  ({node.reason})" if node.reason else ""
            caching = f"  [{node.caching}]" if node.caching else ""
            say(f"{node.node:<{width}}  {node.status:<10}{reason}{target}{caching}")


@click.command()
@TARGETS
@build_options()
@reports_errors
def status(targets: tuple[str, ...], options: Options, as_json: bool) -> None:
    """One line per output of the recipes (files or folders): up to date, or what
    will rebuild and why."""
    report = api.status(targets, options)
    if as_json:
        emit_json(report.to_json())
        return
    for line in report.outputs:
        reason = f" ({line.reason})" if line.reason else ""
        say(f"{line.path}: {line.status}{reason}")


@click.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@build_options(uses_cache=False)
@reports_errors
def verify(recipes: tuple[Path, ...], options: Options, as_json: bool) -> None:
    """Rebuild RECIPES' outputs from their inputs, without the cache, and compare
    them with the lock files (several recipes or a folder: in dependency order).
    Exits 1 if any output differs."""
    renderer = Renderer(as_json)
    shown = (events.Progress, events.Note, events.BuildWarning)
    report = api.verify(recipes, options, lambda e: renderer(e) if isinstance(e, shown) else None)
    if as_json:
        emit_json(report.to_json())
    else:
        for result in report.outputs:
            on = f" on {result.device}" if result.device else ""
            if result.reproducible:
                say(f"{result.name}: reproducible{on} (content digest {result.actual[:16]}…)")
            else:
                locked = result.locked or "cpu"
                hint = (
                    f" (its bytes follow the device class: the lock's are {locked}'s, "
                    f"this rebuild ran on {result.device}; verify with --device {locked})"
                    if result.device and result.device != locked
                    else ""
                )
                say(
                    f"{result.name}: DIFFERS: the lock has {result.expected}, "
                    f"the rebuild gave {result.actual}{hint}"
                )
        click.echo("reproducible" if report.reproducible else "not reproducible")
    if not report.reproducible:
        sys.exit(1)


@click.command()
@click.argument("recipe", type=RECIPE)
@cache_dir_option
@json_option
@reports_errors
def validate(recipe: Path, cache_dir: Path, as_json: bool) -> None:
    """Check RECIPE and its inputs' headers without building anything."""
    report = api.validate(recipe, Options(cache_dir=cache_dir))
    for warning in report.warnings:
        click.echo(f"warning: {printable(warning)}", err=True)
    if as_json:
        emit_json(report.to_json())
        return
    say(f"{recipe}: valid")
    for name, described in report.architectures.items():
        say(f"  input {name}: {described}")
    say(f"  nodes in order: {', '.join(report.order)}")
    for name, output in report.outputs.items():
        say(f"  {name} -> {output.path}: {output.keys} keys, {output.bytes / 1e6:,.1f} MB")
