"""Hungarian matching between a set of predictions and the ground truth of each image.

The cost of assigning prediction ``q`` to target ``t`` is (DETR / Conditional DETR)::

    C[q, t] = cost_class * C_cls[q, t] + cost_bbox * |b_q - b_t|_1 + cost_giou * (-GIoU(b_q, b_t))

with ``C_cls = -softmax(logits)[q, label_t]`` for softmax CE and, for sigmoid focal loss,
the focal "positive minus negative" cost of Deformable / Conditional DETR. The L1 term is on
normalised cxcywh boxes, the GIoU term on the same boxes converted to xyxy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from siamese_detr.ops.boxes import batched_generalized_box_iou, box_cxcywh_to_xyxy
from siamese_detr.structures import BoxTargets

__all__ = ["HungarianMatcher", "MatchJob", "Matching", "pairwise_cost", "solve_assignments",
           "match_all"]

Indices = list[tuple[Tensor, Tensor]]

ClsLoss = Literal["ce", "focal"]


def _class_cost(
    logits: Tensor, labels: Tensor, cls_loss: ClsLoss, alpha: float, gamma: float
) -> Tensor:
    """``logits [..., N, C]``, ``labels [..., T]`` -> classification cost ``[..., N, T]`` (lower
    is better)."""
    index = labels.unsqueeze(-2).expand(*logits.shape[:-1], labels.shape[-1])
    if cls_loss == "ce":
        return -logits.softmax(-1).gather(-1, index)
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos.gather(-1, index) - neg.gather(-1, index)


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
    """Matching cost between ``N`` predictions and ``T`` targets, optionally per batch entry.

    Args:
        logits: ``[..., N, C]`` class logits.
        boxes: ``[..., N, 4]`` predicted normalised cxcywh boxes.
        labels: ``[..., T]`` int64 target classes.
        tgt_boxes: ``[..., T, 4]`` target normalised cxcywh boxes.

    The leading dimensions of the targets broadcast against those of the predictions (e.g.
    predictions ``[L, B, N, .]`` of ``L`` decoder layers against targets ``[B, T, .]``).

    Returns:
        ``[..., N, T]`` float32 cost.
    """
    logits = logits.float()
    boxes = boxes.float()
    tgt_boxes = tgt_boxes.float().to(boxes.device)
    labels = labels.to(logits.device)
    c_cls = _class_cost(logits, labels, cls_loss, focal_alpha, focal_gamma)
    lead = boxes.shape[:-2]
    c_l1 = torch.cdist(boxes, tgt_boxes.expand(*lead, *tgt_boxes.shape[-2:]), p=1)
    c_giou = -batched_generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                          box_cxcywh_to_xyxy(tgt_boxes))
    return cost_class * c_cls + cost_bbox * c_l1 + cost_giou * c_giou


def _padded_targets(targets: list[BoxTargets]) -> tuple[Tensor, Tensor]:
    """Labels ``[B, T]`` and boxes ``[B, T, 4]`` of the batch, ``T`` the most targets of one
    image: stacked when every image has as many (one op each, as the pretext tasks' regions),
    else padded; padding boxes are valid boxes (no 0/0 in the GIoU of a column nobody
    reads)."""
    if len({len(t) for t in targets}) == 1:
        return (torch.stack([t.labels for t in targets]),
                torch.stack([t.boxes for t in targets]))
    return (pad_sequence([t.labels for t in targets], batch_first=True),
            pad_sequence([t.boxes for t in targets], batch_first=True, padding_value=0.5))


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
    def cost_matrix(self, logits: Tensor, boxes: Tensor, targets: list[BoxTargets]) -> Tensor:
        """Cost of every prediction against the targets of its own image, on the device.

        Args:
            logits: ``[..., B, Q, C]`` class logits (any leading dims, e.g. decoder layers).
            boxes: ``[..., B, Q, 4]`` predicted normalised cxcywh boxes.
            targets: ``B`` ground truths.

        Returns:
            ``[..., B, Q, T]`` float32 with ``T`` the most targets of one image: image ``b``'s
            costs are in columns ``:len(targets[b])``, the rest is padding. Only these
            per-image blocks are ever used, so they are all that is computed and copied to
            the host: ``B`` times less than the cost of every prediction against every
            target of the batch when the images have equally many (Siamese pretraining's
            ``2B`` rows of ``M`` regions: 16 times less at batch 8). Non-finite entries are
            replaced by a prohibitive ``1e8`` (scipy refuses them).
        """
        # a label out of range is reported by the caller after the transfer (SetCriterion)
        labels, tgt_boxes = _padded_targets(targets)
        return self.padded_cost(logits, boxes, labels, tgt_boxes)

    @torch.no_grad()
    def padded_cost(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor
                    ) -> Tensor:
        """:meth:`cost_matrix` of targets given as tensors: ``labels [B, T]`` and
        ``tgt_boxes [B, T, 4]`` (normalised cxcywh; every image's ``T`` columns are its own,
        as when each image has ``T`` targets: the pretext tasks' regions). No host read, so a
        CUDA graph can compute it (Siamese DETR's dense part does)."""
        labels = labels.clamp(0, logits.shape[-1] - 1)
        # fp32 even inside an autocast region
        with torch.autocast(device_type=logits.device.type, enabled=False):
            cost = pairwise_cost(
                logits, boxes, labels, tgt_boxes,
                cost_class=self.cost_class, cost_bbox=self.cost_bbox, cost_giou=self.cost_giou,
                cls_loss=self.cls_loss, focal_alpha=self.focal_alpha,
                focal_gamma=self.focal_gamma,
            )
        return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

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
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} "
                             "predictions")
        indices, _ = solve_assignments([MatchJob(self, logits[None], boxes[None], targets)])
        return indices[0][0]

    def __repr__(self) -> str:
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
                f"cost_giou={self.cost_giou}, cls_loss={self.cls_loss!r})")


@dataclass
class MatchJob:
    """One set of predictions to match: ``logits [L, B, Q, C]``, ``boxes [L, B, Q, 4]`` (``L``
    decoder layers, matched independently) against the batch's ``targets``.

    ``cost``: the ``[L, B, Q, T]`` cost of :meth:`HungarianMatcher.cost_matrix`, when the
    caller has it already (computed inside a CUDA graph); ``counts`` then gives each image's
    number of targets and ``targets`` may be empty.

    ``pad_pairs``: when > 0, :func:`match_all` pads each layer's pairs to this many with
    ``(image 0, prediction Q, target pad_target)``: a prediction index past the last query,
    which marks them (fixed shapes for a CUDA graph of the losses)."""

    matcher: HungarianMatcher
    logits: Tensor
    boxes: Tensor
    targets: list[BoxTargets]
    cost: Tensor | None = None
    counts: list[int] | None = None
    pad_pairs: int = 0
    pad_target: int = 0

    def target_counts(self) -> list[int]:
        """Each image's number of targets."""
        return self.counts if self.counts is not None else [len(t) for t in self.targets]


class _Layers(Sequence[Indices]):
    """A sequence of per-layer indices (``self[l][b] = (pred_idx, tgt_idx)``): negative
    indices and slices as a list takes them; a subclass gives :meth:`_layer` of an index in
    range."""

    @overload
    def __getitem__(self, layer: int) -> Indices: ...

    @overload
    def __getitem__(self, layer: slice) -> list[Indices]: ...

    def __getitem__(self, layer: int | slice) -> Indices | list[Indices]:
        if isinstance(layer, slice):
            return [self._layer(i) for i in range(len(self))[layer]]
        return self._layer(range(len(self))[layer])  # negative indices, range check

    def _layer(self, layer: int) -> Indices:
        raise NotImplementedError


@dataclass
class Matching(_Layers):
    """The assignment of every layer of one :class:`MatchJob`.

    Behaves as the sequence ``indices[l][b] = (pred_idx, tgt_idx)`` (CPU int64, per image).
    ``batch_idx``, ``pred_idx`` and ``tgt_idx`` (``[L, N]`` int64 on the predictions' device,
    ``N = sum_b min(Q, T_b)``, the same for every layer) hold the same pairs flattened, with
    ``tgt_idx`` indexing the batch's concatenated targets, for losses without Python loops.
    """

    indices: Sequence[Indices]
    batch_idx: Tensor
    pred_idx: Tensor
    tgt_idx: Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def _layer(self, layer: int) -> Indices:
        return self.indices[layer]

    def __iter__(self) -> Iterator[Indices]:
        return iter(self.indices)


def _solve(jobs: Sequence[MatchJob], extra: Tensor | None
           ) -> tuple[list[list[list[tuple[np.ndarray, np.ndarray]]]], np.ndarray]:
    """:func:`solve_assignments` with NumPy index arrays."""
    costs, flat = [], []
    for job in jobs:
        if sum(job.target_counts()) == 0:
            costs.append(None)
            continue
        cost = (job.cost.detach() if job.cost is not None
                else job.matcher.cost_matrix(job.logits, job.boxes, job.targets))
        costs.append(tuple(cost.shape))
        flat.append(cost.reshape(-1))
    if extra is not None:
        flat.append(extra.detach().reshape(-1).float())
    host = torch.cat(flat).cpu().numpy() if flat else np.zeros(0, np.float32)  # the transfer
    none = np.zeros(0, np.int64)
    out = []
    offset = 0
    for job, shape in zip(jobs, costs):
        L, B = int(job.logits.shape[0]), int(job.logits.shape[1])
        if shape is None:
            out.append([[(none, none) for _ in range(B)] for _ in range(L)])
            continue
        n = int(np.prod(shape))
        block = host[offset : offset + n].reshape(shape)
        offset += n
        counts = job.target_counts()
        layers = []
        for layer in range(L):
            per_image = []
            for b in range(B):
                if counts[b] == 0:
                    per_image.append((none, none))
                    continue
                rows, cols = linear_sum_assignment(block[layer, b, :, : counts[b]])
                per_image.append((rows.astype(np.int64), cols.astype(np.int64)))
            layers.append(per_image)
        out.append(layers)
    return out, host[offset:]


def _as_tensors(layers: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[Indices]:
    return [[(torch.from_numpy(r), torch.from_numpy(c)) for r, c in per_image]
            for per_image in layers]


class _LazyIndices(_Layers):
    """``indices[l][b] = (pred_idx, tgt_idx)`` made into tensors when first read: the losses
    use the flattened pairs on the device, so a training step never pays the two
    ``torch.from_numpy`` per image and layer (192 host ops per Siamese step at batch 8)."""

    def __init__(self, layers: list[list[tuple[np.ndarray, np.ndarray]]]) -> None:
        self._layers = layers
        self._done: dict[int, Indices] = {}

    def __len__(self) -> int:
        return len(self._layers)

    def _layer(self, layer: int) -> Indices:
        if layer not in self._done:
            self._done[layer] = _as_tensors([self._layers[layer]])[0]
        return self._done[layer]


def _flat_pairs(layers: list[list[tuple[np.ndarray, np.ndarray]]], counts: list[int]
                ) -> np.ndarray:
    """Every layer's per-image pairs as ``[3, L, N]`` int64 rows (image, prediction, target
    in the batch's concatenated targets), with a few whole-array NumPy calls instead of some
    per image and layer (the matching is on a graphed step's critical path)."""
    L, B = len(layers), len(counts)
    pairs = [pair for per_image in layers for pair in per_image]
    lengths = np.fromiter((len(src) for src, _ in pairs), np.int64, L * B)
    if not lengths.any():
        return np.zeros((3, L, 0), np.int64)
    starts = np.cumsum([0, *counts[:-1]], dtype=np.int64)
    image = np.repeat(np.tile(np.arange(B, dtype=np.int64), L), lengths)
    pred = np.concatenate([src for src, _ in pairs]).astype(np.int64, copy=False)
    tgt = np.concatenate([tgt for _, tgt in pairs]).astype(np.int64, copy=False)
    tgt = tgt + np.repeat(np.tile(starts, L), lengths)
    return np.stack([image, pred, tgt]).reshape(3, L, -1)


def solve_assignments(jobs: Sequence[MatchJob], extra: Tensor | None = None
                      ) -> tuple[list[list[Indices]], np.ndarray]:
    """Hungarian assignment of every layer of every job with ONE device-to-host transfer.

    The cost matrices of all jobs (and the optional small ``extra`` tensor, e.g. values a
    caller needs on the host anyway) are flattened into one tensor, copied to the host once,
    and ``scipy.optimize.linear_sum_assignment`` runs on each ``[Q, T_b]`` block.

    Returns:
        ``(indices, extra_host)``: ``indices[j][l][b] = (pred_idx, tgt_idx)`` CPU int64 for
        job ``j``, layer ``l``, image ``b``; ``extra_host`` the flattened float32 ``extra``.
    """
    solved, extra_host = _solve(jobs, extra)
    return [_as_tensors(layers) for layers in solved], extra_host


def match_all(jobs: Sequence[MatchJob], extra: Tensor | None = None
              ) -> tuple[list[Matching], np.ndarray]:
    """:func:`solve_assignments`, plus the flattened pairs of every job on the device in one
    non-blocking host-to-device copy (pinned memory on CUDA), padded where a job asks
    (:attr:`MatchJob.pad_pairs`)."""
    solved, extra_host = _solve(jobs, extra)
    parts, shapes = [], []
    for job, layers in zip(jobs, solved):
        arr = _flat_pairs(layers, job.target_counts())  # [3, L, N]
        if job.pad_pairs:
            if job.pad_pairs < arr.shape[2]:
                raise ValueError(f"pad_pairs={job.pad_pairs} < {arr.shape[2]} matched pairs")
            fill = np.array([0, job.logits.shape[2], job.pad_target], np.int64)[:, None, None]
            arr = np.concatenate(
                [arr, np.broadcast_to(fill, (3, arr.shape[1], job.pad_pairs - arr.shape[2]))],
                axis=2)
        shapes.append(arr.shape)
        parts.append(arr.reshape(-1))
    device = jobs[0].logits.device if jobs else torch.device("cpu")
    flat = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, offset = [], 0
    for layers, shape in zip(solved, shapes):
        n = int(np.prod(shape))
        b_idx, p_idx, t_idx = flat[offset : offset + n].view(shape).unbind(0)
        offset += n
        out.append(Matching(_LazyIndices(layers), b_idx, p_idx, t_idx))
    return out, extra_host
