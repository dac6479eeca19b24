"""Hungarian matching between a set of predictions and the ground truth of each image.

The cost of assigning prediction ``q`` to target ``t`` is (DETR / Conditional DETR)::

    C[q, t] = cost_class * C_cls[q, t] + cost_bbox * |b_q - b_t|_1 + cost_giou * (-GIoU(b_q, b_t))

with ``C_cls = -softmax(logits)[q, label_t]`` for softmax CE and, for sigmoid focal loss,
the focal "positive minus negative" cost of Deformable / Conditional DETR. The L1 term is on
normalised cxcywh boxes, the GIoU term on the same boxes converted to xyxy.
"""

from __future__ import annotations

from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from siamese_detr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from siamese_detr.structures import BoxTargets

__all__ = ["HungarianMatcher", "pairwise_cost"]

ClsLoss = Literal["ce", "focal"]


def _class_cost(
    logits: Tensor, labels: Tensor, cls_loss: ClsLoss, alpha: float, gamma: float
) -> Tensor:
    """``logits [N, C]``, ``labels [T]`` -> classification cost ``[N, T]`` (lower is better)."""
    if cls_loss == "ce":
        prob = logits.softmax(-1)
        return -prob[:, labels]
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


def pairwise_cost(
    logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    tgt_boxes: Tensor,
    *,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    cls_loss: ClsLoss,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> Tensor:
    """Matching cost between ``N`` predictions and ``T`` targets.

    Args:
        logits: ``[N, C]`` class logits.
        boxes: ``[N, 4]`` predicted normalised cxcywh boxes.
        labels: ``[T]`` int64 target classes.
        tgt_boxes: ``[T, 4]`` target normalised cxcywh boxes.

    Returns:
        ``[N, T]`` float32 cost.
    """
    logits = logits.float()
    boxes = boxes.float()
    tgt_boxes = tgt_boxes.float().to(boxes.device)
    labels = labels.to(logits.device)
    c_cls = _class_cost(logits, labels, cls_loss, focal_alpha, focal_gamma)
    c_l1 = torch.cdist(boxes, tgt_boxes, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return cost_class * c_cls + cost_bbox * c_l1 + cost_giou * c_giou


class HungarianMatcher:
    """One-to-one assignment of queries to ground-truth boxes, per image.

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 cost on normalised cxcywh boxes.
        cost_giou: weight of the ``-GIoU`` cost.
        cls_loss: ``"ce"`` (softmax, last column = no-object) or ``"focal"`` (sigmoid).
        focal_alpha, focal_gamma: parameters of the focal classification cost.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cls_loss: ClsLoss = "ce",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if cls_loss not in ("ce", "focal"):
            raise ValueError(f"cls_loss must be 'ce' or 'focal', got {cls_loss!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.cls_loss: ClsLoss = cls_loss
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, boxes: Tensor, targets: list[BoxTargets]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            logits: ``[B, Q, C]`` class logits.
            boxes: ``[B, Q, 4]`` predicted normalised cxcywh boxes.
            targets: ``B`` ground truths (boxes normalised cxcywh).

        Returns:
            For each image ``(pred_idx [K], tgt_idx [K])`` int64 CPU tensors with
            ``K = min(Q, T_i)``, sorted by ``pred_idx``; empty when the image has no target.
        """
        B, Q = logits.shape[:2]
        if len(targets) != B:
            raise ValueError(f"{len(targets)} targets for a batch of {B} predictions")
        sizes = [len(t) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in range(B)]
        labels = torch.cat([t.labels for t in targets])
        tgt_boxes = torch.cat([t.boxes for t in targets])
        # one cost matrix for all predictions against all targets, split per image below;
        # fp32 even inside an autocast region
        with torch.autocast(device_type=logits.device.type, enabled=False):
            cost = pairwise_cost(
                logits.flatten(0, 1), boxes.flatten(0, 1), labels, tgt_boxes,
                cost_class=self.cost_class, cost_bbox=self.cost_bbox, cost_giou=self.cost_giou,
                cls_loss=self.cls_loss, focal_alpha=self.focal_alpha,
                focal_gamma=self.focal_gamma,
            )
        # non-finite costs (degenerate boxes) would make scipy raise; make them prohibitive
        cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
        cost = cost.view(B, Q, -1).cpu()
        out: list[tuple[Tensor, Tensor]] = []
        for i, chunk in enumerate(cost.split(sizes, dim=-1)):
            if sizes[i] == 0:
                out.append((empty.clone(), empty.clone()))
                continue
            rows, cols = linear_sum_assignment(chunk[i].numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64),
                        torch.as_tensor(cols, dtype=torch.int64)))
        return out

    def __repr__(self) -> str:
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
                f"cost_giou={self.cost_giou}, cls_loss={self.cls_loss!r})")
