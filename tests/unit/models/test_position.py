"""Sine positional encoding against a hand computation."""

from __future__ import annotations

import math

import torch

from siamese_detr.models.position import PositionEmbeddingSine, sine_position_encoding


def _hand(coord: float, total: float, offset: float = 0.0) -> list[float]:
    """4 channels of one axis: dim_t = [1, 1, 100, 100] for F=4, T=10000."""
    c = (coord + offset) / (total + 1e-6) * 2 * math.pi
    return [math.sin(c), math.cos(c), math.sin(c / 100), math.cos(c / 100)]


def test_hand_computation_with_padding() -> None:
    # 2 x 3 map, last column is padding: valid extent h=2, w=2
    mask = torch.tensor([[[False, False, True], [False, False, True]]])
    pos = sine_position_encoding(mask, num_pos_feats=4)
    assert pos.shape == (1, 8, 2, 3) and pos.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            if j < 2:  # valid pixel: 1-based row/column counts over a 2 x 2 valid extent
                want = _hand(i + 1, 2) + _hand(j + 1, 2)
            else:  # padded column: no valid rows (y = 0), x count stays at 2
                want = _hand(0, 0) + _hand(2, 2)
            torch.testing.assert_close(pos[0, :, i, j], torch.tensor(want), rtol=0, atol=1e-5)


def test_deformable_offset() -> None:
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    pos = PositionEmbeddingSine(4, offset=-0.5)(mask)
    want = _hand(2, 3, -0.5) + _hand(1, 4, -0.5)  # pixel (row 1, col 0)
    torch.testing.assert_close(pos[0, :, 1, 0], torch.tensor(want), rtol=0, atol=1e-5)


def test_valid_region_does_not_depend_on_padding() -> None:
    alone = sine_position_encoding(torch.zeros(1, 3, 5, dtype=torch.bool), 16)
    canvas = torch.ones(1, 7, 9, dtype=torch.bool)
    canvas[:, :3, :5] = False
    padded = sine_position_encoding(canvas, 16)
    torch.testing.assert_close(padded[..., :3, :5], alone)
    unmasked = sine_position_encoding(torch.zeros_like(canvas), 16)
    assert not torch.allclose(padded[..., :3, :5], unmasked[..., :3, :5])
