"""What a training task gives the runner, and helpers shared by the pretext tasks.

**The protocol.** :func:`siamese_detr.runner.run` trains any object with this shape
(:class:`Task`); one per method, built from the :class:`~siamese_detr.config.RunConfig` by
``runner.build_task(cfg)`` (one ``case`` per method, no registry):

- ``kind``: ``"pretrain"`` or ``"finetune"``, stored as the checkpoint's ``"kind"``;
- ``batch_size`` / ``num_workers``: per-process loader settings;
- ``sync_bn``: convert BatchNorm to SyncBatchNorm under DDP (Siamese DETR's projector);
- ``build_dataset()``: the training data set (a map-style ``torch.utils.data.Dataset``);
- ``collate``: the batch function of the loader (``None``: the detection default,
  ``(ImageBatch, list[BoxTargets])``);
- ``build_module()``: the ``nn.Module`` that is trained and checkpointed. Its
  ``forward(batch)`` returns a :class:`~siamese_detr.structures.LossOutput` and it holds the
  detector as ``.detector``, so every checkpoint stores the detector under ``detector.*``
  (what :func:`siamese_detr.eval.load_detector` and fine-tuning read);
- ``describe(num_images, prepared)``: the one start-up log line;
- ``make_evaluator(run_dir)``: ``evaluate(module) -> metrics`` for the loop's periodic and
  final evaluation, or ``None`` if the task has none;
- ``finish(result, dist_info)``: what :func:`~siamese_detr.runner.run` returns (metrics).
- optional ``checkpoint_extras()``: extra entries of every checkpoint (called after
  ``build_dataset``; fine-tuning stores ``"categories"``, the training json's ``[{"id",
  "name"}]``, which :func:`siamese_detr.eval.load_detector` reads for the label names).

:class:`PretextTask` is the same contract with ``kind == "pretrain"``; UP-DETR and DETReg
implement it next to :class:`siamese_detr.methods.siamese.task.SiameseTask`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from siamese_detr.ops.boxes import box_xyxy_to_cxcywh
from siamese_detr.structures import BoxTargets

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.engine.loop import TrainResult
    from siamese_detr.engine.setup import Prepared

__all__ = ["PretextTask", "PretextTaskBase", "Task", "global_pool_features",
           "roi_pool_features"]


@runtime_checkable
class Task(Protocol):
    """A training task as the runner sees it (see the module docstring)."""

    kind: Literal["pretrain", "finetune"]
    batch_size: int
    num_workers: int
    sync_bn: bool
    collate: Callable[[Any], Any] | None

    def build_dataset(self) -> Dataset: ...

    def build_module(self) -> nn.Module: ...

    def describe(self, num_images: int, prepared: Prepared) -> str: ...

    def make_evaluator(self, run_dir: Path
                       ) -> Callable[[nn.Module], dict[str, float]] | None: ...

    def finish(self, result: TrainResult, dist_info: DistInfo) -> dict[str, float]: ...


class PretextTask(Task, Protocol):
    """A self-supervised pretraining method (``kind == "pretrain"``); its module holds the
    detector as ``.detector`` so that fine-tuning loads ``detector.*`` keys directly."""


class PretextTaskBase:
    """What every pretext task shares: loader settings from ``cfg.pretrain``, no evaluator,
    the last logged losses as the result. A subclass sets ``collate`` and ``sync_bn`` and
    gives ``build_dataset``, ``build_module`` and ``describe``."""

    kind: Literal["pretrain", "finetune"] = "pretrain"
    sync_bn = False
    collate: Callable[[Any], Any] | None = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.batch_size = cfg.pretrain.batch_size
        self.num_workers = cfg.pretrain.num_workers

    def schedule_text(self, prepared: Prepared) -> str:
        """The tail of the start-up line: iterations, lr drops, global batch."""
        s = prepared.schedule
        return (f"{s.total_steps} iterations (lr drops at {list(s.lr_drops)}), global batch "
                f"{prepared.global_batch}")

    def make_evaluator(self, run_dir: Path) -> None:
        return None

    def finish(self, result: TrainResult, dist_info: DistInfo) -> dict[str, float]:
        return result.last_metrics


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


def pixel_boxes_normalised(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Boxes ``[B, M, 4]`` (pixel xyxy in image b, unpadded ``sizes [B, 2]`` ``(h, w)``) ->
    ``[B, M, 4]`` float32 normalised cxcywh; no host read."""
    h, w = sizes[:, 0].to(boxes.dtype), sizes[:, 1].to(boxes.dtype)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]
    return box_xyxy_to_cxcywh(boxes.float() / scale)


def pixel_box_targets(boxes: Tensor, sizes: Tensor) -> list[BoxTargets]:
    """Boxes ``[B, M, 4]`` (pixel xyxy in image b, unpadded ``sizes [B, 2]`` ``(h, w)``) ->
    per image normalised cxcywh targets with label 0 (the single "region"/"patch" class of the
    pretext tasks); no host read."""
    norm = pixel_boxes_normalised(boxes, sizes)
    labels = torch.zeros(norm.shape[:2], dtype=torch.int64, device=boxes.device)
    return [BoxTargets(boxes=norm[b], labels=labels[b], size=sizes[b])
            for b in range(boxes.shape[0])]
