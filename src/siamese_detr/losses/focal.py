"""Sigmoid focal loss normalised by the number of boxes (Deformable / Conditional DETR form)."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _tv_focal

__all__ = ["sigmoid_focal_loss"]


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    num_boxes: float | Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    keep_dims: int = 0,
) -> Tensor:
    """Focal loss (Lin et al. 2017) summed over all entries and divided by ``num_boxes``.

    Equals upstream's ``loss.mean(1).sum() / num_boxes * Q`` for ``[B, Q, C]`` inputs.

    Args:
        logits: ``[..., C]`` raw class scores.
        targets: same shape, one-hot float targets in {0, 1}.
        num_boxes: normaliser (number of ground-truth boxes, >= 1).
        alpha: weight of positives (``1 - alpha`` for negatives); negative disables it.
        gamma: focusing exponent.
        keep_dims: number of leading dims not summed (e.g. 1 for one loss per decoder layer).

    Returns:
        scalar tensor, or ``logits.shape[:keep_dims]`` with ``keep_dims``.
    """
    loss = _tv_focal(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    if keep_dims:
        return loss.flatten(keep_dims).sum(-1) / num_boxes
    return loss.sum() / num_boxes
