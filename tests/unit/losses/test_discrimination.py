"""Region- and global-discrimination losses of Siamese DETR."""

from __future__ import annotations

import pytest
import torch

from siamese_detr.losses.discrimination import (
    negative_cosine,
    region_discrimination_loss,
    simsiam_loss,
)


def test_region_loss_zero_for_same_direction_any_norm() -> None:
    target = torch.randn(6, 16)
    scales = torch.rand(6, 1) * 10 + 0.1
    assert region_discrimination_loss(target * scales, target, 6).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_region_loss_value_is_mean_of_two_minus_two_cos() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(5, 8), torch.randn(5, 8)
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)
    expected = (2 - 2 * cos).sum() / 10
    assert region_discrimination_loss(pred, target, 10).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    # opposite directions: the maximum, 4 per pair
    assert region_discrimination_loss(-target, target, 5).item() == pytest.approx(4.0, rel=1e-5)


def test_region_loss_no_grad_to_target_and_shape_check() -> None:
    pred = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4, requires_grad=True)
    region_discrimination_loss(pred, target, 3).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    with pytest.raises(ValueError):
        region_discrimination_loss(torch.randn(3, 4), torch.randn(2, 4), 3)


def test_simsiam_minimum_at_aligned_and_maximum_at_opposite() -> None:
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    assert simsiam_loss(z2 * 3, z2, z1 * 0.5, z1).item() == pytest.approx(0.0, abs=1e-5)
    assert simsiam_loss(-z2, z2, -z1, z1).item() == pytest.approx(4.0, abs=1e-5)
    # random vectors: strictly between the extremes
    value = simsiam_loss(torch.randn(64, 8), z2.repeat(16, 1), torch.randn(64, 8),
                         z1.repeat(16, 1)).item()
    assert 0.5 < value < 3.5


def test_simsiam_stop_gradient() -> None:
    p1 = torch.randn(4, 8, requires_grad=True)
    p2 = torch.randn(4, 8, requires_grad=True)
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    simsiam_loss(p1, z2, p2, z1).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert p2.grad is not None and p2.grad.abs().sum() > 0


def test_negative_cosine_is_batch_mean() -> None:
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # D = 0 for the first pair, 2 for the second -> mean 1
    assert negative_cosine(p, z).item() == pytest.approx(1.0)
