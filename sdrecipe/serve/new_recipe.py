"""The web view's new-recipe form: `sdrecipe init`'s templates, questions,
checks and recipe text, with models picked from the folder's tree, answered
with the CLI's own error texts, and written only when asked, never over a file."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrecipe import api
from sdrecipe.arch.block_presets import PRESETS
from sdrecipe.arch.blocks import listed_block_ids
from sdrecipe.cli.init_wizard import (
    TEMPLATES,
    Detected,
    check_combination,
    detect_file,
    parameter_value,
    recipe_text,
)
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.serve.workspace import Workspace

RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\.ya?ml$")
DTYPES = ("", "float16", "bfloat16", "float32")


@dataclass
class Draft:
    """What the form's answers make: the recipe's text (None until every model
    is given and fits), what is wrong, the base model's family, and the
    validation's summary when the text is valid."""

    text: str | None = None
    errors: list[str] = field(default_factory=list)
    family: str | None = None
    valid: str | None = None


def templates() -> list[dict[str, Any]]:
    """The templates as the form offers them."""
    return [
        {
            "name": template.name,
            "description": template.description,
            "roles": [
                {"name": r.name, "field": r.flag, "question": r.question, "adapter": r.adapter}
                for r in template.roles
            ],
            "parameters": [
                {"field": p.flag, "question": p.question, "default": p.default}
                for p in template.parameters
            ],
        }
        for template in TEMPLATES.values()
    ]


def blocks(family: str | None, written: str = "") -> dict[str, Any]:
    """The family's blocks in list order, the presets that fit them (the
    26-value presets of SD1/SD2), and each block's value as `written` says
    (a preset's name or a list of numbers; else 0.5), for the sliders."""
    ids = list(listed_block_ids(family)) if family else []
    presets = {name: list(values) for name, values in PRESETS.items()} if len(ids) == 26 else {}
    values = presets.get(written.strip())
    if values is None:
        try:
            values = [float(part) for part in written.split(",")]
        except ValueError:
            values = []
    if len(values) != len(ids):
        values = [0.5] * len(ids)
    return {"family": family, "blocks": ids, "presets": presets, "values": values}


def recipe_path(workspace: Workspace, file: str) -> Path:
    """Where a new recipe named `file` goes: directly in the folder."""
    if not RECIPE_NAME.fullmatch(file or ""):
        raise RecipeError(
            f"recipe name {file!r}: a file name in the folder ending in .yaml "
            "(letters, digits, _ . -)"
        )
    return workspace.folder / file


def compose(workspace: Workspace, answers: Mapping[str, str]) -> Draft:
    """The recipe the answers make, checked as `sdrecipe init` checks it, then
    validated as `sdrecipe validate` would validate it once written."""
    draft = Draft()
    template = TEMPLATES.get(answers.get("template", ""))
    if template is None:
        draft.errors.append(f"template: choose one of {', '.join(TEMPLATES)}")
        return draft
    try:
        path = recipe_path(workspace, answers.get("file", ""))
    except RecipeError as exc:
        draft.errors.append(str(exc))
        path = workspace.folder / f"{template.name}.yaml"
    files: dict[str, Path] = {}
    found: dict[str, Detected] = {}
    for role in template.roles:
        chosen = answers.get(role.flag, "")
        if not chosen:
            draft.errors.append(f"missing --{role.flag}: {role.question}")
            continue
        try:
            files[role.name] = workspace.readable(chosen)
            found[role.name] = detect_file(files[role.name], role.adapter)
        except (SdrecipeError, OSError) as exc:
            draft.errors.append(f"--{role.flag}: {exc}")
    if template.roles[0].name in found:
        draft.family = found[template.roles[0].name].family
    values: dict[str, str] = {}
    for parameter in template.parameters:
        try:
            answer = answers.get(parameter.flag, "") or parameter.default
            values[parameter.flag] = parameter_value(parameter, answer)
        except RecipeError as exc:
            draft.errors.append(str(exc))
    dtype = answers.get("dtype", "")
    if dtype not in DTYPES:
        draft.errors.append(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES[1:])}")
    if len(found) < len(template.roles) or draft.errors:
        return draft
    try:
        check_combination(template, found)
    except RecipeError as exc:
        draft.errors.append(str(exc))
        return draft
    output = answers.get("output") or f"../build/{path.stem}.safetensors"
    output_path = Path(output) if Path(output).is_absolute() else workspace.folder / output
    draft.text = recipe_text(template, files, found, values, path, output_path, dtype or None)
    check(workspace, path, draft)
    return draft


def check(workspace: Workspace, path: Path, draft: Draft) -> None:
    """Validate the draft's text as the recipe at `path`: the CLI's errors
    (file, line and what is wrong), or a one-line summary."""
    if draft.text is None:
        return
    try:
        report = api.validate(path, workspace.options, text=draft.text)
    except SdrecipeError as exc:
        draft.errors.append(str(exc))
        return
    outputs = ", ".join(f"{name} ({o.keys} keys)" for name, o in report.outputs.items())
    draft.valid = f"valid: {', '.join(report.order)} -> {outputs}"
    # Another recipe of the folder writing the same file would make the folder invalid.
    recipe_set = workspace.snapshot.recipe_set
    written = {
        spec.path.resolve(): (other.path.name, name)
        for other in (recipe_set.recipes if recipe_set else ())
        if other.path.resolve() != path.resolve()
        for name, spec in other.outputs.items()
    }
    for name, output in report.outputs.items():
        if Path(output.path).resolve() in written:
            file, other = written[Path(output.path).resolve()]
            draft.errors.append(
                f"output {name!r} writes {output.path}, which output {other!r} of {file} "
                "writes too; choose another output path"
            )
    if path.exists():
        draft.errors.append(f"{path.name} exists; choose another name (a recipe is never replaced)")


def save(workspace: Workspace, file: str, text: str) -> Path:
    """Write a valid recipe as `file` in the folder, never over an existing
    file (even one that appears meanwhile): the text goes to a temporary file
    that is then linked to its name, which fails if the name is taken."""
    path = recipe_path(workspace, file)
    draft = Draft(text=text)
    check(workspace, path, draft)
    if draft.errors:
        raise RecipeError(draft.errors[0])
    # Not mkstemp: its 0600 would make the recipe unreadable to others; the umask applies.
    temporary = workspace.folder / f".new-{os.urandom(8).hex()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise RecipeError(
                f"{file} exists; choose another name (a recipe is never replaced)"
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return path
