"""The `sdrecipe` command line: parse arguments, call the library, print results.

torch is imported only by commands that touch tensors, so `--help` and an
up-to-date `build` return at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdrecipe import __version__
from sdrecipe.errors import SdrecipeError, describe_os_error
from sdrecipe.io.mapped_files import install_sigbus_handler
from sdrecipe.text import printable

if TYPE_CHECKING:
    from sdrecipe.cache.remote import RemoteCache
    from sdrecipe.cache.store import Cache
    from sdrecipe.engine.builder import BuildSummary
    from sdrecipe.plan.recipe_set import RecipeSet
    from sdrecipe.plan.staleness import NodeStatus
    from sdrecipe.recipe import Recipe
    from sdrecipe.views.files import ViewFile

RECIPE = click.Path(dir_okay=False, path_type=Path)


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one paragraph on stderr (and, with --json, an error
    object on stdout) and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        install_sigbus_handler()
        options = kwargs.get("options")
        as_json = bool(kwargs.get("as_json") or (options and options.as_json))
        try:
            return command(*args, **kwargs)
        except SdrecipeError as exc:
            _fail("error", str(exc), exc.exit_code, as_json)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as other tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            _fail("error", f"{where}{describe_os_error(exc)}", 1, as_json)
        except KeyboardInterrupt:
            _interrupted(as_json)
        except Exception as exc:
            if os.environ.get("SDRECIPE_DEBUG"):
                raise
            _fail(
                "internal error",
                f"{type(exc).__name__}: {exc} "
                "(rerun with SDRECIPE_DEBUG=1 for a traceback, and please report it)",
                1,
                as_json,
            )

    return wrapper


def _fail(kind: str, message: str, exit_code: int, as_json: bool) -> None:
    click.echo(f"{kind}: {printable(message)}", err=True)
    if as_json:
        _emit_json({"error": message, "kind": kind, "exit_code": exit_code})
    sys.exit(exit_code)


def _note(text: str) -> None:
    """Tell the person at the terminal something as it happens (stderr)."""
    click.echo(f"note: {printable(text)}", err=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupted(as_json: bool) -> None:
    """Exit 130 after Ctrl-C or SIGTERM. An interrupt during publishing waits until
    the outputs and lock are all in place, so none is ever half-written."""
    _fail("interrupted", "stopped; no output is left half-written", 130, as_json)


class _Commands(click.Group):
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
                _emit_json(
                    {"error": exc.format_message(), "kind": kind, "exit_code": exc.exit_code}
                )
            raise
        except KeyboardInterrupt:
            _interrupted(as_json)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def _emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _cache_dir_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="SDRECIPE_CACHE_DIR",
        default=Path("cache"),
        show_default=True,
        help="The tensor cache (env: SDRECIPE_CACHE_DIR).",
    )(command)


def _cache_url_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache-url",
        envvar="SDRECIPE_CACHE_URL",
        help="A shared remote cache behind the local one: any fsspec URL, e.g. "
        "s3://bucket/sdrecipe-cache (env: SDRECIPE_CACHE_URL).",
    )(command)


def _open_remote(url: str | None, cache_dir: Path | None = None) -> RemoteCache | None:
    """The remote cache tier at `url`, if one is given; a local folder that is the
    local cache `cache_dir`, or inside it, or holds it, is refused (usage)."""
    if not url:
        return None
    from sdrecipe.cache.remote import RemoteCache, UnsafeRemote
    from sdrecipe.errors import RecipeError

    try:
        remote = RemoteCache(url, notify=_note)
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
            raise click.UsageError(
                f"--cache-url {url} is the local cache folder {cache_dir}, or inside it or "
                "holds it: the remote cache must be another folder"
            )
    return remote


def _threads_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--threads", "-j", type=click.IntRange(min=1), help="Worker threads [default: cores]."
    )(command)


def _json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON only."
    )(command)


@dataclass(frozen=True)
class BuildOptions:
    """The options that build, plan and verify share (verify uses threads and json)."""

    threads: int | None = None
    cache_dir: Path = Path("cache")
    cache_url: str | None = None
    no_cache: bool = False
    force: bool = False
    as_json: bool = False


def _build_options(uses_cache: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the shared options to a command and hand them over as one `options`."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            fields = {name: kwargs.pop(name) for name in list(kwargs) if name in _OPTION_NAMES}
            return command(*args, options=BuildOptions(**fields), **kwargs)

        options = [_threads_option, _json_option]
        if uses_cache:
            options += [
                _cache_dir_option,
                _cache_url_option,
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


_OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(BuildOptions))


def _open_cache(cache_dir: Path, tensors: bool = True) -> Cache:
    """The cache, created if needed (commands that build)."""
    from sdrecipe.cache.store import Cache

    return Cache(cache_dir, tensors=tensors, notify=_note)


def _existing_cache(cache_dir: Path, tensors: bool = True) -> Cache | None:
    """The cache if there is one: read-only commands create nothing."""
    from sdrecipe.cache.store import Cache

    return Cache.existing(cache_dir, tensors, notify=_note)


def _progress(enabled: bool) -> Callable[[str, int], Callable[[int], None]]:
    """A click progress bar on stderr per phase when `enabled`, else nothing."""

    def start(label: str, total: int) -> Callable[[int], None]:
        if not enabled or total <= 0:
            return lambda done: None
        bar = click.progressbar(length=total, label=f"{label:8}", file=sys.stderr, width=30)
        bar.__enter__()

        def advance(done: int) -> None:
            bar.update(done)
            if bar.pos >= bar.length:
                bar.__exit__(None, None, None)

        return advance

    return start


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdrecipe")
def main() -> None:
    """Declarative, streaming, reproducible Stable Diffusion checkpoint merges."""


_TARGETS = click.argument("targets", nargs=-1, required=True, metavar="RECIPE [RECIPE|OUTPUT]...")
_KEEP_GOING = click.option(
    "--keep-going", "-k", is_flag=True, help="Go on with the recipes that do not need a failed one."
)


def _recipes_and_outputs(targets: tuple[str, ...]) -> tuple[list[Path], tuple[str, ...]]:
    """The recipes (files, folders) and output names that TARGETS give: the first
    is a recipe or folder; later ones are recipes if named like one, else outputs
    of the one recipe."""
    from sdrecipe.plan.recipe_set import RECIPE_SUFFIXES

    first, *rest = targets
    recipes, names = [Path(first)], []
    for target in rest:
        path = Path(target)
        if path.suffix in RECIPE_SUFFIXES or path.is_dir():
            recipes.append(path)
        else:
            names.append(target)
    if names and (len(recipes) > 1 or recipes[0].is_dir()):
        raise click.UsageError("output names go with a single recipe file")
    return recipes, tuple(names)


def _is_one_recipe(recipes: list[Path]) -> bool:
    return len(recipes) == 1 and not recipes[0].is_dir()


def _load_set(paths: list[Path], keep_going: bool = False) -> RecipeSet:
    """The recipes that PATHS (files, folders) name, in build order; with
    `keep_going`, those that cannot be loaded are set aside in `broken`."""
    from sdrecipe.plan.recipe_set import load_recipe_set, recipe_files

    return load_recipe_set(recipe_files(paths), keep_going)


@main.command()
@_TARGETS
@_build_options()
@_KEEP_GOING
@click.option(
    "--scheduler",
    help="Build each recipe as a task on a Dask cluster: a scheduler address "
    "(tcp://HOST:8786), or local:N for a local cluster of N worker processes.",
)
@click.option("--dry-run", is_flag=True, help="Only show what would be done (as `plan`).")
@_reports_errors
def build(
    targets: tuple[str, ...],
    keep_going: bool,
    scheduler: str | None,
    dry_run: bool,
    options: BuildOptions,
) -> None:
    """Build the outputs of RECIPE (or only the named OUTPUTs and what they need).

    Several recipes, or a folder of them, build as one graph: a recipe that reads
    another's output is built after it; with --scheduler, as tasks on a Dask
    cluster."""
    if scheduler is not None:
        from sdrecipe.engine.cluster import check_scheduler

        check_scheduler(scheduler)
    recipes, outputs = _recipes_and_outputs(targets)
    if dry_run:
        _show_plan(recipes, outputs, options)
    elif scheduler is not None:
        if outputs:
            raise click.UsageError("--scheduler builds whole recipes: name no outputs")
        _build_on_cluster(recipes, options, keep_going, scheduler)
    elif _is_one_recipe(recipes):
        _emit_report(_build_recipe(recipes[0], outputs, options), options.as_json)
    else:
        _build_set(recipes, options, keep_going)


def _emit_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _emit_json(report)


def _build_on_worker(recipe: Path, options: BuildOptions) -> dict[str, Any]:
    """One recipe's build on a Dask worker, as `build` does it here."""
    return _build_recipe(recipe, (), options)


def _build_on_cluster(
    paths: list[Path], options: BuildOptions, keep_going: bool, scheduler: str
) -> None:
    """Build every recipe as a Dask task on the cluster at `scheduler`; show
    each as it ends; exit as a local build would."""
    from sdrecipe.engine.cluster import TaskResult, build_on_cluster, close, connect

    recipe_set = _load_set(paths, keep_going)
    client = connect(scheduler)

    def show(result: Any) -> None:
        if options.as_json:
            return
        if result.error:
            click.echo(f"failed {result.recipe} on {result.worker}: {printable(result.error)}")
            return
        for output in result.report["outputs"]:
            click.echo(f"{output['state']} {output['name']} -> {output['path']} on {result.worker}")

    results = [
        TaskResult(str(path), "the client", error=str(exc), exit_code=exc.exit_code)
        for path, exc in recipe_set.broken.items()
    ]
    for result in results:
        show(result)
    try:
        results += build_on_cluster(recipe_set, client, _build_on_worker, options, keep_going, show)
    finally:
        close(client)
    failed = [result for result in results if result.error]
    if options.as_json:
        _emit_json({"recipes": [vars(result) for result in results]})
    if failed:
        sys.exit(1 if keep_going else failed[0].exit_code)


def _build_set(paths: list[Path], options: BuildOptions, keep_going: bool) -> None:
    """Build every recipe in dependency order; with `keep_going`, a failure skips
    only the recipes that need it, and the exit code is 1."""
    recipe_set = _load_set(paths, keep_going)
    failed = {path: str(exc) for path, exc in recipe_set.broken.items()}
    for message in failed.values():
        click.echo(f"error: {printable(message)}", err=True)
    reports = []
    for recipe in recipe_set.recipes:
        blocked = [up for up in recipe_set.needs(recipe) if up.recipe.path in failed]
        if blocked:
            failed[recipe.path] = f"skipped: it needs {blocked[0].recipe.path}, which failed"
            continue
        if not options.as_json:
            click.echo(f"== {recipe.path}")
        try:
            reports.append({"recipe": str(recipe.path), **_build_recipe(recipe.path, (), options)})
        except SdrecipeError as exc:
            if not keep_going:
                raise
            failed[recipe.path] = str(exc)
            click.echo(f"error: {printable(str(exc))}", err=True)
    if options.as_json:
        _emit_json({"recipes": reports, "failed": {str(p): m for p, m in failed.items()}})
    elif failed:
        total = len(recipe_set.recipes) + len(recipe_set.broken)
        click.echo(f"{len(failed)} of {total} recipes failed:")
        for path, message in failed.items():
            click.echo(f"  {path}: {printable(message)}")
    if failed:
        sys.exit(1)


def _build_recipe(recipe: Path, outputs: tuple[str, ...], options: BuildOptions) -> dict[str, Any]:
    """`build`'s work: bring the outputs up to date, print the summary (unless
    --json), and return it as JSON data. A new cache is made only once the
    recipe and the cache folder have passed every check."""
    cache = _existing_cache(options.cache_dir, tensors=not options.no_cache)
    if cache is not None and not options.force:
        from sdrecipe.plan.uptodate import current_outputs

        current = current_outputs(recipe, outputs or None, cache)
        if current is not None:
            return _print_up_to_date(current, options.as_json)
    from sdrecipe.engine.builder import build as run_build
    from sdrecipe.engine.builder import default_threads
    from sdrecipe.plan.prepare import prepare

    prepared = prepare(recipe, outputs or None, options.force, options.cache_dir)
    cache = cache or _open_cache(options.cache_dir, tensors=not options.no_cache)
    summary = run_build(
        prepared,
        options.threads or default_threads(),
        cache,
        options.force,
        _progress(not options.as_json and sys.stderr.isatty()),
        remote=None if options.no_cache else _open_remote(options.cache_url, options.cache_dir),
    )
    if cache.tensors:
        with cache.locked():
            trimmed = cache.trim()
        if trimmed and trimmed["removed"]:
            _note(
                f"trimmed the cache to its limit of {cache.max_size / 1e9:,.1f} GB: removed "
                f"{trimmed['removed']} least recently used entries "
                f"({trimmed['freed'] / 1e6:,.1f} MB); see `sdrecipe cache limit`"
            )
    return _print_summary(summary, options.as_json)


_OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The file to write.",
)
_RECIPE_OPTION = click.option(
    "--recipe",
    "recipe_path",
    type=RECIPE,
    help="Where to keep the recipe (default: beside the output, OUTPUT.recipe.yaml).",
)
_FLOAT_DTYPES = ["float16", "bfloat16", "float32"]
_MODEL_DTYPES = [*_FLOAT_DTYPES, "fp8_e4m3fn", "fp8_e5m2"]
_DTYPE = click.option(
    "--dtype",
    type=click.Choice(_FLOAT_DTYPES),
    help="The LoRA's dtype (default: float16).",
)
_MODEL_DTYPE = click.option(
    "--dtype",
    type=click.Choice(_MODEL_DTYPES),
    help="The output's dtype (default: the base's; fp8 as `dtype:` in a recipe).",
)


@main.command()
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("adapters", nargs=-1, required=True)
@_OUTPUT
@_MODEL_DTYPE
@click.option(
    "--allow-unmatched",
    is_flag=True,
    help="Apply the modules that match BASE and leave the others out (a Flux LoRA "
    "with text-encoder modules, baked into a transformer-only file).",
)
@_RECIPE_OPTION
@_build_options()
@_reports_errors
def bake(
    base: Path,
    adapters: tuple[str, ...],
    output: Path,
    dtype: str | None,
    allow_unmatched: bool,
    recipe_path: Path | None,
    options: BuildOptions,
) -> None:
    """Bake ADAPTERS (LoRA, LyCORIS files; PATH=STRENGTH, default 1) into BASE.

    Writes a recipe beside the output (see --recipe) and builds it, so the
    merge can be rebuilt, changed and kept in git like any other."""
    from sdrecipe.recipe.one_shot import (
        bake_recipe,
        check_bake_inputs,
        kept_only_if_built,
        parse_adapter,
        recipe_path_for,
        write_recipe,
    )

    spec = {"path": output, **({"dtype": dtype} if dtype else {})}
    parsed = [parse_adapter(a) for a in adapters]
    check_bake_inputs(base, [path for path, _ in parsed])
    document = bake_recipe(base, parsed, spec, allow_unmatched)
    recipe = recipe_path_for(output) if recipe_path is None else recipe_path
    comment = "Written by `sdrecipe bake`; `sdrecipe build` on this file rebuilds it."
    with kept_only_if_built(recipe, write_recipe(recipe, document, comment), "bake"):
        _emit_report(_build_recipe(recipe, (), options), options.as_json)


@main.command()
@click.argument("tuned", type=click.Path(exists=True, path_type=Path))
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@_OUTPUT
@click.option("--rank", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--conv-rank", type=click.IntRange(min=1), help="Also 3x3 convolutions (LoCon).")
@click.option(
    "--clamp-quantile", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True
)
@click.option(
    "--text-encoder",
    type=click.Choice(["auto", "true", "false"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--format",
    "naming",
    type=click.Choice(["kohya", "peft"]),
    default="kohya",
    show_default=True,
    help="Module names: kohya's (A1111, ComfyUI, sd-scripts), or diffusers' PEFT ones.",
)
@_DTYPE
@_RECIPE_OPTION
@_build_options()
@_reports_errors
def extract(
    tuned: Path,
    base: Path,
    output: Path,
    rank: int,
    conv_rank: int | None,
    clamp_quantile: float,
    text_encoder: str,
    naming: str,
    dtype: str | None,
    recipe_path: Path | None,
    options: BuildOptions,
) -> None:
    """Extract a LoRA of TUNED - BASE (kohya's layers, a truncated SVD each).

    Writes a recipe beside the output (see --recipe) and builds it."""
    from sdrecipe.recipe.one_shot import (
        check_extract_inputs,
        extract_recipe,
        kept_only_if_built,
        recipe_path_for,
        write_recipe,
    )

    check_extract_inputs(tuned, base)

    spec: dict[str, object] = {"path": output, "format": "lora", "rank": rank}
    if conv_rank:
        spec["conv_rank"] = conv_rank
    spec["clamp_quantile"] = clamp_quantile
    spec["text_encoder"] = {"true": True, "false": False}.get(text_encoder, text_encoder)
    if naming != "kohya":
        spec["naming"] = naming
    if dtype:
        spec["dtype"] = dtype
    recipe = recipe_path_for(output) if recipe_path is None else recipe_path
    comment = "Written by `sdrecipe extract`; `sdrecipe build` on this file rebuilds it."
    with kept_only_if_built(
        recipe, write_recipe(recipe, extract_recipe(tuned, base, spec), comment), "extract"
    ):
        _emit_report(_build_recipe(recipe, (), options), options.as_json)


def _print_up_to_date(current: dict[str, Path], as_json: bool) -> dict[str, Any]:
    outputs = [
        {"name": n, "path": p, "state": "up to date", "status": "up to date"}
        for n, p in current.items()
    ]
    if not as_json:
        for name, path in current.items():
            click.echo(f"up to date {name} -> {path}")
    return {"outputs": outputs, "seconds": 0.0}


def _print_summary(summary: BuildSummary, as_json: bool) -> dict[str, Any]:
    for warning in summary.warnings:
        click.echo(f"warning: {printable(warning)}", err=True)
    report = {
        "outputs": [vars(output) for output in summary.outputs],
        "cache": vars(summary.cache),
        "seconds": summary.seconds,
    }
    if as_json:
        return report
    for output in summary.outputs:
        click.echo(f"{output.state} {output.name} -> {output.path} ({output.size / 1e6:,.1f} MB)")
        click.echo(f"  {_describe_counts(output.merged, output.passed_through, output.dropped)}")
    stats = summary.cache
    click.echo(
        f"done in {summary.seconds:.1f} s: {stats.tensors_computed} tensors computed, "
        f"{stats.tensors_from_cache} from cache"
    )
    return report


def _describe_counts(merged: int, passed: dict[str, int], dropped: int) -> str:
    total = merged + sum(passed.values())
    text = f"{total} keys: {merged} merged, {sum(passed.values())} passed through"
    if passed:
        text += " (" + ", ".join(f"{count} {reason}" for reason, count in passed.items()) + ")"
    if dropped:
        text += f"; {dropped} keys only in other models were dropped"
    return text


@main.command()
@_TARGETS
@_build_options()
@_reports_errors
def plan(targets: tuple[str, ...], options: BuildOptions) -> None:
    """Show, for each node of RECIPE, whether it is up to date, comes from the cache,
    or is rebuilt, and why (--no-cache: as if the cache were empty). Over several
    recipes, an input that an earlier recipe rewrites rebuilds what uses it."""
    _show_plan(*_recipes_and_outputs(targets), options)


@main.command()
@_TARGETS
@_build_options()
@_reports_errors
def status(targets: tuple[str, ...], options: BuildOptions) -> None:
    """One line per output of the recipes (files or folders): up to date, or what
    will rebuild and why."""
    recipes, outputs = _recipes_and_outputs(targets)
    plans = _plans(_load_set(recipes), outputs, options)
    lines = [
        {
            "recipe": str(recipe.path),
            "output": status.output,
            "path": str(recipe.outputs[status.output].path),
            "state": status.state,
            "reason": status.reason,
        }
        for recipe, statuses in plans
        for status in statuses
        if status.output is not None
    ]
    if options.as_json:
        _emit_json({"outputs": lines})
        return
    for line in lines:
        reason = f" ({line['reason']})" if line["reason"] else ""
        click.echo(printable(f"{line['path']}: {line['state']}{reason}"))


def _plans(
    recipe_set: RecipeSet, outputs: tuple[str, ...], options: BuildOptions
) -> list[tuple[Recipe, list[NodeStatus]]]:
    """Each recipe with its node statuses (of the named outputs only, if any),
    in build order."""
    from sdrecipe.engine.builder import default_threads
    from sdrecipe.plan.assess import assess
    from sdrecipe.plan.prepare import prepare_recipe
    from sdrecipe.plan.recipe_set import planned_statuses

    cache = None if options.no_cache else _existing_cache(options.cache_dir)
    threads = options.threads or default_threads()

    def assess_one(recipe: Recipe) -> list[NodeStatus]:
        prepared = prepare_recipe(recipe, outputs or None, options.force, options.cache_dir)
        with cache.locked() if cache else contextlib.nullcontext():
            return assess(prepared, cache, threads, options.force).statuses

    planned = planned_statuses(recipe_set, assess_one)
    return [(recipe, planned[recipe.path]) for recipe in recipe_set.recipes]


def _show_plan(recipes: list[Path], outputs: tuple[str, ...], options: BuildOptions) -> None:
    plans = _plans(_load_set(recipes), outputs, options)
    if options.as_json:
        nodes = [
            {**vars(status), **({} if len(plans) == 1 else {"recipe": str(recipe.path)})}
            for recipe, statuses in plans
            for status in statuses
        ]
        _emit_json({"nodes": nodes})
        return
    for recipe, statuses in plans:
        if len(plans) > 1:
            click.echo(f"== {recipe.path}")
        width = max(len(status.node) for status in statuses)
        for status in statuses:
            target = f" -> {recipe.outputs[status.output].path}" if status.output else ""
            reason = f"  ({status.reason})" if status.reason else ""
            caching = f"  [{status.caching}]" if status.caching else ""
            click.echo(f"{status.node:<{width}}  {status.state:<10}{reason}{target}{caching}")


_PICTURE_OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (.svg or .png for a picture) instead of standard output.",
)


def _format_of(chosen: str | None, output: Path | None, default: str) -> str:
    """The format asked for, else the one the output file's suffix names."""
    from sdrecipe.views.files import VIEW_SUFFIXES

    suffix = output.suffix.lower() if output else ""
    by_suffix = next((kind for kind, known in VIEW_SUFFIXES.items() if suffix in known), None)
    kind = chosen or by_suffix or default
    if kind in ("svg", "png") and output is None:
        raise click.UsageError(f"--format {kind} needs --output FILE.{kind}")
    return kind


def _emit_view(content: Any, target: ViewFile | None) -> None:
    """Print a text view (a JSON object as JSON), or write the view to `target`."""
    if target is None:
        text = json.dumps(content, indent=2) + "\n" if isinstance(content, dict) else content
        click.echo(text, nl=False)
        return
    from sdrecipe.views.files import write_view

    write_view(target, content)


_FORCE_VIEW = click.option(
    "--force",
    is_flag=True,
    help="Replace an existing file that is not a view sdrecipe wrote (never an input, "
    "a recipe, a lock file or the cache).",
)


@main.command()
@_TARGETS
@click.option(
    "--format",
    "chosen_format",
    type=click.Choice(["mermaid", "dot", "svg", "png", "json"]),
    help="What to draw [default: by --output's suffix, else mermaid].",
)
@_PICTURE_OUTPUT
@_FORCE_VIEW
@_cache_dir_option
@_threads_option
@_reports_errors
def graph(
    targets: tuple[str, ...],
    chosen_format: str | None,
    output: Path | None,
    force: bool,
    cache_dir: Path,
    threads: int | None,
) -> None:
    """Draw RECIPE's DAG: inputs, nodes (expression) and outputs, each coloured by
    its status (up to date, from cache, rebuild, and why), as `plan` sees it.
    Several recipes, or a folder, are one picture, linked where one reads
    another's output."""
    from sdrecipe.errors import RecipeError
    from sdrecipe.plan.graph import build_graph
    from sdrecipe.plan.guard import protected_paths
    from sdrecipe.views import recipe_graph as views
    from sdrecipe.views.files import view_file

    kind = _format_of(chosen_format, output, "mermaid")
    recipes, outputs = _recipes_and_outputs(targets)
    recipe_set = _load_set(recipes)
    loaded = list(recipe_set.recipes)
    protected = [pair for recipe in loaded for pair in protected_paths(recipe, cache_dir)]
    protected += [
        (f"output {name!r}", spec.path)
        for recipe in loaded
        for name, spec in recipe.outputs.items()
    ]
    target = view_file(output, kind, protected, force) if output else None
    links = [(up, recipe) for recipe in loaded for up in recipe_set.needs(recipe)]
    statuses: dict[Path, list[NodeStatus]] = {}
    try:
        options = BuildOptions(threads=threads, cache_dir=cache_dir)
        statuses = {recipe.path: found for recipe, found in _plans(recipe_set, outputs, options)}
    except RecipeError as exc:
        _note(f"status unknown: {exc}")
    parts = [
        views.recipe_graph(build_graph(recipe, outputs or None), statuses.get(recipe.path))
        for recipe in loaded
    ]
    view = parts[0] if len(parts) == 1 else views.combine(loaded, parts, links)
    render = {
        "mermaid": views.to_mermaid,
        "dot": views.to_dot,
        "json": views.RecipeGraph.to_dict,
        "svg": views.to_scene,
        "png": views.to_scene,
    }
    _emit_view(render[kind](view), target)


@main.command()
@click.argument("reference", type=click.Path(exists=True, path_type=Path))
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--by",
    type=click.Choice(["block", "component", "key"]),
    default="block",
    show_default=True,
    help="The rows of the table (the JSON always has blocks and components).",
)
@click.option(
    "--measure",
    type=click.Choice(["relative_l2", "cosine", "max_abs"]),
    default="relative_l2",
    show_default=True,
    help="What the heatmap's colour shows.",
)
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Write a heatmap.")
@click.option("--svg", type=click.Path(dir_okay=False, path_type=Path), help="Write a heatmap.")
@click.option(
    "--force",
    is_flag=True,
    help="Compare models of different families, and let a heatmap replace an existing "
    "file that is not a view sdrecipe wrote (never one of the models).",
)
@_cache_dir_option
@_json_option
@_reports_errors
def diff(
    reference: Path,
    models: tuple[Path, ...],
    by: str,
    measure: str,
    png: Path | None,
    svg: Path | None,
    force: bool,
    cache_dir: Path,
    as_json: bool,
) -> None:
    """How much each of MODELS differs from REFERENCE, per block and component:
    relative L2 change ||B - A|| / ||A||, cosine similarity, largest absolute
    change, and keys only one model has. Streams one tensor at a time. Models
    of different families are refused unless --force."""
    from sdrecipe.views.files import view_file, write_view
    from sdrecipe.views.model_diff import diff_models, heatmap

    protected = [("the reference model", reference)]
    protected += [("a compared model", model) for model in models]
    protected.append(("the cache folder", cache_dir))
    targets = [
        view_file(path, kind, protected, force)
        for kind, path in (("png", png), ("svg", svg))
        if path is not None
    ]
    progress = _progress(not as_json and sys.stderr.isatty())
    result = diff_models(reference, models, progress, force)
    for target in targets:
        write_view(target, heatmap(result, measure))
    if as_json:
        _emit_json(result.to_dict(by_key=by == "key"))
        return
    for comparison in result.comparisons:
        total = comparison.total.measures()
        click.echo(
            printable(
                f"{comparison.path.name} against {reference.name} ({result.family}): "
                + _describe_measures(total)
            )
        )
        if comparison.only_in_reference or comparison.only_in_model or comparison.shape_differs:
            click.echo(
                f"  keys only in {printable(reference.name)}: "
                f"{len(comparison.only_in_reference)}, only in "
                f"{printable(comparison.path.name)}: {len(comparison.only_in_model)}, "
                f"of another shape: {len(comparison.shape_differs)}"
            )
        groups = {"block": comparison.blocks, "component": comparison.components}
        rows = groups.get(by, comparison.keys)
        width = max((len(name) for name in rows), default=0)
        for name, sums in rows.items():
            click.echo(f"  {printable(name):<{width}}  {_describe_measures(sums.measures())}")


def _describe_measures(measures: dict[str, Any]) -> str:
    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"relative L2 {number(measures['relative_l2'], '.4g'):>9}  "
        f"cosine {number(measures['cosine'], '.6f'):>9}  "
        f"max abs {number(measures['max_abs'], '.4g'):>9}  "
        f"({measures['keys']} keys, {measures['parameters']:,} parameters)"
    )


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "chosen_format",
    type=click.Choice(["text", "json", "mermaid"]),
    help="What to print [default: text; --json is --format json].",
)
@_cache_dir_option
@_json_option
@_reports_errors
def lineage(model: Path, chosen_format: str | None, cache_dir: Path, as_json: bool) -> None:
    """Show how MODEL was made, as a tree: each ancestor's name, AutoV2 hash and
    operation, from sdrecipe's record and A1111's merge metadata, recursively.
    An ancestor met again refers to its first appearance; the tree stops at 64
    generations and 1000 ancestors, and says where."""
    from sdrecipe.views import lineage as views

    if as_json and chosen_format not in (None, "json"):
        raise click.UsageError(f"--json and --format {chosen_format} ask for different things")
    kind = "json" if as_json else chosen_format or "text"
    tree = views.model_lineage(model, _existing_cache(cache_dir))
    render = {"text": views.to_text, "json": views.to_json, "mermaid": views.to_mermaid}
    # Each view escapes what came from the files' metadata.
    click.echo(render[kind](tree), nl=False)


def _init_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One option per model role and parameter that `init`'s templates take."""
    from sdrecipe.cli.init_wizard import PARAMETER_FLAGS, ROLE_FLAGS, TEMPLATES

    def role_help(flag: str) -> str:
        return "; ".join(
            f"{t.name}: {r.question.lower()} ({r.name})"
            for t in TEMPLATES.values()
            for r in t.roles
            if r.flag == flag
        )

    options = [
        click.option(
            f"--{flag}", type=click.Path(exists=True, path_type=Path), help=role_help(flag)
        )
        for flag in ROLE_FLAGS
    ]
    options += [
        click.option(f"--{name}", help=f"The {name} parameter.") for name in PARAMETER_FLAGS
    ]
    options.insert(0, click.option("--template", type=click.Choice(list(TEMPLATES))))
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@_init_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="The recipe to write.")
@click.option(
    "--output-model",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the recipe builds the merged model.",
)
@click.option("--dtype", type=click.Choice(_MODEL_DTYPES))
@_cache_dir_option
@_reports_errors
def init(cache_dir: Path, **answers: Any) -> None:
    """Write a commented recipe, asking what to make and for the model files
    (each checked, its family and variant shown) and the parameters. Every
    question has a flag, so scripts can run it without a terminal."""
    from sdrecipe.cli.init_wizard import run_init

    def validate(recipe: Path) -> str:
        from sdrecipe.plan.prepare import prepare

        prepared = prepare(recipe, cache_root=cache_dir)
        output = next(iter(prepared.recipe.outputs.values()))
        return (
            f"wrote {recipe}: valid. Build it with `sdrecipe build {recipe}` (writes {output.path})"
        )

    run_init({key.replace("_", "-"): value for key, value in answers.items()}, _say, validate)


def _say(text: str) -> None:
    click.echo(printable(text))


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@_build_options(uses_cache=False)
@_reports_errors
def verify(recipes: tuple[Path, ...], options: BuildOptions) -> None:
    """Rebuild RECIPES' outputs from their inputs, without the cache, and compare
    them with the lock files (several recipes or a folder: in dependency order).
    Exits 1 if any output differs."""
    from sdrecipe.engine.builder import default_threads
    from sdrecipe.engine.verify import verify as run_verify

    threads = options.threads or default_threads()
    paths = [recipe.path for recipe in _load_set(list(recipes)).recipes]
    results = [
        result
        for path in paths
        for result in run_verify(path, threads, _progress(sys.stderr.isatty()))
    ]
    reproducible = all(result.reproducible for result in results)
    if options.as_json:
        _emit_json(
            {
                "reproducible": reproducible,
                "outputs": [{**vars(r), "reproducible": r.reproducible} for r in results],
            }
        )
    else:
        for result in results:
            if result.reproducible:
                click.echo(f"{result.name}: reproducible (content digest {result.actual[:16]}…)")
            else:
                click.echo(
                    f"{result.name}: DIFFERS: the lock has {result.expected}, "
                    f"the rebuild gave {result.actual}"
                )
        click.echo("reproducible" if reproducible else "not reproducible")
    if not reproducible:
        sys.exit(1)


@main.command()
@click.argument("recipe", type=RECIPE)
@_cache_dir_option
@_json_option
@_reports_errors
def validate(recipe: Path, cache_dir: Path, as_json: bool) -> None:
    """Check RECIPE and its inputs' headers without building anything."""
    from sdrecipe.plan.prepare import prepare

    prepared = prepare(recipe, cache_root=cache_dir)
    for warning in prepared.plan.warnings:
        click.echo(f"warning: {printable(warning)}", err=True)
    report = {
        "recipe": str(recipe),
        "inputs": {name: str(i.path) for name, i in prepared.recipe.inputs.items()},
        "architectures": {
            name: architecture.describe() for name, architecture in prepared.architectures.items()
        },
        "order": list(prepared.graph.order),
        "outputs": {
            name: {
                "path": str(plan.output.path),
                "keys": len(plan.tensors),
                "bytes": sum(info.nbytes for info in plan.tensors.values()),
                "counts": dict(plan.counts()),
            }
            for name, plan in prepared.plan.outputs.items()
        },
    }
    if as_json:
        _emit_json({"valid": True, **report})
        return
    click.echo(f"{recipe}: valid")
    for name, described in report["architectures"].items():
        click.echo(f"  input {name}: {described}")
    click.echo(f"  nodes in order: {', '.join(prepared.graph.order)}")
    for name, info in report["outputs"].items():
        click.echo(
            f"  {name} -> {info['path']}: {info['keys']} keys, {info['bytes'] / 1e6:,.1f} MB"
        )


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--against",
    type=click.Path(exists=True, path_type=Path),
    help="For an adapter: the model to match its modules against.",
)
@_cache_dir_option
@click.option("--no-cache", is_flag=True, help="Hash the file without remembering it.")
@_json_option
@_reports_errors
def inspect(
    model: Path, against: Path | None, cache_dir: Path, no_cache: bool, as_json: bool
) -> None:
    """Show what MODEL is: format, architecture, components, dtypes, hashes,
    lineage; for an adapter (LoRA, LyCORIS), its algorithms, ranks and family."""
    from sdrecipe.io.adapter_files import is_adapter_path
    from sdrecipe.views.model_report import inspect_adapter, inspect_model

    cache = None if no_cache else _existing_cache(cache_dir)
    adapter = is_adapter_path(model)
    if against is not None and not adapter:
        raise click.UsageError("--against applies to adapters, and MODEL is not one")
    report = inspect_adapter(model, cache, against) if adapter else inspect_model(model, cache)
    if as_json:
        _emit_json(report)
        return

    def say(line: str) -> None:
        # Names, expressions and lineage come from the file: escape them.
        click.echo(printable(line))

    if adapter:
        _describe_adapter(report, say)
        return

    words = [report["family"], report["kind"], report["variant"]]
    kind = " ".join(str(word) for word in words if word not in (None, "normal"))
    say(f"{model}: {report['format']}, {kind}{', with EMA' if report['ema'] else ''}")
    if report["family"] == "unknown":
        say(f"  key prefixes: {', '.join(report['key_prefixes'])}")
    if report["prediction"]:
        say(f"  prediction: {report['prediction']}")
    say(
        f"  {report['keys']} keys, {report['parameters']:,} parameters, "
        f"{report['size'] / 1e6:,.1f} MB, dtypes "
        + ", ".join(f"{code} {count}" for code, count in report["dtypes"].items())
    )
    for name, counts in report["components"].items():
        stored = ", ".join(
            f"{kind} {entry['keys']}" for kind, entry in report["storage"][name].items()
        )
        say(
            f"  {name:15} {counts['keys']:5} keys {counts['parameters']:>15,} parameters"
            f"  ({stored})"
        )
    if report["quantization"]:
        share = report["quantized_share"]
        say(f"  quantized: {report['quantization']}; {share:.1%} of the bytes")
    legacy = f"  AutoV1 {report['legacy_hash']}" if report["legacy_hash"] else ""
    say(f"  sha256 {report['sha256']}  AutoV2 {report['autov2']}{legacy}")
    lineage = report["lineage"]
    if "sdrecipe" in lineage:
        own = lineage["sdrecipe"]
        say(f"  made by sdrecipe {own['version']}: {own['node']} = {own['expression']}")
    if "sd_merge_models" in lineage:
        names = sorted({str(name) for name in lineage["sd_merge_models"].values()})
        say("  merged from: " + ", ".join(names))


def _describe_adapter(report: dict, say: Callable[[str], None]) -> None:
    """`inspect`'s text for an adapter."""
    adapter = report["adapter"]
    algorithms = ", ".join(f"{name} {count}" for name, count in adapter["algorithms"].items())
    say(f"{report['path']}: lora ({algorithms}), {adapter['family']}, {adapter['naming']} names")
    say(
        f"  {adapter['modules']} modules, rank {', '.join(map(str, adapter['ranks'])) or '-'}, "
        f"alpha {', '.join(f'{a:g}' for a in adapter['alphas']) or '-'}, "
        f"{report['size'] / 1e6:,.1f} MB"
    )
    if "against" in adapter:
        unmatched = adapter["unmatched"]
        say(
            f"  against {adapter['against']['path']} ({adapter['against']['family']}): "
            f"{adapter['matched']} modules match, {len(unmatched)} do not"
            + (f" (e.g. {', '.join(unmatched[:3])})" if unmatched else "")
        )
    say(f"  sha256 {report['sha256']}  AutoV2 {report['autov2']}")


@main.command()
@_json_option
@_reports_errors
def methods(as_json: bool) -> None:
    """List the merge methods: models, spaces, parameters and defaults."""
    from sdrecipe.methods.registry import registered_methods

    listed = [
        {
            "name": method.name,
            "signature": method.signature,
            "models": list(method.model_names),
            "variadic": method.variadic,
            "min_models": method.min_models,
            "spaces": dict(method.spaces),
            "parameters": {
                name: {"type": _type_name(info.annotation), "default": info.default}
                for name, info in method.parameters.model_fields.items()
            },
            "elementwise": method.elementwise,
            "key_aware": method.key_aware,
            "summary": (method.function.__doc__ or "").strip().splitlines()[0],
        }
        for method in registered_methods()
    ]
    if as_json:
        _emit_json({"methods": listed})
        return
    for entry in listed:
        click.echo(f"{entry['signature']}\n    {entry['summary']}")


def _type_name(annotation: Any) -> str:
    """A parameter's type as people write it: `float`, `Literal['sum', 'count']`."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


@main.command()
@click.argument("model_or_family")
@click.option("--keys", "with_keys", is_flag=True, help="Also list the keys of each block.")
@_json_option
@_reports_errors
def blocks(model_or_family: str, with_keys: bool, as_json: bool) -> None:
    """List the merge blocks of a family (sd1, sd2, sdxl, flux1, sd3, sd35-medium,
    sd35-large, ...) or of a model file: each block's key and parameter counts,
    in the order pasted lists use."""
    import math

    from sdrecipe.arch import layout
    from sdrecipe.arch.blocks import block_ids, block_of
    from sdrecipe.arch.family import family_by_name, family_names
    from sdrecipe.errors import RecipeError

    path = Path(model_or_family)
    try:
        is_file = bool(model_or_family) and path.exists()
    except OSError:  # a name too long for a path is no file
        is_file = False
    if is_file:
        from sdrecipe.arch.detect import detect
        from sdrecipe.io.readers import open_model

        reader = open_model(path)
        infos = reader.infos()
        family = detect(infos, reader.metadata).family
        sizes = {key: info.numel for key, info in infos.items()}
    else:
        data = family_by_name(model_or_family)
        if data is None:
            raise RecipeError(
                f"{model_or_family!r} is neither a model file nor a family "
                f"({', '.join(family_names())})"
            )
        family = data.name
        sizes = {}
        if data.layout is not None:
            shapes, _ = layout(data.layout)
            sizes = {key: math.prod(shape) for key, shape in shapes.items()}
    ids = block_ids(family)
    if not ids:
        raise RecipeError(f"{family} has no block table (no merging tool defines one)")
    table: dict[str, dict[str, Any]] = {block: {"keys": [], "parameters": 0} for block in ids}
    for key, size in sizes.items():
        block = block_of(family, key)
        if block is None:
            continue
        entry = table[block]
        entry["keys"].append(key)
        entry["parameters"] += size
    if as_json:
        _emit_json(
            {
                "family": family,
                "blocks": {
                    block: {
                        "keys": len(entry["keys"]),
                        "parameters": entry["parameters"],
                        **({"key_names": entry["keys"]} if with_keys else {}),
                    }
                    for block, entry in table.items()
                },
            }
        )
        return
    click.echo(f"{family}: {len(ids)} blocks")
    for block, entry in table.items():
        click.echo(f"  {block:6} {len(entry['keys']):5} keys {entry['parameters']:>15,} parameters")
        if with_keys:
            for key in entry["keys"]:
                click.echo(f"         {printable(key)}")


@main.group()
def cache() -> None:
    """Inspect, trim and share the tensor cache."""


@cache.command("info")
@_cache_dir_option
@_cache_url_option
@_json_option
@_reports_errors
def cache_info(cache_dir: Path, cache_url: str | None, as_json: bool) -> None:
    """Disk use, size limit, entries and the last build's hit statistics, and
    with --cache-url the remote tier's entries and size.

    Outputs are hard-linked into the cache, so their bytes are shared with the
    output files: `size` counts only the cache's own bytes (what `gc` can free),
    `shared_with_outputs` the rest."""
    remote = _open_remote(cache_url, cache_dir)
    shared = remote.info() if remote else None
    if shared and not as_json:
        click.echo(
            f"remote cache {shared['url']}: {shared['size'] / 1e6:,.1f} MB, "
            f"{shared['outputs']} outputs, {shared['objects']} intermediate tensors, "
            f"{shared['tensors']} tensor identities"
        )
    store = _existing_cache(cache_dir)
    if store is None:
        if as_json:
            _emit_json({"path": str(cache_dir), "exists": False, "remote": shared})
        else:
            click.echo(f"cache {cache_dir}: none yet (a build creates it)")
        return
    info = store.info()
    if as_json:
        _emit_json({**info, "exists": True, "remote": shared})
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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def _parse_size(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> int | None:
    if value is None:
        return None
    match = _SIZE.match(value)
    if not match:
        raise click.BadParameter(f"{value!r} is not a size such as 20GB, 500MB or 1024")
    number, unit, suffix = match.groups()
    base = 1024 if suffix and suffix.lower() == "ib" else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def _exchange_command(direction: str) -> Callable[..., Any]:
    @click.argument("recipe", type=RECIPE)
    @_cache_dir_option
    @_cache_url_option
    @_threads_option
    @_json_option
    @_reports_errors
    def command(
        recipe: Path, cache_dir: Path, cache_url: str | None, threads: int | None, as_json: bool
    ) -> None:
        from sdrecipe.engine.builder import default_threads
        from sdrecipe.plan.assess import assess
        from sdrecipe.plan.prepare import prepare

        remote = _open_remote(cache_url, cache_dir)
        if remote is None:
            raise click.UsageError("--cache-url (or SDRECIPE_CACHE_URL) names the remote cache")
        prepared = prepare(recipe, cache_root=cache_dir)
        store = _open_cache(cache_dir)
        with store.locked():
            store.remove_stale_temporaries()  # of a killed build or pull
            assessment = assess(prepared, store, threads or default_threads())
            move = remote.pull if direction == "pull" else remote.push
            moved = move(store, assessment.identities.every(), list(assessment.output_ids.values()))
        if as_json:
            _emit_json(vars(moved))
            return
        click.echo(
            f"{direction}ed {moved.outputs} outputs and {moved.refs} tensors "
            f"({moved.bytes / 1e6:,.1f} MB) {'from' if direction == 'pull' else 'to'} {remote.url}"
        )

    command.__doc__ = (
        f"{'Download' if direction == 'pull' else 'Upload'} RECIPE's cached outputs and "
        f"tensors {'from' if direction == 'pull' else 'to'} the remote cache (--cache-url)."
    )
    return cache.command(direction)(command)


cache_pull = _exchange_command("pull")
cache_push = _exchange_command("push")


@cache.command("gc")
@_cache_dir_option
@click.option(
    "--max-size",
    callback=_parse_size,
    help="Keep at most this much of the cache's own bytes (e.g. 500MB, 2GiB) "
    "[default: the cache's limit, see `cache limit`].",
)
@_json_option
@_reports_errors
def cache_gc(cache_dir: Path, max_size: int | None, as_json: bool) -> None:
    """Delete least recently used entries until the cache fits in --max-size."""
    store = _existing_cache(cache_dir)
    result = {"removed": 0, "freed": 0, "size": 0}
    if store is not None:
        with store.locked():
            result = store.gc(max_size)
    if as_json:
        _emit_json({**result, "cache": store is not None})
        return
    if store is None:
        click.echo(f"there is no cache at {cache_dir}: nothing to remove")
        return
    click.echo(
        f"removed {result['removed']} entries, freeing {result['freed'] / 1e6:,.1f} MB; "
        f"the cache now holds {result['size'] / 1e6:,.1f} MB of its own"
    )


@cache.command("limit")
@click.argument("size", required=False, callback=_parse_size)
@_cache_dir_option
@_reports_errors
def cache_limit(size: int | None, cache_dir: Path) -> None:
    """Show, or set to SIZE (e.g. 50GB), the most bytes of its own the cache keeps.

    After every build, least recently used entries are deleted until the cache
    fits (default 20 GB). The limit is stored in the cache folder."""
    store = _open_cache(cache_dir) if size is not None else _existing_cache(cache_dir)
    if store is not None and size is not None:
        with store.locked():
            store.set_max_size(size)
    from sdrecipe.cache.store import DEFAULT_MAX_SIZE

    limit = store.max_size if store is not None else DEFAULT_MAX_SIZE
    click.echo(f"cache {cache_dir}: limit {limit / 1e9:,.2f} GB")


@cache.command("clear")
@_cache_dir_option
@_reports_errors
def cache_clear(cache_dir: Path) -> None:
    """Delete every cache entry and every remembered hash."""
    store = _existing_cache(cache_dir)
    if store is None:
        click.echo(f"there is no cache at {cache_dir}: nothing to clear")
        return
    with store.locked():
        store.clear()
    click.echo(f"cleared {cache_dir}")
