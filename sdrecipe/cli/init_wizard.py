"""`sdrecipe init`: a guided start that writes a commented recipe from a template.

Each template names the models it takes (their roles, each with its own
command-line flag) and its parameters. Every model file is checked and its
family and variant detected; combinations that cannot work are refused before
anything is written. The recipe is then validated like any other.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import write_text_atomically

NORMAL = "normal"


@dataclass(frozen=True)
class Role:
    """A model a template takes: its recipe name, flag, question, and the variant
    it must be (None: any; only the base, A, may be other than NORMAL)."""

    name: str
    flag: str
    question: str
    variant: str | None = NORMAL
    adapter: bool = False


@dataclass(frozen=True)
class Parameter:
    """A template parameter: its flag, question, default and type."""

    flag: str
    question: str
    default: str
    kind: type = float


def parameter_value(parameter: Parameter, answer: object) -> str:
    """The answer as the parameter's type, written back as text; RecipeError
    (naming the flag) if it is not of that type."""
    try:
        return str(parameter.kind(answer))
    except ValueError:
        raise RecipeError(
            f"--{parameter.flag}: {answer!r} is not a valid {parameter.kind.__name__}"
        ) from None


@dataclass(frozen=True)
class Template:
    """What to make: the models, the parameters, the node and a comment."""

    name: str
    description: str
    roles: tuple[Role, ...]
    node: str
    parameters: tuple[Parameter, ...] = ()


FINETUNE = Role("B", "finetune", "Your fine-tune")
BASE_OF_B = Role("C", "base", "The base model your fine-tune was trained from")
ALPHA_HALF = Parameter("alpha", "alpha, the weight of the second model (0..1)", "0.5")
TEMPLATES = {
    template.name: template
    for template in (
        Template(
            "inpaint",
            "inpainting transplant: your fine-tune with the inpainting model's extra "
            "channels, A + (B - C)",
            (
                Role("A", "inpainting", "The official inpainting model", "inpainting"),
                FINETUNE,
                BASE_OF_B,
            ),
            "A + (B - C)",
        ),
        Template(
            "pix2pix",
            "instruct-pix2pix transplant, A + (B - C)",
            (
                Role("A", "pix2pix", "The instruct-pix2pix model", "instruct-pix2pix"),
                FINETUNE,
                BASE_OF_B,
            ),
            "A + (B - C)",
        ),
        Template(
            "flux-fill",
            "Flux Fill transplant: your Flux.1 fine-tune with Fill's conditioning "
            "columns, A + (B - C)",
            (
                Role("A", "fill", "The official FLUX.1 Fill [dev] model", "fill"),
                FINETUNE,
                BASE_OF_B,
            ),
            "A + (B - C)",
        ),
        Template(
            "weighted",
            "weighted blend of two models, (1 - alpha) A + alpha B",
            (Role("A", "base", "The first model", None), Role("B", "other", "The second model")),
            "weighted_sum(A, B, alpha={alpha})",
            (ALPHA_HALF,),
        ),
        Template(
            "add-difference",
            "add what a fine-tune learned to another model, A + alpha (B - C)",
            (Role("A", "target", "The model to add to", None), FINETUNE, BASE_OF_B),
            "add_difference(A, B, C, alpha={alpha})",
            (Parameter("alpha", "alpha, the strength of the difference", "1.0"),),
        ),
        Template(
            "block",
            "block-weighted blend: one alpha per block (a preset or pasted values)",
            (Role("A", "base", "The first model", None), Role("B", "other", "The second model")),
            '{{method: weighted_sum, models: [A, B], alpha: "{blocks}"}}',
            (
                Parameter(
                    "blocks",
                    "Block weights: a preset (GRAD_V, FLAT_25, ...) or 26 / 20 / 61 / 28 / 42 "
                    "numbers",
                    "GRAD_V",
                    str,
                ),
            ),
        ),
        Template(
            "lora",
            "bake a LoRA / LyCORIS into a checkpoint, A + strength L",
            (
                Role("A", "base", "The checkpoint to bake into", None),
                Role("L", "lora", "The LoRA or LyCORIS file", None, adapter=True),
            ),
            "A + {strength} * L",
            (Parameter("strength", "strength", "0.8"),),
        ),
    )
}


@dataclass(frozen=True)
class Detected:
    """What a model file is: its family and variant (variant None for an adapter)."""

    family: str
    variant: str | None

    def describe(self) -> str:
        return self.family if self.variant is None else f"{self.family} {self.variant}"


def detect_file(path: Path, adapter: bool) -> Detected:
    """Read `path`'s header and say what it is; RecipeError if it is not what
    the role takes (a model where an adapter is wanted, or the reverse)."""
    from sdrecipe.io.adapter_files import is_adapter_path

    is_adapter = is_adapter_path(path)
    if adapter != is_adapter:
        wanted = "a LoRA / LyCORIS file" if adapter else "a model"
        raise RecipeError(f"{path} is not {wanted}")
    if is_adapter:
        from sdrecipe.io.adapter_reader import guess_family
        from sdrecipe.io.readers import open_adapter

        return Detected(guess_family(open_adapter(path)), None)
    from sdrecipe.arch.detect import detect
    from sdrecipe.io.readers import open_model

    reader = open_model(path)
    architecture = detect(reader.infos(), reader.metadata)
    return Detected(architecture.family, architecture.variant)


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def check_combination(template: Template, found: Mapping[str, Detected]) -> None:
    """Refuse models that cannot work together: an inpainting or pix2pix model
    anywhere but as the base (A), a base of the wrong variant, or models of
    different families."""
    base, *others = template.roles
    base_variant = found[base.name].variant
    for role in others:
        variant = found[role.name].variant
        if not role.adapter and variant not in (NORMAL, base_variant):
            raise RecipeError(
                f"{role.name} (--{role.flag}) is {_a(variant)} {variant} model; the {variant} "
                f"model must be the base, A (--{base.flag})"
            )
    if base.variant is not None and base_variant != base.variant:
        raise RecipeError(
            f"A (--{base.flag}) is {found[base.name].describe()}, not "
            f"{_a(base.variant)} {base.variant} model"
        )
    families = {role.name: found[role.name].family for role in template.roles}
    if len(set(families.values())) > 1:
        listed = ", ".join(f"{name} is {family}" for name, family in families.items())
        raise RecipeError(f"the models are of different families ({listed}); they cannot merge")


def yaml_string(text: str) -> str:
    """`text` as a YAML scalar that reads back as exactly `text`: as it is where
    YAML reads it so, else quoted (a `#`, `: `, quotes, a line break)."""
    try:
        plain = "\n" not in text and yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def recipe_text(
    template: Template,
    files: Mapping[str, Path],
    found: Mapping[str, Detected],
    values: Mapping[str, str],
    recipe_path: Path,
    output_path: Path,
    dtype: str | None,
) -> str:
    """The commented recipe, with paths relative to the recipe's folder where
    they share more than the root with it, else absolute."""
    folder = recipe_path.parent.resolve()

    def relative(path: Path) -> str:
        path = path.resolve()
        shared = Path(os.path.commonpath([path, folder]))
        return str(path) if shared == Path(shared.anchor) else os.path.relpath(path, folder)

    lines = [
        f"# {template.description}",
        f"# Written by `sdrecipe init --template {template.name}`; build it with",
        f"#   sdrecipe build {yaml_string(str(recipe_path))}",
        "inputs:",
    ]
    for role in template.roles:
        lines.append(f"  {role.name}: {yaml_string(relative(files[role.name]))}")
        lines.append(f"  # {role.question}: {found[role.name].describe()}")
    node = template.node.format(**values)
    lines += ["nodes:", f"  merged: {node if node.startswith('{') else json.dumps(node)}"]
    lines += ["outputs:", "  merged:", f"    path: {yaml_string(relative(output_path))}"]
    if dtype:
        lines.append(f"    dtype: {dtype}")
    return "\n".join(lines) + "\n"


ROLE_FLAGS = tuple(dict.fromkeys(r.flag for t in TEMPLATES.values() for r in t.roles))
PARAMETER_FLAGS = tuple(dict.fromkeys(p.flag for t in TEMPLATES.values() for p in t.parameters))


def run_init(
    answers: dict[str, object],
    say: Callable[[str], None],
    validate: Callable[[Path], str],
) -> Path:
    """Ask for what `answers` (flag -> value) lacks, when a terminal is attached;
    check the models, write the recipe, and validate it (`validate` returns a
    one-line description, or raises). Returns the recipe's path."""
    interactive = sys.stdin is not None and sys.stdin.isatty()  # None: fd 0 closed

    def ask(flag: str, question: str, default: object = None, kind: object = None) -> object:
        """The answer given by flag, else asked at the terminal, else the default."""
        if answers.get(flag) is None:
            if interactive:
                answers[flag] = click.prompt(question, default=default, type=kind)
            elif default is None:
                raise click.UsageError(f"missing --{flag} (or run in a terminal to be asked)")
            else:
                answers[flag] = default
        return answers[flag]

    if answers.get("template") is None and interactive:
        say("What do you want to make?")
        for name, template in TEMPLATES.items():
            say(f"  {name:15} {template.description}")
    choice = click.Choice(list(TEMPLATES))
    template = TEMPLATES[
        str(ask("template", "Template", "inpaint" if interactive else None, choice))
    ]
    files: dict[str, Path] = {}
    found: dict[str, Detected] = {}
    for role in template.roles:
        while role.name not in found:
            path = Path(str(ask(role.flag, role.question, kind=click.Path(exists=True))))
            try:
                found[role.name] = detect_file(path, role.adapter)
            except RecipeError as exc:
                if not interactive:
                    raise RecipeError(f"--{role.flag}: {exc}") from None
                say(f"  {exc}")
                answers[role.flag] = None
                continue
            files[role.name] = path
            say(f"  {role.name} = {path.name}: {found[role.name].describe()}")
    check_combination(template, found)
    values = {
        p.flag: parameter_value(p, ask(p.flag, p.question, p.default, p.kind))
        for p in template.parameters
    }
    recipe = Path(str(ask("out", "Write the recipe to", f"recipes/{template.name}.yaml")))
    if recipe.exists():
        raise RecipeError(f"{recipe} exists; choose another --out (init never replaces a file)")
    default_model = f"build/{recipe.stem}.safetensors"
    output = Path(str(ask("output-model", "Write the merged model to", default_model)))
    dtype = answers.get("dtype")
    text = recipe_text(
        template, files, found, values, recipe, output, str(dtype) if dtype else None
    )
    recipe.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(recipe, text)
    try:
        say(validate(recipe))
    except RecipeError as exc:
        recipe.unlink(missing_ok=True)
        # The recipe is gone: the message must not send the reader to a line of it.
        elsewhere = exc.file is not None and Path(exc.file) != recipe
        raise RecipeError(
            f"the recipe for these answers is invalid, so {recipe} was not kept: "
            f"{exc if elsewhere else exc.message}"
        ) from None
    except BaseException:
        recipe.unlink(missing_ok=True)
        raise
    return recipe
