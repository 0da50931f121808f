"""Views of recipes and models: graph, diff and lineage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdrecipe import api
from sdrecipe.cache.store import Cache
from sdrecipe.cli.build import TARGETS
from sdrecipe.cli.common import (
    Renderer,
    cache_dir_option,
    emit_json,
    json_option,
    note,
    reports_errors,
    threads_option,
)
from sdrecipe.engine import events
from sdrecipe.engine.options import Options
from sdrecipe.text import printable

if TYPE_CHECKING:
    from sdrecipe.views.files import ViewFile

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


@click.command()
@TARGETS
@click.option(
    "--format",
    "chosen_format",
    type=click.Choice(["mermaid", "dot", "svg", "png", "json"]),
    help="What to draw [default: by --output's suffix, else mermaid].",
)
@_PICTURE_OUTPUT
@_FORCE_VIEW
@cache_dir_option
@threads_option
@reports_errors
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
    from sdrecipe.plan.guard import protected_paths
    from sdrecipe.views import recipe_graph as views
    from sdrecipe.views.files import view_file

    kind = _format_of(chosen_format, output, "mermaid")
    loaded = list(api.load_targets(targets)[0].recipes)
    protected = [pair for recipe in loaded for pair in protected_paths(recipe, cache_dir)]
    protected += [
        (f"output {name!r}", spec.path)
        for recipe in loaded
        for name, spec in recipe.outputs.items()
    ]
    target = view_file(output, kind, protected, force) if output else None
    view, unknown = api.graph(targets, Options(threads=threads, cache_dir=cache_dir))
    if unknown:
        note(unknown)
    render = {
        "mermaid": views.to_mermaid,
        "dot": views.to_dot,
        "json": views.RecipeGraph.to_dict,
        "svg": views.to_scene,
        "png": views.to_scene,
    }
    _emit_view(render[kind](view), target)


@click.command()
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
@cache_dir_option
@json_option
@reports_errors
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
    renderer = Renderer(as_json)
    progress = events.as_progress(renderer, str(reference))
    result = diff_models(reference, models, progress, force)
    for target in targets:
        write_view(target, heatmap(result, measure))
    if as_json:
        emit_json(result.to_dict(by_key=by == "key"))
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


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "chosen_format",
    type=click.Choice(["text", "json", "mermaid"]),
    help="What to print [default: text; --json is --format json].",
)
@cache_dir_option
@json_option
@reports_errors
def lineage(model: Path, chosen_format: str | None, cache_dir: Path, as_json: bool) -> None:
    """Show how MODEL was made, as a tree: each ancestor's name, AutoV2 hash and
    operation, from sdrecipe's record and A1111's merge metadata, recursively.
    An ancestor met again refers to its first appearance; the tree stops at 64
    generations and 1000 ancestors, and says where."""
    from sdrecipe.views import lineage as views

    if as_json and chosen_format not in (None, "json"):
        raise click.UsageError(f"--json and --format {chosen_format} ask for different things")
    kind = "json" if as_json else chosen_format or "text"
    tree = views.model_lineage(model, Cache.existing(cache_dir, notify=note))
    render = {"text": views.to_text, "json": views.to_json, "mermaid": views.to_mermaid}
    # Each view escapes what came from the files' metadata.
    click.echo(render[kind](tree), nl=False)
