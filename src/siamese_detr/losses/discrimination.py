"""Semantic-discrimination losses of Siamese DETR (method.md 5.1 and 5.2).

Both losses compare L2-normalised vectors, so they only depend on directions:
``||a/|a| - b/|b|||^2 = 2 - 2 cos(a, b)``. Targets are always treated as constants
(stop-gradient).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["region_discrimination_loss", "negative_cosine", "simsiam_loss"]


def region_discrimination_loss(pred: Tensor, target: Tensor, num_targets: float) -> Tensor:
    """Region-level discrimination ``L_r`` of one decoder layer.

    Args:
        pred: ``[K, C]`` predicted embeddings (``feature_align`` of the matched decoder states).
        target: ``[K, C]`` embeddings of the corresponding region crops (frozen backbone);
            detached here.
        num_targets: normaliser, the number of region targets (``B * M``, local to the
            process as in the official code).

    Returns:
        Scalar ``sum_k ||pred_k/|pred_k| - target_k/|target_k|||^2 / num_targets``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = F.normalize(pred, dim=-1)
    t = F.normalize(target.detach().to(pred.dtype), dim=-1)
    return (p - t).pow(2).sum() / max(float(num_targets), 1.0)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam distance ``D(p, z) = 2 - 2 cos(p, sg(z))`` averaged over the batch.

    Args:
        p: ``[B, C]`` predictor output; z: ``[B, C]`` projector output (detached here).
    """
    cos = F.cosine_similarity(p, z.detach(), dim=-1)
    return (2.0 - 2.0 * cos).mean()


def simsiam_loss(p1: Tensor, z2: Tensor, p2: Tensor, z1: Tensor) -> Tensor:
    """Symmetric global-discrimination loss ``L_g = 0.5 D(p1, z2) + 0.5 D(p2, z1)``.

    All inputs are ``[B, C]``; ``z1``/``z2`` receive no gradient. Minimum 0 at ``p_i ∥ z_j``.
    """
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
