"""DARE's and DELLA's seeded drop masks: a PCG64 stream per key and model.

numpy's PCG64 gives the stream and its seeding; its `random_raw` took about
5 ns an output (a call through a pointer for each), most of a DARE-TIES
build. The outputs are computed here by a compiled loop instead, the same
numbers (`kernels.pcg64_fill`): four lanes, each four steps ahead of the
last, so that four 128-bit multiplications are in flight (1.5 ns an output),
and numpy's generator is then advanced past them.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

# PCG64's multiplier (numpy's, 128-bit), and four steps of it.
_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
_MODULUS = 1 << 128
_JUMP = pow(_MULTIPLIER, 4, _MODULUS)
# Fewer outputs than this are numpy's own: the lanes' setup is not worth it.
_COMPILED_OUTPUTS = 64


def _halves(value: int) -> tuple[int, int]:
    """A 128-bit number's high and low 64 bits."""
    return value >> 64, value & ((1 << 64) - 1)


class DropMask:
    """DARE's keep mask for one task vector of one key: each element is kept with
    probability 1 - `drop`, decided by its own 32-bit word of a PCG64 stream
    seeded by (seed, key, model index). The same bytes on every run, thread
    count and machine; another key, seed or model gets another mask."""

    def __init__(self, drop: float, seed: int, key: str, index: int):
        digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=16).digest()
        self.generator = np.random.PCG64(int.from_bytes(digest, "little"))
        # An element is kept when its word is at least this: P = 1 - drop.
        self.cutoff = min(round(drop * 2**32), 2**32 - 1)
        increment = self.generator.state["state"]["inc"]
        # Four steps at once: state * multiplier**4 + increment * (1 + m + m**2 + m**3).
        steps = sum(_MULTIPLIER**power for power in range(4))
        self._jump = np.array([*_halves(_JUMP), *_halves(increment * steps % _MODULUS)], np.uint64)

    def raw(self, count: int) -> np.ndarray:
        """The stream's next `count` 64-bit outputs, as numpy's `random_raw`."""
        if count < _COMPILED_OUTPUTS:
            return self.generator.random_raw(count)
        from sdrecipe.methods.kernels import pcg64_fill

        state = self.generator.state["state"]
        current, increment = state["state"], state["inc"]
        lanes = []
        for _ in range(4):
            current = (current * _MULTIPLIER + increment) % _MODULUS
            lanes.append(_halves(current))
        out = np.empty(count, np.uint64)
        pcg64_fill(np.array(lanes, np.uint64), self._jump, out)
        self.generator.advance(count)
        return out

    def words(self, count: int) -> np.ndarray:
        """The words of the next `count` elements (kept: a word >= `cutoff`)."""
        return self.raw((count + 1) // 2).astype("<u8", copy=False).view("<u4")[:count]

    def apply(self, delta: Tensor, scale: float) -> Tensor:
        """`delta` (the next elements) with the dropped ones zeroed and the kept
        ones times `scale`, in place."""
        from sdrecipe.methods.kernels import drop

        values = delta.numpy()
        drop(values, self.words(values.size), np.uint32(self.cutoff), values.dtype.type(scale))
        return delta
