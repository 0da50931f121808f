"""Block tables for block-weighted merging (MBW), read from the family files.

Each family file's `blocks:` lists the IDs in the order users paste lists in
(supermerger's: `BASE`, `IN00`..`IN11`, `M00`, `OUT00`..`OUT11` for SD1/SD2;
`CLIP`, `T5`, `IN`, `D00`..`D18`, `S00`..`S37`, `OUT` for Flux.1, ...) and
the rules that put a key in a block: regexes tried in order, the first that
finds a match wins, else the family's default block. A family without a
table (the SDXL refiner: no tool defines one) has no blocks. Imports no torch.
"""

from __future__ import annotations

import fnmatch
import re
from functools import cache, lru_cache

from sdrecipe.arch.family import Blocks, families, known

BASE = "BASE"


def _table(family: str) -> Blocks | None:
    data = known(family)
    return data.blocks if data is not None else None


def block_ids(family: str) -> tuple[str, ...]:
    """The family's block IDs in table order; empty when it has none."""
    table = _table(family)
    return table.ids if table is not None else ()


def listed_block_ids(family: str) -> tuple[str, ...]:
    """The IDs the family's longest pasted list covers, in order (SDXL's VAE is not listed)."""
    table = _table(family)
    if table is None or not table.lists:
        return ()
    return max(table.lists, key=lambda entry: entry.length).ids


def block_values_taken(family: str) -> str:
    """What a list of block values for `family` may be, in words."""
    table = _table(family)
    return table.taken if table is not None else "no list: it has no block table"


@lru_cache(maxsize=1 << 16)
def block_of(family: str, key: str) -> str | None:
    """The block of `key` in `family`, or None for a family without a table
    (or a key no rule places, where the family has no default)."""
    table = _table(family)
    if table is None:
        return None
    for rule in table.rules:
        match = _pattern(rule.match).search(key)
        if match is not None:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            return rule.block.format(*groups)
    return table.default


@cache
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


@cache
def _all_tables() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((f.name, f.blocks.ids) for f in families() if f.blocks is not None)


def is_block_label(label: str) -> bool:
    """True for a label that names blocks of some family: an ID, a range
    (`IN04-IN08`) or a glob (`OUT*`)."""
    return any(
        block_matches(label, block, family) for family, ids in _all_tables() for block in ids
    )


def is_reversed_range(label: str) -> bool:
    """True for a range whose ends are in the wrong order (`IN08-IN04`)."""
    first, dash, last = label.partition("-")
    return bool(dash) and any(
        first in ids and last in ids and ids.index(first) > ids.index(last)
        for _, ids in _all_tables()
    )


def block_matches(label: str, block: str, family: str) -> bool:
    """True when `label` (an ID, a range `IN04-IN08` in table order, or a glob)
    covers `block` of `family`."""
    if label == block:
        return True
    ids = block_ids(family)
    if "-" in label:
        first, _, last = label.partition("-")
        if first in ids and last in ids and block in ids:
            return ids.index(first) <= ids.index(block) <= ids.index(last)
        return False
    return any(mark in label for mark in "*?[") and fnmatch.fnmatchcase(block, label)
