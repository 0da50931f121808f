"""Model families as data: one YAML file per family in `sdrecipe/arch/families/`.

A family file says how the family is told from key names and shapes, its
variants, components and key prefixes, its block table, its diffusers folder
and its adapter naming. This module reads and checks those files; the modules
beside it (`detect`, `blocks`, `diffusers_names`, `diffusers_configs`,
`sdrecipe.adapters.naming`) apply them. A family may `extends:` another: the
fields it does not set are the other's. Imports no torch.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

UNKNOWN = "unknown"
# What a family that `extends:` another never takes from it.
NOT_INHERITED = ("aliases", "detect", "extends")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ShapeRule(_Strict):
    """The first key ending in `suffix` has `ndim` dimensions."""

    suffix: str
    ndim: int


class Signature(_Strict):
    """One way the family shows in a file: every condition holds, with the keys
    read under one of the prefixes in `within`."""

    priority: int
    within: tuple[str, ...] = ("",)
    has: tuple[str, ...] = ()
    lacks: tuple[str, ...] = ()
    has_prefix: tuple[str, ...] = ()
    lacks_prefix: tuple[str, ...] = ()
    first_with_suffix: ShapeRule | None = None


class Variants(_Strict):
    """Variants told from dim `dim` of `key` (under the model's prefix)."""

    key: str
    ndim: int
    dim: int
    values: dict[int, str]


class Kind(_Strict):
    """A release told from the keys present (Flux.1 dev has guidance_in), with
    its modelspec architecture where it differs from the family's."""

    name: str
    has: tuple[str, ...] = ()
    modelspec: str | None = None


class Component(_Strict):
    name: str
    prefix: str


class BlockRule(_Strict):
    """Keys `match` searches (RE2-compatible regex) are in `block`, a template
    whose `{0:02}` is the first group as a number."""

    match: str
    block: str


class BlockList(_Strict):
    """A pasted list of `length` values: the blocks it covers, in order, what
    it fits (in words) and what the blocks it leaves out take (another block's
    value, or a number)."""

    length: int
    ids: tuple[str, ...]
    fits: str
    unlisted: dict[str, str | float] = Field(default_factory=dict)


class Blocks(_Strict):
    ids: tuple[str, ...]
    rules: tuple[BlockRule, ...]
    default: str | None = None
    lists: tuple[BlockList, ...] = ()
    taken: str


class DiffusersComponent(_Strict):
    """Single-file keys under `prefix` live in `folder`, named by `naming` (a
    scheme of `diffusers_names`, or a table of the family's `tables`). With
    `bare_when_alone`, a file whose keys carry no prefix (Flux.1 as BFL ships
    it) is this component alone, and a folder holding only this component
    reads back without the prefix. `position_ids` (a CLIP text encoder): whether
    the single file stores CLIP's position ids, which diffusers folders leave
    out and reading recreates (LDM checkpoints do; ComfyUI's `text_encoders.` do not)."""

    prefix: str
    folder: str
    naming: str
    bare_when_alone: bool = False
    position_ids: bool = True


class TextEncoderClass(_Strict):
    model_class: str = Field(alias="class")
    activation: str
    heads: int
    tokenizer: str = "CLIPTokenizer"


class DiffusersRule(_Strict):
    """One line of a naming table: single-file names matching `from` are named
    `to` in the diffusers folder. A pattern ending in `.` is a prefix (the rest
    of the name, such as `weight`, follows unchanged), any other pattern a whole
    name; `{n}` stands for a block number. `kind` is `same`, `split` (the rows
    go to the names of `to`, in order, in the proportions `parts`, equal when
    not given) or `swap` (the two halves of the rows exchanged). A `last` rule
    applies only to the highest block number the file has, and is tried before
    the rules after it."""

    source: str = Field(alias="from")
    to: str | tuple[str, ...]
    kind: Literal["same", "split", "swap"] = "same"
    parts: tuple[int, ...] = ()
    last: bool = False


class Diffusers(_Strict):
    components: tuple[DiffusersComponent, ...]
    config: dict[str, Any]
    text_encoders: dict[str, TextEncoderClass] = Field(default_factory=dict)
    tables: dict[str, tuple[DiffusersRule, ...]] = Field(default_factory=dict)


class LoraOutput(_Strict):
    """What a LoRA extracted from the family says it is for (kohya's metadata)."""

    base_model_version: str
    modelspec: str
    network_module: str = "networks.lora"
    v2: bool = False


class ModuleName(_Strict):
    """A trainer's own name for a module (XLabs' `processor.qkv_lora1`): `name`
    patches rows `rows` = [start, stop, of total] of the single-file `module`
    (all of it when None), each written under every prefix of `prefixes`."""

    module: str
    name: str
    rows: tuple[int, int, int] | None = None
    prefixes: tuple[str, ...] = ("",)


class Adapters(_Strict):
    """How adapters name this family's modules: `patchable` when names are
    computed from the diffusers layout, kohya's text-encoder names, whether
    kohya's UNet names follow diffusers or single-file paths, what a LoRA
    extracted from it says it is for, and trainers' own names (`names`)."""

    patchable: bool = False
    kohya_text_encoders: dict[str, str] = Field(default_factory=dict)
    kohya_unet_paths: Literal["diffusers", "single_file"] = "diffusers"
    lora: LoraOutput | None = None
    names: tuple[ModuleName, ...] = ()


class Gguf(_Strict):
    """How ComfyUI-GGUF knows the family: its `general.architecture`, and the
    component a GGUF holds (its keys stored without the component's prefix)."""

    architecture: str
    component: str


class Family(_Strict):
    """Everything sdrecipe knows about one model family."""

    name: str
    title: str
    aliases: tuple[str, ...] = ()
    extends: str | None = None
    modelspec: str | None = None
    modelspec_v_prediction: str | None = None
    layout: str | None = None
    detect: tuple[Signature, ...]
    variants: Variants | None = None
    kinds: tuple[Kind, ...] = ()
    model_prefix: str | None = None
    components: tuple[Component, ...] = ()
    unprefixed: str = "other"
    keep_dims: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    blocks: Blocks | None = None
    diffusers: Diffusers | None = None
    adapters: Adapters = Adapters()
    gguf: Gguf | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", value) or value == UNKNOWN:
            raise ValueError(f"{value!r} is not a family name (lower case, digits, . and -)")
        return value

    def component_of(self, key: str) -> str:
        """The component `key` belongs to in this family."""
        return next(
            (c.name for c in self.components if c.prefix and key.startswith(c.prefix)),
            self.unprefixed,
        )


def _expand_ids(ids: list[str]) -> list[str]:
    """Ranges written `D00-D18` become their IDs; other entries stay."""
    expanded = []
    for entry in ids:
        match = re.fullmatch(r"([A-Z]+)(\d+)-([A-Z]+)(\d+)", entry)
        if match and match[1] == match[3]:
            width = len(match[2])
            expanded += [f"{match[1]}{n:0{width}}" for n in range(int(match[2]), int(match[4]) + 1)]
        else:
            expanded.append(entry)
    return expanded


def _read(name: str) -> dict[str, Any]:
    path = resources.files(__package__).joinpath("families", f"{name}.yaml")
    # libyaml's loader where PyYAML has it: every command reads every family file.
    data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(data, dict) or data.get("name") != name:
        raise ValueError(f"family file {name}.yaml must be a mapping with `name: {name}`")
    parent = data.get("extends")
    if parent is not None:
        inherited = {k: v for k, v in _read(parent).items() if k not in NOT_INHERITED}
        data = {**inherited, **data}
    return data


@cache
def family(name: str) -> Family:
    """The family called `name`; KeyError if there is none."""
    if name not in family_names():
        raise KeyError(name)
    data = _read(name)
    blocks = data.get("blocks")
    if blocks is not None:
        blocks = {
            **blocks,
            "ids": _expand_ids(blocks["ids"]),
            "lists": [{**entry, "ids": _expand_ids(entry["ids"])} for entry in blocks["lists"]],
        }
        data = {**data, "blocks": blocks}
    return Family.model_validate(data)


@cache
def family_names() -> tuple[str, ...]:
    """Every family with a file, in name order."""
    folder = resources.files(__package__).joinpath("families")
    return tuple(
        sorted(
            entry.name.removesuffix(".yaml")
            for entry in folder.iterdir()
            if entry.name.endswith(".yaml")
        )
    )


def families() -> tuple[Family, ...]:
    """Every family, in name order."""
    return tuple(family(name) for name in family_names())


def family_by_name(name: str) -> Family | None:
    """The family called `name` or one of its aliases (`flux` for `flux1`), or None."""
    data = known(name)
    return data or next((f for f in families() if name in f.aliases), None)


def known(name: str) -> Family | None:
    """The family called `name`, or None (for `unknown` and other names)."""
    return family(name) if name in family_names() else None


@cache
def signatures() -> tuple[tuple[Signature, str], ...]:
    """Every family's signatures with the family's name, in the order detection tries them."""
    found = [(signature, f.name) for f in families() for signature in f.detect]
    return tuple(sorted(found, key=lambda pair: (pair[0].priority, pair[1])))
