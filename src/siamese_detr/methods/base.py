"""Helpers shared by the pretext tasks (Siamese DETR, UP-DETR, DETReg)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["roi_pool_features", "global_pool_features"]


def roi_pool_features(
    features: list[Tensor], strides: list[int], boxes: Tensor, output_size: int = 7
) -> Tensor:
    """RoI-aligned, globally average-pooled region features, concatenated over levels.

    For each level: ``torchvision.ops.roi_align`` (``output_size`` x ``output_size``,
    ``spatial_scale = 1/stride``, ``sampling_ratio=-1``, ``aligned=False``), then the mean over
    the output grid. This is the multi-scale version of the official code (one RoIAlign per
    level); single-scale input gives the C5 feature.

    Args:
        features: per level ``[B, C_l, h_l, w_l]`` raw backbone maps.
        strides: stride in pixels of each level.
        boxes: ``[B, M, 4]`` absolute pixel xyxy in the (unpadded) image.

    Returns:
        ``[B, M, sum_l C_l]``.
    """
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
    B, M = int(boxes.shape[0]), int(boxes.shape[1])
    pooled = []
    for feat, stride in zip(features, strides):
        rois = list(boxes.to(feat.dtype).unbind(0))
        out = roi_align(
            feat, rois, output_size=output_size, spatial_scale=1.0 / stride,
            sampling_ratio=-1, aligned=False,
        )  # [B*M, C_l, S, S]
        pooled.append(out.mean(dim=(-2, -1)).reshape(B, M, -1))
    return torch.cat(pooled, dim=-1)


def global_pool_features(features: list[Tensor]) -> Tensor:
    """Global average pool of each level, concatenated: ``[N, C_l, h, w]`` -> ``[N, sum C_l]``."""
    return torch.cat([f.mean(dim=(-2, -1)) for f in features], dim=-1)
