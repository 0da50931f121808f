"""The validated, resolved recipe that the rest of sdrecipe works from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrecipe.recipe.expr import Expr


@dataclass(frozen=True)
class Input:
    """An input model file."""

    name: str
    path: Path
    sha256: str | None
    line: int | None


@dataclass(frozen=True)
class Node:
    """A named merge expression over inputs and other nodes.

    `cache` False keeps the node's values out of the cache: they are recomputed
    whenever a node that uses them is rebuilt. `force` True merges operands of
    different architectures, which is otherwise refused.
    """

    name: str
    expr: Expr
    line: int | None
    cache: bool = True
    force: bool = False


@dataclass(frozen=True)
class Output:
    """A node written to a file; `dtype` None keeps each base tensor's dtype."""

    node: str
    path: Path
    dtype: str | None
    line: int | None


@dataclass(frozen=True)
class Recipe:
    """A recipe whose names, expressions, methods and parameters are all valid."""

    path: Path
    text: str
    inputs: dict[str, Input]
    nodes: dict[str, Node]
    outputs: dict[str, Output]
