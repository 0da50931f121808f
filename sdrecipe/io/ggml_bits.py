"""Scratch memory and bit fields in int words, for the GGML block formats of
`sdrecipe.io.ggml_quants` (dequantization and quantization alike)."""

from __future__ import annotations

import math

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# memory: faulting in fresh pages costs more than the arithmetic here (a 37 MB torch.empty takes
# ~4x longer to fill than numpy's huge-page-advised buffer), so big buffers come from numpy and
# a call's temporaries are reused by all of its chunks.


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor; on the CPU, in numpy's (huge-page-advised) memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class Scratch:
    """Named temporaries of one call, each allocated once and reused by every chunk."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[name] = empty((nbytes,), torch.uint8, self.device)
        return buf[:nbytes].view(dtype).view(shape)


# --------------------------------------------------------------------------------------------
# bit twiddling on words (little-endian, like GGUF files)


def _byte_mask(bits: int, size: int) -> int:
    """`bits` low bits set in every byte of a `size`-byte word (positive, so it fits signed)."""
    return int.from_bytes(bytes([(1 << bits) - 1]) * size, "little")


LOW_BITS = _byte_mask(1, 8)  # 0x0101010101010101
NIBBLES = _byte_mask(4, 8)  # 0x0F0F0F0F0F0F0F0F


def _words(src: torch.Tensor, ws: Scratch, name: str) -> torch.Tensor:
    """A contiguous copy of the bytes `src` (..., W), viewed as the widest int word dividing W."""
    width = src.shape[-1]
    dtype = next(
        t for t, s in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)) if width % s == 0
    )
    buf = ws.get(name, tuple(src.shape), torch.uint8)
    buf.copy_(src)
    return buf.view(dtype)


def fields(src: torch.Tensor, bits: int, count: int, ws: Scratch, name: str) -> torch.Tensor:
    """Split each byte of `src` (..., W) into `count` fields of `bits` bits: (..., count, W) uint8.

    Field k of byte j lands at [..., k, j], the order of gguf's ``(x >> shifts) & mask`` reshapes.
    """
    words = _words(src, ws, name + ".words")
    mask = _byte_mask(bits, words.element_size())
    out = ws.get(name, (*words.shape[:-1], count, words.shape[-1]), words.dtype)
    for k in range(count):
        dst = out[..., k, :]
        if k:
            # Arithmetic shifts drag sign bits into the top byte; the mask drops them again.
            torch.bitwise_right_shift(words, bits * k, out=dst)
            dst.bitwise_and_(mask)
        else:
            torch.bitwise_and(words, mask, out=dst)
    return out.view(torch.uint8).view(*src.shape[:-1], count, src.shape[-1])


def spread_bits(src: torch.Tensor, shift: int, ws: Scratch) -> torch.Tensor:
    """Bit i of the little-endian bytes `src` (n, 4) -> byte i of (n, 32), shifted left `shift`."""
    z = ws.get("spread", tuple(src.shape), torch.int64)
    t = ws.get("spread.tmp", tuple(src.shape), torch.int64)
    z.copy_(src)  # one byte per word: bit j must go to bit 8 * j
    for step, mask in ((28, 0x0000000F0000000F), (14, 0x0003000300030003), (7, LOW_BITS)):
        torch.bitwise_left_shift(z, step, out=t)
        z.bitwise_or_(t).bitwise_and_(mask)
    if shift:
        z.bitwise_left_shift_(shift)
    return z.view(torch.uint8).view(src.shape[0], 32)


def gather_bits(words: torch.Tensor, ws: Scratch) -> torch.Tensor:
    """The inverse of spread_bits, in place: bit 0 of byte j of each int64 -> bit j of byte 0."""
    t = ws.get("gather.tmp", tuple(words.shape), torch.int64)
    for step in (7, 14, 28):
        torch.bitwise_right_shift(words, step, out=t)
        words.bitwise_or_(t)
    return words.bitwise_and_(0xFF)
