"""Per-key context and parameter values: what a method sees of the tensor it computes.

A numeric method parameter may be a `PerKey` mapping. At plan time it is
resolved for each key, most specific first:

1. the first `re:REGEX` entry, in the order written, whose regex the key
   contains (`re.search`'s sense, matched by RE2: `sdrecipe.recipe.key_regex`);
2. the key's block: its ID, else the first range (`IN04-IN08`) or glob
   (`OUT*`) that covers it, in the order written (`sdrecipe.arch.blocks`);
3. the key's component (`unet`, `vae`, `text_encoder`, `text_encoder_2`,
   `ema`, `other`);
4. `default`.

Imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

from sdrecipe.arch import COMPONENTS, component_of
from sdrecipe.arch.block_presets import LBW_BLOCKS, LBW_FAMILY, LBW_PRESETS, PRESETS
from sdrecipe.arch.blocks import (
    block_ids,
    block_matches,
    block_of,
    is_block_label,
    is_reversed_range,
    listed_block_ids,
)
from sdrecipe.arch.family import BlockList, families
from sdrecipe.recipe.expr import Call, Expr, ExprTransformer, ParamValue, PerKey, walk
from sdrecipe.recipe.key_regex import key_regex

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


@lru_cache(maxsize=1 << 16)  # asked for every key of every node while planning
def key_context(key: str, family: str) -> KeyContext:
    """The context of `key` in a model of `family`."""
    return KeyContext(key, component_of(key, family), block_of(family, key), family)


def per_block(value: str | tuple[float | int, ...]) -> PerKey:
    """Block values as users paste them, as a mapping by block ID: a list or a
    comma-separated string of 26 (SD1/SD2, BASE first), 25 (SD1/SD2 without
    BASE, as the MBW extension writes) or 20 (SDXL) numbers, or a preset name.
    SDXL's VAE block takes the BASE value, as in supermerger. ValueError if none."""
    if isinstance(value, str):
        preset = PRESETS.get(value) or LBW_PRESETS.get(value)
        if preset:
            return _listed(preset, preset=value)
        parts = value.split(",")
        numbers = []
        for position, part in enumerate(parts, 1):
            try:
                numbers.append(float(part))
            except ValueError:
                if len(parts) == 1:
                    raise ValueError(
                        f"{value!r} is not a number, a list of block values or a preset "
                        f"({', '.join(sorted([*PRESETS, *LBW_PRESETS]))})"
                    ) from None
                raise ValueError(
                    f"value {position} of the {len(parts)} in the list, {part.strip()!r}, "
                    "is not a number"
                ) from None
        value = tuple(numbers)
    return _listed(value)


@cache
def _pasted_lists() -> dict[int, BlockList]:
    """The lists of block values the family files define, by length."""
    lists: dict[int, BlockList] = {}
    for data in families():
        for entry in data.blocks.lists if data.blocks else ():
            known_list = lists.setdefault(entry.length, entry)
            if known_list.ids != entry.ids:
                raise ValueError(f"two families define different {entry.length}-value lists")
    return lists


def _listed(value: tuple[float | int, ...], preset: str | None = None) -> PerKey:
    """The mapping by block ID of a list of block values (or of the preset
    named `preset`), which says what was written and which family it fits."""
    for position, number in enumerate(value, 1):
        if not math.isfinite(number):
            raise ValueError(f"value {position} of the {len(value)} in the list is {number}")
    pasted = _pasted_lists().get(len(value))
    ids = pasted.ids if pasted else LBW_BLOCKS.get(len(value))
    if ids is None:
        others = ", ".join(
            f"{length} for {entry.fits}"
            for length, entry in _pasted_lists().items()
            if length not in (26, 25, 20)
        )
        raise ValueError(
            f"a list of block values has 26 numbers for SD1/SD2 (BASE first), 25 without "
            f"BASE, or 20 for SDXL; {others}; or, as LoRA block weights, 17 (SD1/SD2) or 12 "
            f"(SDXL); got {len(value)}"
        )
    entries = list(zip(ids, value, strict=True))
    if len(value) in LBW_FAMILY:
        left_out = listed_block_ids(LBW_FAMILY[len(value)])
        entries += [(block, 0.0) for block in left_out if block not in ids]
        if LBW_FAMILY[len(value)] == "sdxl":
            entries.append(("VAE", value[0]))
        fits = "SDXL" if LBW_FAMILY[len(value)] == "sdxl" else "SD1/SD2"
    else:
        assert pasted is not None
        named = dict(entries)
        for block, source in pasted.unlisted.items():
            entries.append((block, named[source] if isinstance(source, str) else float(source)))
        fits = pasted.fits
    if preset:
        source = f"the preset {preset} ({len(value)} values, for {fits})"
    else:
        lbw = " (LoRA block weights)" if len(value) in LBW_FAMILY else ""
        source = f"a list of {len(value)} values, which fits {fits}{lbw}"
    return PerKey(tuple(entries), source)


def check_labels(value: PerKey) -> str | None:
    """Why `value`'s labels are unusable, or None: each is `default`, a component,
    a block label (ID, range or glob) or `re:` with a valid regex."""
    for label, _ in value.entries:
        if label == DEFAULT or label in COMPONENTS or is_block_label(label):
            continue
        if label.startswith(REGEX_PREFIX):
            try:
                key_regex(label.removeprefix(REGEX_PREFIX))
            except ValueError as exc:
                return str(exc)
            continue
        if is_reversed_range(label):
            first, _, last = label.partition("-")
            return (
                f"the range {label!r} is reversed: write {last}-{first} (ranges go in table order)"
            )
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
        if label.startswith(REGEX_PREFIX) and key_regex(label[len(REGEX_PREFIX) :]).search(
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
