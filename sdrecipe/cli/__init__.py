"""The `sdrecipe` command line: parse arguments, call `sdrecipe.api`, render
its reports and events. Each module holds one group of commands.

torch is imported only by commands that touch tensors, so `--help` and an
up-to-date `build` return at once.
"""

from __future__ import annotations

import click

from sdrecipe import __version__
from sdrecipe.cli import build, cache, models, one_shot, serve, views
from sdrecipe.cli.common import Commands


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdrecipe")
def main() -> None:
    """Declarative, streaming, reproducible Stable Diffusion checkpoint merges."""


for command in (
    build.build,
    build.plan,
    build.status,
    build.verify,
    build.validate,
    one_shot.init,
    one_shot.bake,
    one_shot.extract,
    views.graph,
    views.diff,
    views.lineage,
    models.inspect,
    models.methods,
    models.blocks,
    cache.cache,
    serve.serve,
):
    main.add_command(command)
