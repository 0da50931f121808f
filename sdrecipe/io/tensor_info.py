"""What a reader knows about a tensor before reading its data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: the no-op build path uses this module
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return self.numel * self.dtype.itemsize

    @property
    def is_floating(self) -> bool:
        """True for floating-point dtypes, the only ones that merge."""
        return self.dtype.is_floating_point
