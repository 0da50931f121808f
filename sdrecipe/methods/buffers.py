"""Result tensors of whole-tensor methods, in memory that earlier results used.

A whole-tensor method returns one key's result, tens of megabytes of float32
at a time. A fresh allocation that large is mapped anew, and each of its
4 KiB pages faults and is zeroed by the kernel as it is first written: about
1.5 ns an element, as much as TIES' whole merge loop (transparent huge pages
were slower still: the kernel compacts memory for them). So a result's memory
goes back to a small pool when the last tensor on it is gone, and the next
result of that dtype takes it, already mapped.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# Smaller results come from the allocator's own reused memory.
POOLED_ELEMENTS = 1 << 20
# Spare buffers kept at most: one for each of the usual two workers.
SPARES = 2

_lock = threading.Lock()
_spares: list[np.ndarray] = []


def result_tensor(
    numel: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor:
    """An uninitialised flat tensor of `numel` elements of `dtype` (float32 or
    float64) on `device` (default the CPU), in a spare buffer when one is large
    enough: only CPU buffers are pooled, a device's own allocator caches its memory."""
    import torch

    if device is not None and torch.device(device).type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    if numel < POOLED_ELEMENTS or dtype not in (torch.float32, torch.float64):
        return torch.empty(numel, dtype=dtype, device="cpu")
    wanted = torch.empty(0, dtype=dtype, device="cpu").numpy().dtype
    with _lock:
        fitting = [i for i, s in enumerate(_spares) if s.dtype == wanted and s.size >= numel]
        # By position: arrays compare element-wise, so list.remove cannot find one.
        chosen = min(fitting, key=lambda i: _spares[i].size) if fitting else None
        buffer = _spares.pop(chosen) if chosen is not None else None
    if buffer is None:
        buffer = torch.empty(numel, dtype=dtype, device="cpu").numpy()
    view = buffer[:numel]
    weakref.finalize(view, _release, buffer)
    return torch.from_numpy(view)


def _release(buffer: np.ndarray) -> None:
    """Keep `buffer` as a spare, the largest `SPARES` at most."""
    with _lock:
        _spares.append(buffer)
        _spares.sort(key=lambda spare: spare.size * spare.itemsize, reverse=True)
        del _spares[SPARES:]
