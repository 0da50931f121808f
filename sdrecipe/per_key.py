"""Per-key context and parameter values: what a method sees of the tensor it computes.

A numeric method parameter may be a `PerKey` mapping. At plan time it is
resolved for each key, most specific first:

1. the first `re:REGEX` entry, in the order written, whose regex the key
   contains (`re.search`);
2. the key's block: its ID, else the first range (`IN04-IN08`) or glob
   (`OUT*`) that covers it, in the order written (`sdrecipe.arch.blocks`);
3. the key's component (`unet`, `vae`, `text_encoder`, `text_encoder_2`,
   `ema`, `other`);
4. `default`.

Imports no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from sdrecipe.arch import COMPONENTS, component_of
from sdrecipe.arch.block_presets import LBW_BLOCKS, LBW_FAMILY, LBW_PRESETS, PRESETS
from sdrecipe.arch.blocks import (
    block_ids,
    block_matches,
    block_of,
    is_block_label,
    listed_block_ids,
)
from sdrecipe.recipe.expr import Call, Expr, ExprTransformer, ParamValue, PerKey, walk

REGEX_PREFIX = "re:"
DEFAULT = "default"


@dataclass(frozen=True)
class KeyContext:
    """A tensor key with what is known about it: its component, its block in
    the family's block table (None where the family has none), and the family."""

    key: str
    component: str
    block: str | None = None
    family: str = "unknown"


def key_context(key: str, family: str) -> KeyContext:
    """The context of `key` in a model of `family`."""
    return KeyContext(key, component_of(key), block_of(family, key), family)


def per_block(value: str | tuple[float | int, ...]) -> PerKey:
    """Block values as users paste them, as a mapping by block ID: a list or a
    comma-separated string of 26 (SD1/SD2, BASE first), 25 (SD1/SD2 without
    BASE, as the MBW extension writes) or 20 (SDXL) numbers, or a preset name.
    SDXL's VAE block takes the BASE value, as in supermerger. ValueError if none."""
    if isinstance(value, str):
        preset = PRESETS.get(value) or LBW_PRESETS.get(value)
        if preset:
            return per_block(preset)
        try:
            numbers = tuple(float(part) for part in value.split(","))
        except ValueError:
            raise ValueError(
                f"{value!r} is not a number, a list of block values or a preset "
                f"({', '.join(sorted([*PRESETS, *LBW_PRESETS]))})"
            ) from None
        return per_block(numbers)
    lengths = {26: listed_block_ids("sd1"), 25: listed_block_ids("sd1")[1:]}
    lengths[20] = listed_block_ids("sdxl")
    ids = lengths.get(len(value)) or LBW_BLOCKS.get(len(value))
    if ids is None:
        raise ValueError(
            f"a list of block values has 26 numbers for SD1/SD2 (BASE first), 25 without "
            f"BASE, or 20 for SDXL; or, as LoRA block weights, 17 (SD1/SD2) or 12 (SDXL); "
            f"got {len(value)}"
        )
    entries = list(zip(ids, value, strict=True))
    if len(value) in LBW_FAMILY:
        left_out = listed_block_ids(LBW_FAMILY[len(value)])
        entries += [(block, 0.0) for block in left_out if block not in ids]
    if len(value) in (20, 12):
        entries.append(("VAE", value[0]))
    return PerKey(tuple(entries))


def check_labels(value: PerKey) -> str | None:
    """Why `value`'s labels are unusable, or None: each is `default`, a component,
    a block label (ID, range or glob) or `re:` with a valid regex."""
    for label, _ in value.entries:
        if label == DEFAULT or label in COMPONENTS or is_block_label(label):
            continue
        if label.startswith(REGEX_PREFIX):
            try:
                _compiled(label.removeprefix(REGEX_PREFIX))
            except re.error as exc:
                return f"{label!r} is not a valid regex ({exc})"
            continue
        return (
            f"{label!r} is not default, a component ({', '.join(COMPONENTS)}), a block "
            "(BASE, IN00, M00, OUT11, a range IN04-IN08 or a glob OUT*) or re:REGEX"
        )
    return None


def unknown_blocks(value: PerKey, family: str) -> list[str]:
    """The block labels of `value` that cover no block of `family`."""
    ids = block_ids(family)
    return [
        label
        for label, _ in value.entries
        if label != DEFAULT
        and label not in COMPONENTS
        and not label.startswith(REGEX_PREFIX)
        and not any(block_matches(label, block, family) for block in ids)
    ]


def resolve(value: PerKey, context: KeyContext) -> float | int:
    """The number `value` gives the key of `context` (see the module's precedence)."""
    entries = dict(value.entries)
    for label, number in value.entries:
        if label.startswith(REGEX_PREFIX) and _compiled(label[len(REGEX_PREFIX) :]).search(
            context.key
        ):
            return number
    block = context.block
    if block is not None:
        if block in entries:
            return entries[block]
        for label, number in value.entries:
            if block_matches(label, block, context.family):
                return number
    for label in (context.component, DEFAULT):
        if label in entries:
            return entries[label]
    raise KeyError(f"no value for {context.key} and no default")


class _Resolver(ExprTransformer):
    def __init__(self, context: KeyContext):
        self.context = context

    def params(self, call: Call) -> tuple[tuple[str, ParamValue], ...]:
        return tuple(
            (name, resolve(value, self.context) if isinstance(value, PerKey) else value)
            for name, value in call.params
        )


def for_key(expr: Expr, context: KeyContext) -> Expr:
    """`expr` with every per-key parameter replaced by its value for the key;
    the same object when it has none."""
    return _Resolver(context).visit(expr) if has_per_key(expr) else expr


@lru_cache(maxsize=4096)
def has_per_key(expr: Expr) -> bool:
    """True when a call in `expr` has a per-key parameter."""
    return any(
        isinstance(value, PerKey)
        for node in walk(expr)
        if isinstance(node, Call)
        for _, value in node.params
    )


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)
