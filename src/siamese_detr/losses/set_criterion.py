"""DETR's set criterion: Hungarian matching, then classification, L1 and GIoU box losses.

Every decoder layer is matched and supervised independently when ``aux_loss`` is on (DETR's
auxiliary decoding losses). The loss weights are applied in exactly one place
(:meth:`SetCriterion.forward`); :class:`LossOutput.terms` reports for each canonical name
(``loss_ce``, ``loss_bbox``, ``loss_giou``, summed over layers) and for each layer
(``loss_ce_0``, ``loss_bbox_0``, ...) the pair ``(weighted, raw)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from siamese_detr.config import ConfigError, LossConfig, ModelConfig, resolved_cls_loss
from siamese_detr.losses.focal import sigmoid_focal_loss
from siamese_detr.matcher import HungarianMatcher, Matching, MatchJob, match_all
from siamese_detr.ops.boxes import box_cxcywh_to_xyxy, paired_generalized_box_iou_loss
from siamese_detr.structures import BoxTargets, DetectorOutput, LossOutput

__all__ = ["SetCriterion", "build_criterion", "num_boxes_of", "num_logits", "Indices",
           "padded_targets", "target_slots"]

Indices = list[tuple[Tensor, Tensor]]
NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def _num_boxes(targets: list[BoxTargets], device: torch.device) -> float | Tensor:
    """Number of target boxes, at least 1: a host float (the sizes are known on the host), or,
    when distributed, the average over processes as a device scalar (no host read)."""
    return num_boxes_of(float(sum(len(t) for t in targets)), device)


def num_boxes_of(n: float, device: torch.device) -> float | Tensor:
    """:func:`_num_boxes` of a batch with ``n`` target boxes in this process."""
    if not (dist.is_available() and dist.is_initialized()):
        return max(n, 1.0)
    t = torch.full((), n, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).clamp(min=1.0)


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
    loss_weights: Tensor

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
        self.register_buffer("loss_weights", torch.tensor([self.weights[n] for n in NAMES]),
                             persistent=False)

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1 if self.cls_loss == "ce" else self.num_classes

    def supervised_layers(self, num_layers: int) -> list[int]:
        """Decoder layers that get a matching and a loss, in the order of the returned
        ``indices``: every layer with ``aux_loss``, else only the last one."""
        return list(range(num_layers)) if self.aux_loss else [num_layers - 1]

    def supervised(self, per_layer: Tensor) -> Tensor:
        """The supervised layers' rows of ``[L, ...]`` (a view; see :meth:`supervised_layers`)."""
        return per_layer if self.aux_loss else per_layer[-1:]

    def term_names(self, num_layers: int) -> tuple[list[str], list[float]]:
        """The names and weights of the ``raw`` terms of a :class:`LossOutput` of a detector
        with ``num_layers`` decoder layers: the sums over layers (``loss_ce``, ...), then each
        supervised layer's terms (``loss_ce_0``, ...)."""
        layers = self.supervised_layers(num_layers)
        names = list(NAMES) + [f"{n}_{l}" for l in layers for n in NAMES]
        return names, [self.weights[n if n in NAMES else n.rsplit("_", 1)[0]] for n in names]

    # ------------------------------------------------------------------ losses of all layers
    def loss_labels(self, logits: Tensor, labels: Tensor, m: Matching,
                    num_boxes: float | Tensor, padded: bool = False) -> Tensor:
        """Classification loss of each layer: ``logits [L, B, Q, C]``, ``labels [T]`` (all
        targets of the batch, concatenated) -> ``[L]``. ``padded``: ``m`` holds padding pairs
        (prediction index ``Q``, :attr:`MatchJob.pad_pairs`), which land in a slot past the
        queries that is dropped."""
        logits = logits.float()
        L, B, Q, C = logits.shape
        layer = torch.arange(L, device=logits.device)[:, None].expand_as(m.batch_idx)
        matched = labels[m.tgt_idx]  # [L, N]
        if self.cls_loss == "ce" or padded:
            # each query's class, num_classes where unmatched (CE's no-object column, focal's
            # background); padding pairs write to the slot past the queries
            target_classes = torch.full((L, B, Q + 1 if padded else Q), self.num_classes,
                                        dtype=torch.int64, device=logits.device)
            target_classes[layer, m.batch_idx, m.pred_idx] = matched
        if self.cls_loss == "ce":
            if padded:
                target_classes = target_classes[..., :Q]
            weight = self.empty_weight.to(logits.device)
            # the weighted mean of F.cross_entropy, per layer: sum(w_i * nll_i) / sum(w_i)
            nll = F.cross_entropy(logits.permute(0, 3, 1, 2), target_classes, weight,
                                  reduction="none")
            return nll.sum((1, 2)) / weight[target_classes].sum((1, 2))
        if padded:
            # the classes scattered as 1 (a Python scalar assigned by index would become a
            # tensor first: an upload on a GPU, which a graph cannot hold)
            onehot = logits.new_zeros(L, B, Q + 1, C + 1)
            onehot.scatter_(3, target_classes.unsqueeze(-1), 1.0)
            onehot = onehot[:, :, :Q, :C]
        else:
            onehot = torch.zeros_like(logits)
            onehot[layer, m.batch_idx, m.pred_idx, matched] = 1.0
        return sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma,
                                  keep_dims=1)

    def loss_boxes(self, boxes: Tensor, tgt_boxes: Tensor, m: Matching,
                   num_boxes: float | Tensor, padded: bool = False) -> tuple[Tensor, Tensor]:
        """L1 and ``1 - GIoU`` of matched boxes (normalised cxcywh), summed / ``num_boxes``,
        per layer: ``boxes [L, B, Q, 4]``, ``tgt_boxes [T, 4]`` -> two ``[L]``. ``padded``:
        the padding pairs of ``m`` count 0 (their target must be a proper box)."""
        boxes = boxes.float()
        Q = boxes.shape[2]
        layer = torch.arange(boxes.shape[0], device=boxes.device)[:, None].expand_as(m.batch_idx)
        pred_idx = m.pred_idx.clamp(max=Q - 1) if padded else m.pred_idx
        src = boxes[layer, m.batch_idx, pred_idx]  # [L, N, 4]
        tgt = tgt_boxes.float()[m.tgt_idx]
        # 1 - GIoU, [L, N] (torchvision's values, without its host read)
        giou_loss = paired_generalized_box_iou_loss(box_cxcywh_to_xyxy(src),
                                                    box_cxcywh_to_xyxy(tgt))
        if not padded:
            return (src - tgt).abs().sum((1, 2)) / num_boxes, giou_loss.sum(1) / num_boxes
        real = (m.pred_idx < Q).float()  # [L, N]
        l1 = ((src - tgt).abs().sum(2) * real).sum(1) / num_boxes
        return l1, (giou_loss * real).sum(1) / num_boxes

    # ------------------------------------------------------------------ forward
    def forward(
        self, out: DetectorOutput, targets: list[BoxTargets]
    ) -> tuple[LossOutput, Matching]:
        """Loss of a detector output against the batch's targets.

        Args:
            out: ``logits [L, B, Q, C]``, ``boxes [L, B, Q, 4]`` normalised cxcywh.
            targets: ``B`` ground truths (normalised cxcywh, labels in ``[0, num_classes)``).

        Returns:
            ``(LossOutput, indices)`` where ``indices[l][b] = (pred_idx, tgt_idx)`` for every
            supervised layer (all ``L`` layers with ``aux_loss``, else only the last one).
        """
        return self.forward_many([(out, targets)])[0]

    def forward_many(
        self, items: Sequence[tuple[DetectorOutput, list[BoxTargets]]]
    ) -> list[tuple[LossOutput, Matching]]:
        """:meth:`forward` of several outputs (e.g. both directions of a Siamese step) whose
        matching cost matrices, of every supervised layer, go to the host in ONE transfer."""
        jobs, matchings = self.match_many(items)
        return [(self._loss(job, m, out.num_layers), m)
                for (out, _), job, m in zip(items, jobs, matchings)]

    def match_many(self, items: Sequence[tuple[DetectorOutput, list[BoxTargets]]],
                   pad_pairs: int = 0) -> tuple[list[MatchJob], list[Matching]]:
        """The matchings of :meth:`forward_many` (one transfer to the host), each layer's pairs
        padded to ``pad_pairs`` when > 0 (:attr:`MatchJob.pad_pairs`; the padding pairs'
        target is the last of ``pad_pairs`` slots, see :func:`padded_targets`)."""
        jobs = []
        for out, targets in items:
            if out.logits.shape[-1] != self.num_logits:
                raise ValueError(f"logits have {out.logits.shape[-1]} columns, the "
                                 f"{self.cls_loss} criterion expects {self.num_logits}")
            sl = slice(None) if self.aux_loss else slice(-1, None)
            jobs.append(MatchJob(self.matcher, out.logits[sl], out.boxes[sl], targets,
                                 pad_pairs=pad_pairs, pad_target=pad_pairs - 1))
        labels = [t.labels.reshape(-1) for _, targets in items for t in targets if len(t) > 0]
        # the largest label rides along with the cost matrices (no extra host read)
        top = torch.cat(labels).max() if labels else None
        matchings, extra = match_all(jobs, top)
        if top is not None and int(extra[0]) >= self.num_classes:
            high = int(extra[0])
            raise ConfigError(
                f"the data has label {high} but model.num_classes={self.num_classes}; set "
                f"model.num_classes to at least {high + 1} (largest category id + 1)")
        return jobs, matchings

    def _loss(self, job: MatchJob, m: Matching, num_layers: int) -> LossOutput:
        device = job.logits.device
        num_boxes = _num_boxes(job.targets, device)
        labels = torch.cat([t.labels for t in job.targets]).to(device).long()
        tgt_boxes = torch.cat([t.boxes for t in job.targets]).to(device)
        total, raw = self.loss_terms(job.logits, job.boxes, labels, tgt_boxes, m, num_boxes)
        names, weights = self.term_names(num_layers)
        return LossOutput(total=total, names=names, weights=weights, raw=raw)

    def loss_terms(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
                   m: Matching, num_boxes: float | Tensor, padded: bool = False
                   ) -> tuple[Tensor, Tensor]:
        """The weighted total and the ``raw`` terms (in :meth:`term_names` order) of the
        supervised layers' ``logits [L', B, Q, C]`` and ``boxes [L', B, Q, 4]`` matched by
        ``m`` to the batch's concatenated ``labels [T]`` and ``tgt_boxes [T, 4]``: tensors in,
        tensors out, no host read (Siamese DETR and graphed fine-tuning compute it inside a
        CUDA graph). ``padded``: ``m`` and the targets are padded (:meth:`match_many`,
        :func:`padded_targets`); the padding counts 0."""
        per_layer = torch.stack(  # [L', 3] in NAMES order
            [self.loss_labels(logits, labels, m, num_boxes, padded),
             *self.loss_boxes(boxes, tgt_boxes, m, num_boxes, padded)], dim=1)
        sums = per_layer.sum(0)
        total = (sums * self.loss_weights.to(logits.device)).sum()  # the one place weights apply
        return total, torch.cat([sums, per_layer.reshape(-1)])


def target_slots(num_targets: int, least: int = 16) -> int:
    """The padded target count of a batch with ``num_targets`` boxes: the next power of two
    above it (at least ``least``), so a CUDA graph of the losses serves many batches and
    the last slot is always padding."""
    slots = least
    while slots <= num_targets:
        slots *= 2
    return slots


def padded_targets(targets: list[BoxTargets], slots: int, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """The batch's concatenated ``labels [slots]`` and normalised cxcywh ``boxes [slots, 4]``,
    padded with label 0 and the box ``(0.5, 0.5, 0.5, 0.5)`` (a proper box: the padding
    pairs' GIoU is finite before it is multiplied by 0). Fills on the device, no upload."""
    n = sum(len(t) for t in targets)
    pad_labels = torch.zeros(slots - n, dtype=torch.int64, device=device)
    pad_boxes = torch.full((slots - n, 4), 0.5, device=device)
    labels = torch.cat([t.labels.to(device).long() for t in targets] + [pad_labels])
    boxes = torch.cat([t.boxes.to(device).float() for t in targets] + [pad_boxes])
    return labels, boxes


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
