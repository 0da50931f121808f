"""`LowRankDelta`: a LoRA's delta kept as factors, sliced by rows as the
executor's row ranges take it, scaled and added, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrecipe.adapters.low_rank import LowRankDelta, Piece

ROWS, COLUMNS = 70, 12


def delta() -> tuple[LowRankDelta, np.ndarray]:
    """Pieces as a fused layer gets them: a whole-key module, and slices of
    unequal sizes (rows 0-9, 10-39) beside rows no piece covers (40-69)."""
    generator = torch.Generator().manual_seed(3)

    def factors(rows: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        up = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
        return up, torch.randn(rank, COLUMNS, generator=generator, dtype=torch.float64)

    pieces = []
    expected = np.zeros((ROWS, COLUMNS))
    for rows, rank in ((slice(0, ROWS), 3), (slice(0, 10), 2), (slice(10, 40), 4)):
        up, down = factors(rows.stop - rows.start, rank)
        pieces.append(Piece(rows, up, down))
        expected[rows] += up.numpy() @ down.numpy()
    return LowRankDelta((ROWS, COLUMNS), torch.float64, tuple(pieces)), expected


@pytest.mark.parametrize(
    "rows", [slice(0, 70), slice(5, 15), slice(12, 38), slice(39, 70), slice(60, 64)]
)
def test_row_ranges_of_the_delta(rows: slice) -> None:
    whole, expected = delta()
    part = whole[rows].scaled(-0.5)
    np.testing.assert_allclose(part.dense().numpy(), -0.5 * expected[rows], rtol=1e-12)
    target = torch.ones(part.shape, dtype=torch.float64)
    np.testing.assert_allclose(part.add_to(target).numpy(), 1 - 0.5 * expected[rows], rtol=1e-12)


def test_a_strided_target_and_a_scale_past_the_dtype() -> None:
    whole, expected = delta()
    target = torch.zeros(COLUMNS, ROWS, dtype=torch.float64).T  # not contiguous
    np.testing.assert_allclose(whole.scaled(2.0).add_to(target).numpy(), 2 * expected)
    huge = whole.scaled(1e300).add_to(torch.zeros(ROWS, COLUMNS, dtype=torch.float32))
    assert not bool(torch.isfinite(huge).all())  # infinities, which the output's check names
    assert whole.finite()
