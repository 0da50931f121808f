"""A LoRA delta kept as its factors until it is added to a model.

`A + s·L` of a rank-r LoRA costs one matrix product per layer when it is
added into A's rows as `addmm` (`A + s·(up·down)`, one pass over the layer),
against five passes when the delta is first made whole, then scaled, then
added. The evaluator adds a `LowRankDelta` this way, scales it by scaling a
number, and makes it whole (`dense`) for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sdrecipe.io.finite import is_finite


@dataclass(frozen=True)
class Piece:
    """Rows `rows` of the delta are `up @ down` (up already scaled by alpha/r)."""

    rows: slice
    up: torch.Tensor
    down: torch.Tensor


@dataclass(frozen=True)
class LowRankDelta:
    """A delta of `shape` that is `scale` times the sum of its pieces' products
    (rows no piece covers are zero), computed in `dtype`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[Piece, ...]
    scale: float = 1.0

    def __getitem__(self, rows: slice) -> LowRankDelta:
        """The delta's rows `rows` (a slice of consecutive rows, as the executor takes)."""
        start, stop, _ = rows.indices(self.shape[0])
        pieces = []
        for piece in self.pieces:
            first, last = max(start, piece.rows.start), min(stop, piece.rows.stop)
            if first < last:
                up = piece.up[first - piece.rows.start : last - piece.rows.start]
                pieces.append(Piece(slice(first - start, last - start), up, piece.down))
        return replace(self, shape=(stop - start, *self.shape[1:]), pieces=tuple(pieces))

    def scaled(self, factor: float) -> LowRankDelta:
        """`factor` times the delta."""
        return replace(self, scale=self.scale * factor)

    def add_to(self, target: torch.Tensor) -> torch.Tensor:
        """`target + delta`, computed in `target` (a tensor of the delta's shape
        the caller owns)."""
        if not target.is_contiguous() or abs(self.scale) > torch.finfo(target.dtype).max:
            # addmm takes no such factor: the product, scaled (to infinities, which
            # the output's check then names).
            return target.add_(self.product(target.dtype).mul_(self.scale))
        flat = target.view(target.shape[0], -1)
        for piece in self.pieces:
            up, down = piece.up.to(target.dtype), piece.down.to(target.dtype)
            flat[piece.rows].addmm_(up, down, alpha=self.scale)
        return target

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The delta as a tensor."""
        return self.add_to(torch.zeros(self.shape, dtype=dtype or self.dtype))

    def product(self, dtype: torch.dtype) -> torch.Tensor:
        """The sum of the pieces' products, unscaled."""
        delta = torch.zeros(self.shape, dtype=dtype)
        flat = delta.view(delta.shape[0], -1)
        for piece in self.pieces:
            flat[piece.rows].addmm_(piece.up.to(dtype), piece.down.to(dtype))
        return delta

    def finite(self) -> bool:
        """True when every factor is finite (their products may still overflow)."""
        return all(is_finite(p.up) and is_finite(p.down) for p in self.pieces)
