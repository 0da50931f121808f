"""Each adapter algorithm's weight delta, as a function of its factors.

Formulas follow kohya's `merge_lora.py`, LyCORIS' functional API and the
A1111/ComfyUI loaders (README, "LoRA and LyCORIS"). Every function returns the
delta as rows x everything else; the caller gives it the layer's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdrecipe.adapters.modules import LORA_DOWN, LORA_UP, AdapterModule

# Added to DoRA's norm, as LyCORIS does, so that an all-zero row stays finite.
DORA_EPSILON = torch.finfo(torch.float32).eps

Factor = Callable[[str], torch.Tensor | None]


def rebuild_tucker(core: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A CP/Tucker-form factor: core [r, r, *kernel], rows [r, out], columns [r, in]."""
    return torch.einsum("i j ..., i p, j q -> p q ...", core, rows, columns)


def lora_scale(alpha: torch.Tensor | None, rank: int) -> float:
    """alpha / rank; 1 where the file stores no alpha (kohya, A1111, ComfyUI), and 0
    where it stores 0, as kohya's merge_lora, A1111 and ComfyUI apply it."""
    return 1.0 if alpha is None else float(alpha) / rank


def lora_delta(factor: Factor) -> torch.Tensor:
    """LoRA/LoCon: (alpha/r)·up·down, or through the CP core `lora_mid`."""
    up = next(u for name in LORA_UP if (u := factor(name)) is not None)
    down = next(d for name in LORA_DOWN if (d := factor(name)) is not None)
    rank = down.shape[0]
    # The scale goes on the small factor, not the product: one pass fewer.
    up = up.reshape(up.shape[0], -1) * lora_scale(factor("alpha"), rank)
    down = down.reshape(rank, -1)
    mid = factor("lora_mid.weight")
    delta = up @ down if mid is None else rebuild_tucker(mid, up.T, down)
    return delta.reshape(up.shape[0], -1)


def split_lora_delta(factor: Factor) -> torch.Tensor:
    """sd-scripts' split LoRA: (alpha/r)·up_i·down_i for each part i, stacked by rows."""
    pieces = []
    index = 0
    while (up := factor(f"lora_up.{index}.weight")) is not None:
        down = factor(f"lora_down.{index}.weight")
        assert down is not None
        pieces.append((up * lora_scale(factor("alpha"), down.shape[0])) @ down)
        index += 1
    return torch.cat(pieces)


def loha_delta(factor: Factor) -> torch.Tensor:
    """LoHa: (alpha/r)·(w1a·w1b) * (w2a·w2b), each half optionally in CP form."""
    w1a, w1b, w2a, w2b = (factor(p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    assert w1a is not None and w1b is not None and w2a is not None and w2b is not None
    t1, t2 = factor("hada_t1"), factor("hada_t2")
    rank = w1b.shape[0]
    w1a = w1a * lora_scale(factor("alpha"), rank)
    if t1 is not None and t2 is not None:
        first, second = rebuild_tucker(t1, w1a, w1b), rebuild_tucker(t2, w2a, w2b)
    else:
        first = w1a @ w1b.reshape(rank, -1)
        second = w2a @ w2b.reshape(w2b.shape[0], -1)
    delta = first.mul_(second)
    return delta.reshape(delta.shape[0], -1)


def lokr_delta(factor: Factor) -> torch.Tensor:
    """LoKr: s·kron(w1, w2), each side whole or a product; s = alpha/r if a side is a
    product, else 1 (the alpha of an unfactorised LoKr is ignored, as in LyCORIS)."""
    w1 = factor("lokr_w1")
    rank = None
    if w1 is None:
        w1a, w1b = factor("lokr_w1_a"), factor("lokr_w1_b")
        assert w1a is not None and w1b is not None
        w1, rank = w1a @ w1b, w1b.shape[0]
    w2 = factor("lokr_w2")
    if w2 is None:
        w2a, w2b, t2 = factor("lokr_w2_a"), factor("lokr_w2_b"), factor("lokr_t2")
        assert w2a is not None and w2b is not None
        rank = w2b.shape[0]
        if t2 is not None:
            w2 = rebuild_tucker(t2, w2a, w2b)
        else:
            w2 = (w2a @ w2b.reshape(rank, -1)).reshape(w2a.shape[0], *w2b.shape[1:])
    scale = 1.0 if rank is None else lora_scale(factor("alpha"), rank)
    w1 = w1 * scale
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    delta = torch.kron(w1.contiguous(), w2.contiguous())
    return delta.reshape(delta.shape[0], -1)


def whole_delta(factor: Factor) -> torch.Tensor:
    """Full (`diff`) and norm (`w_norm`) deltas are stored whole (callers never
    modify what a reader returns, so a stored float32 delta is not copied)."""
    delta = factor("diff")
    if delta is None:
        delta = factor("w_norm")
    assert delta is not None
    return delta.reshape(delta.shape[0], -1)


WEIGHT_DELTAS: dict[str, Callable[[Factor], torch.Tensor]] = {
    "lora": lora_delta,
    "split_lora": split_lora_delta,
    "loha": loha_delta,
    "lokr": lokr_delta,
    "full": whole_delta,
    "norm": whole_delta,
}


def weight_delta(module: AdapterModule, factor: Factor) -> torch.Tensor:
    """The module's weight delta before DoRA, rows x everything else."""
    return WEIGHT_DELTAS[module.algorithm](factor)


def bias_delta(factor: Factor) -> torch.Tensor:
    """The bias delta of a full (`diff_b`) or norm (`b_norm`) module."""
    delta = factor("diff_b")
    if delta is None:
        delta = factor("b_norm")
    assert delta is not None
    return delta


def dora_axis(magnitude: tuple[int, ...]) -> int:
    """The axis DoRA's norm keeps, from the magnitude's shape: 1 (per input column)
    for [1, in, ...], else 0 (per output row)."""
    return 1 if len(magnitude) > 1 and magnitude[0] == 1 and magnitude[1] > 1 else 0


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA as A1111 and ComfyUI apply it: with W' = W + dW, the delta
    m·W'/|W'| - W, so that strength s gives W + s·(m·W'/|W'| - W).

    The norm runs along the axis `magnitude` keeps: [out, 1, ...] is per output
    row (LyCORIS since 2025, PEFT), [1, in, ...] per input column (older files)."""
    combined = weight + delta
    axis = dora_axis(tuple(magnitude.shape))
    others = [d for d in range(combined.dim()) if d != axis]
    norm = torch.linalg.vector_norm(combined, dim=others, keepdim=True).add_(DORA_EPSILON)
    return combined.mul_(magnitude.reshape(norm.shape) / norm).sub_(weight)
