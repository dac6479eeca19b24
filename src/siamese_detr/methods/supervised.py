"""Supervised detection fine-tuning as a :class:`~siamese_detr.methods.base.Task`.

"From scratch" is simply fine-tuning with no ``init`` checkpoint. ``init`` accepts our
pretraining or fine-tuning checkpoints directly (no conversion needed) as well as converted
upstream-layout files (:func:`siamese_detr.eval.loading.init_from_checkpoint`); keys whose
shapes do not fit (the pretext class head) are skipped and reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from siamese_detr.config import RunConfig
from siamese_detr.data.collate import pad_to_multiple
from siamese_detr.engine.graphs import GraphableTask
from siamese_detr.errors import ConfigError
from siamese_detr.losses.set_criterion import padded_targets, target_slots
from siamese_detr.matcher import Matching
from siamese_detr.structures import BoxTargets, DetectorOutput, ImageBatch, LossOutput

if TYPE_CHECKING:
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.engine.loop import TrainResult
    from siamese_detr.engine.setup import Prepared

__all__ = ["DetectionTask", "SupervisedTask", "build_datasets"]


class DetectionTask(GraphableTask, nn.Module):
    """Supervised detection as a task for the engine: ``forward((images, targets))``.

    With CUDA graphs (:meth:`enable_cuda_graphs`) the step is the detector's graph, the
    matching (eager: the cost to the host, Hungarian, the pairs back), then the losses as a
    second graph (:meth:`losses`): the targets and the matched pairs are padded to a power of
    two (:func:`~siamese_detr.losses.set_criterion.target_slots`), so a few graphs serve every
    batch. Without graphs, or under DDP, the criterion runs eagerly as before."""

    graph_name = "detector"
    losses_graph_name = "detection losses"
    default_pad_multiple = 128  # images up to 1333 px: docs/benchmarks.md, cuda_graphs

    def __init__(self, detector: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.criterion = criterion

    def graph_owner(self) -> nn.Module:
        """The graphs train the detector (the criterion has no parameters)."""
        return self.detector

    def dense(self, images: Tensor, mask: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """The detector's ``(logits, boxes)`` from tensors only (what a CUDA graph captures)."""
        out = self.detector(ImageBatch(images, mask, sizes))
        return out.logits, out.boxes

    def losses_owner(self) -> nn.Module:
        """The losses' graphs hold the criterion only (it has no parameters)."""
        return self.criterion

    def forward(self, batch: tuple[ImageBatch, list[BoxTargets]]) -> LossOutput:
        images, targets = batch
        images = pad_to_multiple(images, self.pad_multiple)
        logits, boxes = self.run_dense(images.images, images.mask, images.sizes)
        # the criterion reads no decoder states
        out = DetectorOutput(logits=logits, boxes=boxes, hidden=logits[..., :0])
        if not self.losses_graphed():
            loss, _ = self.criterion(out, targets)
            return loss
        # the step's one host read (the cost to the host, Hungarian, the pairs back), then
        # the losses from their graphs: targets and pairs padded to a fixed number of slots
        n = sum(len(t) for t in targets)
        slots = target_slots(n)
        _, (matching,) = self.criterion.match_many([(out, targets)], pad_pairs=slots)
        labels, tgt_boxes = padded_targets(targets, slots, logits.device)
        num_boxes = torch.full((), float(max(n, 1)), device=logits.device)
        total, raw = self.run_losses(logits, boxes, labels, tgt_boxes, matching.batch_idx,
                                     matching.pred_idx, matching.tgt_idx, num_boxes)
        names, weights = self.criterion.term_names(out.num_layers)
        return LossOutput(total=total, names=names, weights=weights, raw=raw)

    def losses(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
               batch_idx: Tensor, pred_idx: Tensor, tgt_idx: Tensor, num_boxes: Tensor
               ) -> tuple[Tensor, Tensor]:
        """The criterion's ``(total, raw)`` from the detector's outputs, the padded targets
        and the padded pairs (``[L', slots]`` each): tensors only, fixed shapes for a given
        number of slots (what a CUDA graph captures)."""
        sup = self.criterion.supervised
        return self.criterion.loss_terms(sup(logits), sup(boxes), labels, tgt_boxes,
                                         Matching([], batch_idx, pred_idx, tgt_idx), num_boxes,
                                         padded=True)


def build_datasets(cfg: RunConfig, train: bool = True) -> tuple[Any, Any]:
    """``(train_set, val_set)`` of ``cfg.data`` (COCO format); ``train_set`` is ``None`` when
    ``train`` is False."""
    from siamese_detr.data.coco import CocoDetection
    from siamese_detr.data.transforms import build_transforms

    d = cfg.data
    for key in (["train_images", "train_ann"] if train else []) + ["val_images", "val_ann"]:
        if not getattr(d, key):
            raise ConfigError(f"data.{key} is empty: give the COCO-format data set, e.g. "
                              f"data.{key}=PATH")
    train_set = None
    if train:
        train_set = CocoDetection(d.train_images, d.train_ann, build_transforms(d, train=True),
                                  num_classes=cfg.model.num_classes)
    val_set = CocoDetection(d.val_images, d.val_ann, build_transforms(d, train=False),
                            num_classes=cfg.model.num_classes)
    return train_set, val_set


def categories_of(dataset: Any) -> list[dict[str, Any]]:
    """``[{"id", "name"}]`` of a COCO-format data set, sorted by id (stored in fine-tuning
    checkpoints so that exports and predictions can name the labels)."""
    coco = dataset.coco
    return [{"id": int(c["id"]), "name": str(c["name"])}
            for c in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])]


class SupervisedTask:
    """Fine-tune ``cfg``'s detector (from ``cfg.init`` or from scratch), evaluating on
    ``cfg.data.val_*``; ``run`` returns the final evaluation metrics."""

    kind: Literal["pretrain", "finetune"] = "finetune"
    sync_bn = False
    collate: Callable[[Any], Any] | None = None

    def __init__(self, cfg: RunConfig, device: Any = "cpu") -> None:
        self.cfg = cfg
        self.device = device
        self.batch_size = cfg.data.batch_size
        self.num_workers = cfg.data.num_workers
        self._val_set: Any = None
        self._categories: list[dict[str, Any]] = []

    def build_dataset(self) -> Any:
        train_set, self._val_set = build_datasets(self.cfg)
        self._categories = categories_of(train_set)
        return train_set

    def checkpoint_extras(self) -> dict[str, Any]:
        """Stored in every checkpoint besides kind/config: the category names."""
        return {"categories": self._categories}

    def build_module(self) -> nn.Module:
        from siamese_detr.engine.logging import get_logger
        from siamese_detr.eval.loading import init_from_checkpoint
        from siamese_detr.losses.set_criterion import build_criterion
        from siamese_detr.models.detector import build_detector_from_config

        cfg, log = self.cfg, get_logger()
        detector = build_detector_from_config(cfg)
        if cfg.model.backbone.weights:  # loaded by build_detector
            log.info("backbone weights: %s", cfg.model.backbone.weights)
        if cfg.init:
            log.info("init from %s: %s", cfg.init, init_from_checkpoint(
                detector, cfg.init, cfg.model.variant).summary())
        return DetectionTask(detector, build_criterion(cfg.model, cfg.loss))

    def describe(self, num_images: int, prepared: Prepared) -> str:
        s = prepared.schedule
        return (f"fine-tuning {self.cfg.model.variant}: {s.total_steps} iterations (lr drops "
                f"at {list(s.lr_drops)}), {num_images} train images, global batch "
                f"{prepared.global_batch}")

    def make_evaluator(self, run_dir: Path) -> Callable[[nn.Module], dict[str, float]]:
        from siamese_detr.eval.detection import evaluate_detector

        def evaluate(task: nn.Module) -> dict[str, float]:
            return evaluate_detector(task.detector, self._val_set, self.cfg, self.device,
                                     run_dir)

        return evaluate

    def finish(self, result: TrainResult, dist_info: DistInfo) -> dict[str, float]:
        from siamese_detr.files import write_json

        if dist_info.is_main:
            write_json(Path(self.cfg.output_dir) / "final_metrics.json", result.eval_metrics,
                       indent=2)
        return result.eval_metrics
