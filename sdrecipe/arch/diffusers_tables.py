"""Naming tables: single-file ↔ diffusers names as data.

A family file's `diffusers:` section may name a component by a table of its
`tables` (see `sdrecipe.arch.family.DiffusersRule`): each line maps a
single-file pattern to one diffusers name, to several (rows split, as a fused
q/k/v projection becomes `to_q`, `to_k`, `to_v`) or to one with the two halves
of its rows exchanged (diffusers' `AdaLayerNormContinuous` takes scale before
shift). This module reads such a table in both directions; it names things
only, and `Mapped.kind` says which tensor operation a name needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

from sdrecipe.arch.family import DiffusersRule, family

BLOCK = "{n}"


@dataclass(frozen=True)
class Mapped:
    """What a name is on the other side: `names` (a split's parts in order,
    from single-file names; the one single-file name, from a diffusers name),
    `kind` (`same`, `split` or `swap`), a split's proportions, and for a
    diffusers name that is one part of a split, which part."""

    names: tuple[str, ...]
    kind: str = "same"
    parts: tuple[int, ...] = ()
    index: int = 0


class _Pattern:
    """One side of a rule: a whole name, or a prefix when it ends in `.`."""

    def __init__(self, text: str):
        self.text = text
        self.prefix = text.endswith(".")
        body = re.escape(text).replace(re.escape(BLOCK), r"(?P<n>\d+)")
        self.regex = re.compile(f"^{body}(?P<rest>.+)$" if self.prefix else f"^{body}$")
        head = text.split(BLOCK)[0]
        self.block = re.compile("^" + re.escape(head) + r"(\d+)\.") if BLOCK in text else None

    def match(self, name: str) -> tuple[str | None, str] | None:
        """(block number or None, the rest of a prefix match) or None."""
        found = self.regex.match(name)
        if found is None:
            return None
        groups = found.groupdict()
        return groups.get("n"), groups.get("rest") or ""

    def format(self, number: str | None, rest: str) -> str:
        text = self.text if number is None else self.text.replace(BLOCK, number)
        return text + rest


class _Rule:
    def __init__(self, rule: DiffusersRule):
        targets = (rule.to,) if isinstance(rule.to, str) else tuple(rule.to)
        self.source = _Pattern(rule.source)
        self.targets = tuple(_Pattern(target) for target in targets)
        self.kind = rule.kind
        self.last = rule.last
        if rule.kind == "split":
            self.parts = rule.parts or (1,) * len(targets)
            if len(targets) < 2 or len(self.parts) != len(targets):
                raise ValueError(f"{rule.source}: a split needs two names or more, one part each")
        else:
            self.parts = ()
            if len(targets) != 1 or rule.parts:
                raise ValueError(f"{rule.source}: a {rule.kind} rule names one tensor")
        if any(target.prefix != self.source.prefix for target in self.targets):
            raise ValueError(f"{rule.source}: both sides must be prefixes, or both whole names")
        for pattern in (self.source, *self.targets):
            if (BLOCK in pattern.text) != (BLOCK in rule.source):
                raise ValueError(f"{rule.source}: {BLOCK} must be on both sides or neither")
        if rule.last and self.source.block is None:
            raise ValueError(f"{rule.source}: a `last` rule needs a block number {BLOCK}")


class UnknownLastBlock(ValueError):
    """A rule for a file's last block matched, but the file's keys were not given."""


class Table:
    """A naming table, read in both directions."""

    def __init__(self, rules: Iterable[DiffusersRule]):
        self.rules = tuple(_Rule(rule) for rule in rules)

    def last_blocks(self, names: Iterable[str], diffusers: bool = False) -> dict[int, str]:
        """For each `last` rule (by index), the highest block number among
        `names`, single-file names or, with `diffusers`, diffusers names."""
        names = list(names)
        found = {}
        for index, rule in enumerate(self.rules):
            pattern = rule.targets[0] if diffusers else rule.source
            if not rule.last or pattern.block is None:
                continue
            numbers = [int(match[1]) for name in names if (match := pattern.block.match(name))]
            if numbers:
                found[index] = str(max(numbers))
        return found

    def to_diffusers(self, name: str, last: Mapping[int, str] | None) -> Mapped:
        """A single-file name (without prefix) → its diffusers name(s); KeyError
        if no rule names it. `last` comes from `last_blocks` of the file's names."""
        for index, rule in enumerate(self.rules):
            match = rule.source.match(name)
            if match is None:
                continue
            number, rest = match
            if rule.last and not _is_last(last, index, number, name):
                continue
            names = tuple(target.format(number, rest) for target in rule.targets)
            return Mapped(names, rule.kind, rule.parts)
        raise KeyError(name)

    def from_diffusers(self, name: str, last: Mapping[int, str] | None) -> Mapped:
        """A diffusers name → its single-file name, with the part it is of a
        split; KeyError if no rule names it. `last` from `last_blocks(..., diffusers=True)`."""
        for index, rule in enumerate(self.rules):
            for part, target in enumerate(rule.targets):
                match = target.match(name)
                if match is None:
                    continue
                number, rest = match
                if rule.last and not _is_last(last, index, number, name):
                    break
                return Mapped((rule.source.format(number, rest),), rule.kind, rule.parts, part)
        raise KeyError(name)


def _is_last(last: Mapping[int, str] | None, index: int, number: str | None, name: str) -> bool:
    if last is None:
        raise UnknownLastBlock(f"naming {name} needs every key of its file (is it the last block?)")
    return last.get(index) == number


@cache
def table(family_name: str, name: str) -> Table:
    """The table `name` of a family's diffusers section; KeyError if there is none."""
    data = family(family_name).diffusers
    if data is None:
        raise KeyError(name)
    return Table(data.tables[name])


def has_table(family_name: str, name: str) -> bool:
    """Whether `name` is a table of the family (rather than a built-in scheme)."""
    data = family(family_name).diffusers
    return data is not None and name in data.tables
