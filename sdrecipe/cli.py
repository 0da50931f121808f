"""The `sdrecipe` command line: parse arguments, call the library, print results.

Heavy modules (torch) are imported inside commands so that `--help` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sdrecipe import __version__
from sdrecipe.errors import SdrecipeError

RECIPE = click.Path(dir_okay=False, path_type=Path)


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn sdrecipe errors into one paragraph on stderr and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return command(*args, **kwargs)
        except SdrecipeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("SDRECIPE_DEBUG"):
                raise
            click.echo(
                f"internal error: {type(exc).__name__}: {exc} "
                "(rerun with SDRECIPE_DEBUG=1 for a traceback, and please report it)",
                err=True,
            )
            sys.exit(1)

    return wrapper


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdrecipe")
def main() -> None:
    """Declarative, streaming, reproducible Stable Diffusion checkpoint merges."""


@main.command()
@click.argument("recipe", type=RECIPE)
@click.argument("outputs", nargs=-1)
@click.option(
    "--threads", "-j", type=click.IntRange(min=1), help="Worker threads [default: cores]."
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary only.")
@_reports_errors
def build(recipe: Path, outputs: tuple[str, ...], threads: int | None, as_json: bool) -> None:
    """Build the outputs of RECIPE (or only the named OUTPUTS)."""
    from sdrecipe.build import build as run_build
    from sdrecipe.build import default_threads, prepare

    prepared = prepare(recipe, outputs or None)
    show_progress = not as_json and sys.stderr.isatty()
    summary = run_build(
        prepared,
        threads or default_threads(),
        _progress_bar if show_progress else None,
    )
    if as_json:
        _emit_json({"outputs": [vars(o) for o in summary.outputs], "seconds": summary.seconds})
        return
    for output in summary.outputs:
        click.echo(f"built {output.name} -> {output.path} ({output.size / 1e6:,.1f} MB)")
        click.echo(f"  {_describe_counts(output.merged, output.passed_through, output.dropped)}")
    click.echo(f"done in {summary.seconds:.1f} s")


def _progress_bar(total: int) -> Callable[[int], None]:
    bar = click.progressbar(length=total, label="merging", file=sys.stderr, width=30)
    bar.__enter__()

    def advance(done: int) -> None:
        bar.update(done)
        if bar.pos >= bar.length:
            bar.__exit__(None, None, None)

    return advance


def _describe_counts(merged: int, passed: dict[str, int], dropped: int) -> str:
    total = merged + sum(passed.values())
    text = f"{total} keys: {merged} merged, {sum(passed.values())} passed through"
    if passed:
        text += " (" + ", ".join(f"{count} {reason}" for reason, count in passed.items()) + ")"
    if dropped:
        text += f"; {dropped} keys only in other models were dropped"
    return text


@main.command()
@click.argument("recipe", type=RECIPE)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report only.")
@_reports_errors
def validate(recipe: Path, as_json: bool) -> None:
    """Check RECIPE and its inputs' headers without building anything."""
    from sdrecipe.build import prepare

    prepared = prepare(recipe)
    report = {
        "recipe": str(recipe),
        "inputs": {name: str(i.path) for name, i in prepared.recipe.inputs.items()},
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
    click.echo(f"  nodes in order: {', '.join(prepared.graph.order)}")
    for name, info in report["outputs"].items():
        click.echo(
            f"  {name} -> {info['path']}: {info['keys']} keys, {info['bytes'] / 1e6:,.1f} MB"
        )
