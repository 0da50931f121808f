"""Sweeps: a recipe's `matrix:` expanded into one node and output per variant.

```yaml
matrix:
  alpha: [0.2, 0.4]
  strength: [0.5, 1.0]
  exclude: [{alpha: 0.2, strength: 1.0}]
  include: [{alpha: 0.8, strength: 0.5}]
nodes:
  mix: weighted_sum(A, B, alpha=${alpha})
  baked: mix + ${strength} * L
outputs:
  baked: out/baked-${alpha}-${strength}.safetensors
```

Combinations are the product of the variables' lists, less those matching an
`exclude` entry (on every variable it names), plus each `include` entry (it
names every variable). `${name}` is replaced in the text of nodes and outputs:
a value that is a whole YAML value (`alpha: ${alpha}`) keeps its type.

A node depends on the variables its own text names and those of the nodes it
uses; it has one variant per combination of those alone, named
`node__alpha_0_2`, so what variants share is one node, computed once. An
output has one variant per combination of its node's variables and those its
own text names; distinct variants must write distinct files.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdrecipe.recipe.expr import Expr, ExprTransformer, Ref, references

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A sweep larger than this is refused before it is expanded: each variant is an
# output file, and a few lines of YAML could otherwise ask for billions.
MAX_COMBINATIONS = 1_000
Value = float | int | str
Combination = dict[str, Value]


@dataclass(frozen=True)
class Matrix:
    """The variables in order, and the combinations to build."""

    variables: tuple[str, ...]
    combinations: tuple[Combination, ...]


def read_matrix(data: object) -> Matrix:
    """The matrix of a recipe's `matrix:` mapping; ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("matrix must be a mapping of variables to lists of values")
    lists = {name: values for name, values in data.items() if name not in ("include", "exclude")}
    if not lists:
        raise ValueError("matrix names no variable")
    for name, values in lists.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r} is not a valid variable name")
        if not isinstance(values, list) or not values:
            raise ValueError(f"matrix.{name} must be a non-empty list of values")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"matrix.{name}: {value!r} is not a number or a text")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"matrix.{name} lists a value twice")
    names = tuple(lists)
    count = math.prod(len(values) for values in lists.values())
    if count > MAX_COMBINATIONS:
        raise ValueError(f"the variables make {count:,} combinations; at most {MAX_COMBINATIONS:,}")
    combinations = [
        dict(zip(names, combo, strict=True)) for combo in itertools.product(*lists.values())
    ]
    for entry in _entries(data, "exclude", names, complete=False):
        combinations = [c for c in combinations if any(c[k] != v for k, v in entry.items())]
    for entry in _entries(data, "include", names, complete=True):
        if entry not in combinations:
            combinations.append(entry)
    if not combinations:
        raise ValueError("exclude removes every combination")
    return Matrix(names, tuple(combinations))


def _entries(data: dict, kind: str, names: tuple[str, ...], complete: bool) -> list[Combination]:
    entries = data.get(kind, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"matrix.{kind} must be a list of mappings")
    for entry in entries:
        unknown = set(entry) - set(names)
        if unknown:
            raise ValueError(f"matrix.{kind} names unknown variables {sorted(unknown)}")
        if complete and set(entry) != set(names):
            raise ValueError(f"matrix.{kind}: each entry gives every variable ({', '.join(names)})")
    return entries


def variables_in(value: object) -> set[str]:
    """The `${name}` variables that a YAML value's texts name."""
    if isinstance(value, str):
        return set(VARIABLE.findall(value))
    if isinstance(value, dict):
        return set().union(*(variables_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(variables_in(v) for v in value))
    return set()


def substitute(value: Any, combination: Mapping[str, Value]) -> Any:
    """`value` with each `${name}` of the matrix replaced (others, environment
    variables in paths, stay); a text that is only `${name}` becomes the value
    itself, so numbers stay numbers."""
    if isinstance(value, str):
        whole = VARIABLE.fullmatch(value)
        if whole and whole[1] in combination:
            return combination[whole[1]]
        return VARIABLE.sub(lambda m: str(combination.get(m[1], m[0])), value)
    if isinstance(value, dict):
        return {key: substitute(item, combination) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, combination) for item in value]
    return value


def variant_name(name: str, used: set[str], matrix: Matrix, combination: Combination) -> str:
    """`name` for the variant of `combination` over the variables `used`."""
    parts = [f"{var}_{_slug(combination[var])}" for var in matrix.variables if var in used]
    return f"{name}__{'_'.join(parts)}" if parts else name


def _slug(value: Value) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", str(value))


def node_variables(
    own: Mapping[str, set[str]], expressions: Mapping[str, Expr]
) -> Callable[[str], set[str]]:
    """The variables each node depends on: its own and those of the nodes it uses."""
    found: dict[str, set[str]] = {}

    def used(name: str) -> set[str]:
        if name not in found:
            found[name] = set(own.get(name, set()))
            for ref in references(expressions[name]):
                if ref in expressions:
                    found[name] |= used(ref)
        return found[name]

    return used


class Renamer(ExprTransformer):
    """Replaces references by the names in `names` (others stay)."""

    def __init__(self, names: Mapping[str, str]):
        self.names = names

    def visit_ref(self, expr: Ref) -> Expr:
        return Ref(self.names.get(expr.name, expr.name))
