"""Per-key context and parameter values: what a method sees of the tensor it computes.

A numeric method parameter may be a `PerKey` mapping. At plan time it is
resolved for each key, most specific first:

1. the first `re:REGEX` entry, in the order written, whose regex the key
   contains (`re.search`);
2. the key's block (block tables per family are data; see `block_of`);
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
from sdrecipe.recipe.expr import Call, Expr, ExprTransformer, ParamValue, PerKey, walk

REGEX_PREFIX = "re:"
DEFAULT = "default"


@dataclass(frozen=True)
class KeyContext:
    """A tensor key with what is known about it: its component, and its block
    in the family's block table (None where the family has none)."""

    key: str
    component: str
    block: str | None = None


def key_context(key: str, family: str) -> KeyContext:
    """The context of `key` in a model of `family`."""
    return KeyContext(key, component_of(key), block_of(family, key))


def block_of(family: str, key: str) -> str | None:
    """The block ID of `key` in `family`'s block table. No family has a table
    yet (block weights bring them, as data), so this is None for now."""
    return None


def check_labels(value: PerKey) -> str | None:
    """Why `value`'s labels are unusable, or None: each is `default`, a component
    or `re:` with a valid regex."""
    for label, _ in value.entries:
        if label == DEFAULT or label in COMPONENTS:
            continue
        if label.startswith(REGEX_PREFIX):
            try:
                _compiled(label.removeprefix(REGEX_PREFIX))
            except re.error as exc:
                return f"{label!r} is not a valid regex ({exc})"
            continue
        return (
            f"{label!r} is not default, a component ({', '.join(COMPONENTS)}) or re:REGEX "
            "(block IDs need block tables, which no family has yet)"
        )
    return None


def resolve(value: PerKey, context: KeyContext) -> float | int:
    """The number `value` gives the key of `context` (see the module's precedence)."""
    entries = dict(value.entries)
    for label, number in value.entries:
        if label.startswith(REGEX_PREFIX) and _compiled(label[len(REGEX_PREFIX) :]).search(
            context.key
        ):
            return number
    for label in (context.block, context.component, DEFAULT):
        if label is not None and label in entries:
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
