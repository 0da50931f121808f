"""The checks that an adapter module's factors fit together, from their shapes
alone (the file's header), before any data is read. Imports no torch."""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from typing import NoReturn


class AdapterError(ValueError):
    """An adapter file that cannot be applied as it is."""


class FactorShapes:
    """One module's factor shapes, and the checks that they fit together."""

    def __init__(self, stem: str, shapes: Mapping[str, tuple[int, ...]]):
        self.stem = stem
        self.shapes = shapes

    def fail(self, text: str) -> NoReturn:
        raise AdapterError(f"module {self.stem}: {text}")

    def check_sizes(self) -> None:
        """No empty factor; one number as alpha."""
        for parameter, shape in self.shapes.items():
            if parameter == "alpha" and prod(shape) != 1:
                self.fail(f"alpha has shape {list(shape)}; it must be one number")
            if parameter != "alpha" and 0 in shape:
                self.fail(f"{parameter} has shape {list(shape)}, which holds nothing (rank 0?)")

    def shape(self, parameter: str, dims: int, exact: bool = False) -> tuple[int, ...]:
        """The shape of `parameter`, which must have `dims` dimensions (or more unless `exact`)."""
        shape = self.shapes[parameter]
        if len(shape) < dims or (exact and len(shape) != dims):
            needed = f"{dims}" if exact else f"{dims} or more"
            self.fail(f"{parameter} has shape {list(shape)}; it needs {needed} dimensions")
        return shape

    def agree(self, first: str, first_size: object, second: str, second_size: object) -> None:
        """`first` and `second` must give the same size (of the rank, a side, a kernel)."""
        if first_size != second_size:
            self.fail(
                f"{first} (shape {list(self.shapes[first])}) and {second} (shape "
                f"{list(self.shapes[second])}) do not fit together: {first_size} against "
                f"{second_size}"
            )

    def bounded(self, parameter: str, rank: int, rows: int, columns: int) -> None:
        """A rank above rows + columns of the delta is refused before any data is read."""
        if rank > rows + columns:
            self.fail(
                f"{parameter} (shape {list(self.shapes[parameter])}) declares rank {rank} for "
                f"a {rows}x{columns} delta; sdrecipe refuses a rank above its rows plus its "
                f"columns ({rows + columns}; rank {min(rows, columns)} is already full)"
            )
