"""Box format conversions and overlaps (thin, typed wrappers over ``torchvision.ops``).

Formats: ``xyxy`` = (x1, y1, x2, y2); ``cxcywh`` = (centre x, centre y, width, height).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "batched_generalized_box_iou",
    "paired_generalized_box_iou_loss",
    "normalize_xyxy",
    "denormalize_cxcywh",
    "clip_xyxy",
    "jitter_xyxy",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def batched_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU of xyxy boxes with leading batch dimensions: ``[..., N, 4]`` and
    ``[..., M, 4]`` (broadcastable leading dims) -> ``[..., N, M]``.

    ``torchvision.ops.generalized_box_iou`` takes 2-D inputs only; this is the same formula
    with the same operations in the same order, broadcast over the leading dimensions, so a
    2-D call gives bitwise the torchvision result (``tests/unit/ops/test_boxes.py``).
    """
    a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    iou = inter / union
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    area = hull[..., 0] * hull[..., 1]
    return iou - (area - union) / area


def paired_generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0
                                    ) -> Tensor:
    """``1 - GIoU`` of paired xyxy boxes ``[..., 4]`` -> ``[...]``: the values of
    ``torchvision.ops.generalized_box_iou_loss(boxes1, boxes2, reduction="none", eps=eps)``.

    torchvision computes the intersection with boolean-mask indexing, which reads the mask's
    size back to the host on a GPU: a sync per call, and an op a CUDA graph cannot capture
    (Siamese DETR's losses are captured). Here the intersection's sides are clamped at 0
    instead: equal where the boxes overlap (the clamp is then a no-op), 0 where they do not.
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    inter = ((torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0)
             * (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    hull = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (hull - union) / (hull + eps))


def normalize_xyxy(boxes: Tensor, height: float, width: float) -> Tensor:
    """Absolute pixel xyxy -> normalised cxcywh relative to an image of ``(height, width)``."""
    scale = boxes.new_tensor([width, height, width, height])
    return box_xyxy_to_cxcywh(boxes / scale)


def denormalize_cxcywh(boxes: Tensor, height: Tensor | float, width: Tensor | float) -> Tensor:
    """Normalised cxcywh -> absolute pixel xyxy. ``height``/``width`` may be ``[B]`` tensors
    when ``boxes`` is ``[B, Q, 4]``."""
    xyxy = box_cxcywh_to_xyxy(boxes)
    if isinstance(height, Tensor) and height.dim() > 0:
        scale = torch.stack([width, height, width, height], dim=-1).to(xyxy)
        return xyxy * scale[:, None, :]
    return xyxy * xyxy.new_tensor([width, height, width, height])


def clip_xyxy(boxes: Tensor, height: float, width: float) -> Tensor:
    x1 = boxes[..., 0].clamp(0, width)
    y1 = boxes[..., 1].clamp(0, height)
    x2 = boxes[..., 2].clamp(0, width)
    y2 = boxes[..., 3].clamp(0, height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def jitter_xyxy(
    boxes: Tensor, ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """Move each coordinate by ``delta * (w, h, w, h)`` with ``delta = 2r*sigmoid(N(0,1)) - r``
    in ``(-ratio, ratio)`` (Siamese DETR's box disturbance). No clipping."""
    if ratio <= 0 or boxes.numel() == 0:
        return boxes
    wh = (boxes[..., 2:] - boxes[..., :2]).repeat_interleave(1, dim=-1)
    wh = torch.cat([wh, wh], dim=-1)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    delta = 2 * ratio * torch.sigmoid(noise) - ratio
    return boxes + delta * wh
