"""Detector outputs -> scored absolute boxes in the original image (DETR post-processing)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from siamese_detr.ops.boxes import denormalize_cxcywh

__all__ = ["postprocess"]


@torch.no_grad()
def postprocess(
    logits: Tensor,
    boxes: Tensor,
    orig_sizes: Tensor,
    activation: Literal["softmax", "sigmoid", "ce", "focal"],
    max_detections: int = 100,
    score_threshold: float = 0.0,
) -> list[dict[str, Tensor]]:
    """Turn the last decoder layer's predictions into detections.

    * ``"softmax"`` (DETR; synonym ``"ce"``): softmax over ``C = K + 1`` columns, drop the
      trailing no-object column, each query keeps its best class; the ``max_detections``
      best queries are kept.
    * ``"sigmoid"`` (Conditional / Deformable DETR; synonym ``"focal"``): sigmoid over
      ``C = K`` columns, top-k over all ``Q * C`` (query, class) pairs with
      ``k = max_detections``, so one query may yield several detections with different
      labels.

    Args:
        logits: ``[B, Q, C]`` class logits.
        boxes: ``[B, Q, 4]`` normalised cxcywh boxes.
        orig_sizes: ``[B, 2]`` ``(h, w)`` of the original images.
        activation: the head that produced the logits (``Detector.head_activation``).
        max_detections: detections kept per image.
        score_threshold: detections with a lower score are dropped.

    Returns:
        per image ``{"scores": [K] float, "labels": [K] int64, "boxes": [K, 4]}`` with boxes in
        absolute xyxy pixels of the original image, sorted by decreasing score.
    """
    act = {"ce": "softmax", "focal": "sigmoid"}.get(activation, activation)
    if act not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    logits = logits.float()
    B, Q, C = logits.shape
    orig_sizes = orig_sizes.to(boxes.device)
    abs_boxes = denormalize_cxcywh(boxes.float(), orig_sizes[:, 0], orig_sizes[:, 1])
    if act == "softmax":
        prob = logits.softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)
        k = min(max_detections, Q)
        scores, query = scores.topk(k, dim=1)
        labels = labels.gather(1, query)
    else:
        prob = logits.sigmoid().flatten(1)
        k = min(max_detections, Q * C)
        scores, flat = prob.topk(k, dim=1)
        query = torch.div(flat, C, rounding_mode="floor")
        labels = flat % C
    picked = abs_boxes.gather(1, query[..., None].expand(-1, -1, 4))
    results = []
    for s, lab, b in zip(scores, labels, picked):
        keep = s >= score_threshold
        results.append({"scores": s[keep], "labels": lab[keep].long(), "boxes": b[keep]})
    return results
