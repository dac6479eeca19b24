"""DETR's set criterion: Hungarian matching, then classification, L1 and GIoU box losses.

Every decoder layer is matched and supervised independently when ``aux_loss`` is on (DETR's
auxiliary decoding losses). The loss weights are applied in exactly one place
(:meth:`SetCriterion.forward`); :class:`LossOutput.terms` reports for each canonical name
(``loss_ce``, ``loss_bbox``, ``loss_giou``, summed over layers) and for each layer
(``loss_ce_0``, ``loss_bbox_0``, ...) the pair ``(weighted, raw)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from siamese_detr.config import ConfigError, LossConfig, ModelConfig, resolved_cls_loss
from siamese_detr.losses.focal import sigmoid_focal_loss
from siamese_detr.matcher import HungarianMatcher
from siamese_detr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from siamese_detr.structures import BoxTargets, DetectorOutput, LossOutput

__all__ = ["SetCriterion", "build_criterion", "num_logits", "Indices"]

Indices = list[tuple[Tensor, Tensor]]
NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def _num_boxes(targets: list[BoxTargets], device: torch.device) -> float:
    """Number of target boxes, averaged over processes when distributed; at least 1."""
    n = torch.tensor([float(sum(len(t) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(float(n.item()), 1.0)


class SetCriterion(nn.Module):
    """Bipartite-matching loss of DETR, Conditional DETR and Deformable DETR.

    Args:
        num_classes: number of real classes ``K``. Logits have ``K + 1`` columns for ``"ce"``
            (last = no-object) and ``K`` for ``"focal"``.
        matcher: the Hungarian matcher.
        cls_loss: ``"ce"`` (softmax cross-entropy with ``eos_coef`` on no-object) or
            ``"focal"`` (sigmoid focal loss normalised by the number of boxes).
        eos_coef: CE weight of the no-object class.
        focal_alpha, focal_gamma: focal loss parameters.
        weight_ce, weight_bbox, weight_giou: loss weights (applied here, once).
        aux_loss: supervise every decoder layer (else only the last).
    """

    empty_weight: Tensor

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        cls_loss: Literal["ce", "focal"] = "ce",
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if cls_loss not in ("ce", "focal"):
            raise ValueError(f"cls_loss must be 'ce' or 'focal', got {cls_loss!r}")
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.cls_loss = cls_loss
        self.eos_coef = float(eos_coef)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.weights = {"loss_ce": float(weight_ce), "loss_bbox": float(weight_bbox),
                        "loss_giou": float(weight_giou)}
        self.aux_loss = bool(aux_loss)
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1 if self.cls_loss == "ce" else self.num_classes

    # ------------------------------------------------------------------ single-layer losses
    def loss_labels(self, logits: Tensor, targets: list[BoxTargets], indices: Indices,
                    num_boxes: float) -> Tensor:
        """Classification loss of one layer. ``logits [B, Q, C]`` -> scalar."""
        logits = logits.float()
        B, Q, C = logits.shape
        batch_idx, src_idx = _flat_indices(indices, logits.device)
        tgt_labels = torch.cat([t.labels.to(logits.device)[j] for t, (_, j) in
                                zip(targets, indices)]).long()
        if self.cls_loss == "ce":
            target_classes = torch.full((B, Q), self.num_classes, dtype=torch.int64,
                                        device=logits.device)
            target_classes[batch_idx, src_idx] = tgt_labels
            weight = self.empty_weight.to(logits.device)
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        return sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)

    def loss_boxes(self, boxes: Tensor, targets: list[BoxTargets], indices: Indices,
                   num_boxes: float) -> tuple[Tensor, Tensor]:
        """L1 and ``1 - GIoU`` of matched boxes (normalised cxcywh), summed / ``num_boxes``."""
        boxes = boxes.float()
        batch_idx, src_idx = _flat_indices(indices, boxes.device)
        src = boxes[batch_idx, src_idx]
        tgt = torch.cat([t.boxes.to(boxes.device)[j] for t, (_, j) in
                         zip(targets, indices)]).float()
        l1 = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return l1, (1 - giou).sum() / num_boxes

    # ------------------------------------------------------------------ forward
    def forward(
        self, out: DetectorOutput, targets: list[BoxTargets]
    ) -> tuple[LossOutput, list[Indices]]:
        """Loss of a detector output against the batch's targets.

        Args:
            out: ``logits [L, B, Q, C]``, ``boxes [L, B, Q, 4]`` normalised cxcywh.
            targets: ``B`` ground truths (normalised cxcywh, labels in ``[0, num_classes)``).

        Returns:
            ``(LossOutput, indices)`` where ``indices[l][b] = (pred_idx, tgt_idx)`` for every
            supervised layer (all ``L`` layers with ``aux_loss``, else only the last one).
        """
        L = out.num_layers
        if out.logits.shape[-1] != self.num_logits:
            raise ValueError(f"logits have {out.logits.shape[-1]} columns, the {self.cls_loss} "
                             f"criterion expects {self.num_logits}")
        labels = [t.labels for t in targets if len(t) > 0]
        if labels:
            top = int(torch.cat([x.reshape(-1) for x in labels]).max())
            if top >= self.num_classes:
                raise ConfigError(
                    f"the data has label {top} but model.num_classes={self.num_classes}; set "
                    f"model.num_classes to at least {top + 1} (largest category id + 1)")
        device = out.logits.device
        num_boxes = _num_boxes(targets, device)
        layers = list(range(L)) if self.aux_loss else [L - 1]
        all_indices: list[Indices] = []
        raw: dict[str, Tensor] = {}
        for l in layers:
            indices = self.matcher(out.logits[l], out.boxes[l], targets)
            all_indices.append(indices)
            raw[f"loss_ce_{l}"] = self.loss_labels(out.logits[l], targets, indices, num_boxes)
            l1, giou = self.loss_boxes(out.boxes[l], targets, indices, num_boxes)
            raw[f"loss_bbox_{l}"] = l1
            raw[f"loss_giou_{l}"] = giou
        sums = {n: torch.stack([raw[f"{n}_{l}"] for l in layers]).sum() for n in NAMES}
        # the one place where weights are applied
        total = sum(self.weights[n] * sums[n] for n in NAMES)
        assert isinstance(total, Tensor)
        names = list(NAMES) + list(raw)
        values = torch.stack([sums[n] for n in NAMES] + list(raw.values())).detach().tolist()
        terms: dict[str, tuple[float, float]] = {}
        for name, value in zip(names, values):
            w = self.weights[name if name in NAMES else name.rsplit("_", 1)[0]]
            terms[name] = (w * value, value)
        return LossOutput(total=total, terms=terms), all_indices


def _flat_indices(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(batch_idx [N], pred_idx [N])`` of all matched predictions of a batch."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), src_idx.to(device)


def _resolve(value: float, default: float, key: str) -> float:
    if value == -1:
        return default
    if value < 0:
        raise ConfigError(f"{key}={value} must be >= 0 (or -1 for the upstream default)")
    return float(value)


def num_logits(model_cfg: ModelConfig, loss_cfg: LossConfig) -> int:
    """Columns of the class head: ``num_classes + 1`` for softmax CE, ``num_classes`` for focal."""
    ce = resolved_cls_loss(model_cfg, loss_cfg) == "ce"
    return model_cfg.num_classes + 1 if ce else model_cfg.num_classes


def build_criterion(model_cfg: ModelConfig, loss_cfg: LossConfig) -> SetCriterion:
    """The set criterion of a fine-tuning run (upstream defaults for the ``-1`` entries:
    class weight and class cost 1 for CE, 2 for focal)."""
    return build_set_criterion(loss_cfg, model_cfg.num_classes,
                               resolved_cls_loss(model_cfg, loss_cfg), model_cfg.aux_loss)


def build_set_criterion(loss_cfg: LossConfig, num_classes: int, cls_loss: Literal["ce", "focal"],
                        aux_loss: bool) -> SetCriterion:
    """Matcher costs and loss weights from ``loss_cfg`` (the one source of both, for
    fine-tuning and for the pretext tasks)."""
    default = 1.0 if cls_loss == "ce" else 2.0
    for key in ("bbox_weight", "giou_weight", "cost_bbox", "cost_giou", "eos_coef"):
        if getattr(loss_cfg, key) < 0:
            raise ConfigError(f"loss.{key}={getattr(loss_cfg, key)} must be >= 0")
    cost_class = _resolve(loss_cfg.cost_class, default, "loss.cost_class")
    if cost_class == 0 and loss_cfg.cost_bbox == 0 and loss_cfg.cost_giou == 0:
        raise ConfigError("loss.cost_class, loss.cost_bbox and loss.cost_giou are all 0; "
                          "set at least one matching cost > 0")
    matcher = HungarianMatcher(
        cost_class=_resolve(loss_cfg.cost_class, default, "loss.cost_class"),
        cost_bbox=loss_cfg.cost_bbox,
        cost_giou=loss_cfg.cost_giou,
        cls_loss=cls_loss,
        focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma,
    )
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        cls_loss=cls_loss,
        eos_coef=loss_cfg.eos_coef,
        focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma,
        weight_ce=_resolve(loss_cfg.cls_weight, default, "loss.cls_weight"),
        weight_bbox=loss_cfg.bbox_weight,
        weight_giou=loss_cfg.giou_weight,
        aux_loss=aux_loss,
    )
