"""Commands that write a recipe: `init` asks for one; `bake` and `extract` are
one-shot merges that write theirs beside the output and build it, so the merge
can be rebuilt, changed and kept in git."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sdrecipe import api
from sdrecipe.cli.build import run_build
from sdrecipe.cli.common import RECIPE, build_options, cache_dir_option, reports_errors, say
from sdrecipe.engine.options import Options

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


@click.command()
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
@build_options()
@reports_errors
def bake(
    base: Path,
    adapters: tuple[str, ...],
    output: Path,
    dtype: str | None,
    allow_unmatched: bool,
    recipe_path: Path | None,
    options: Options,
    as_json: bool,
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
        run_build((str(recipe),), options, as_json)


@click.command()
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
@build_options()
@reports_errors
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
    options: Options,
    as_json: bool,
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
        run_build((str(recipe),), options, as_json)


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


@click.command()
@_init_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="The recipe to write.")
@click.option(
    "--output-model",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the recipe builds the merged model.",
)
@click.option("--dtype", type=click.Choice(_MODEL_DTYPES))
@cache_dir_option
@reports_errors
def init(cache_dir: Path, **answers: Any) -> None:
    """Write a commented recipe, asking what to make and for the model files
    (each checked, its family and variant shown) and the parameters. Every
    question has a flag, so scripts can run it without a terminal."""
    from sdrecipe.cli.init_wizard import run_init

    def validate(recipe: Path) -> str:
        output = next(iter(api.validate(recipe, Options(cache_dir=cache_dir)).outputs.values()))
        return (
            f"wrote {recipe}: valid. Build it with `sdrecipe build {recipe}` (writes {output.path})"
        )

    run_init({key.replace("_", "-"): value for key, value in answers.items()}, say, validate)
