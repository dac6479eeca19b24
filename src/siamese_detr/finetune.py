"""Supervised fine-tuning and evaluation of a detector on a COCO-format data set.

"From scratch" is simply fine-tuning with no ``init`` checkpoint. ``init`` accepts our
pretraining or fine-tuning checkpoints directly (no conversion needed) as well as converted
upstream-layout files; keys whose shapes do not fit (the pretext class head) are skipped and
reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from siamese_detr.config import ConfigError, RunConfig, resolved_cls_loss
from siamese_detr.configio import to_dict
from siamese_detr.engine.checkpoint import detector_state_from_checkpoint, load_checkpoint
from siamese_detr.engine.distributed import DistInfo
from siamese_detr.engine.logging import get_logger
from siamese_detr.structures import BoxTargets, ImageBatch, LossOutput


class DetectionTask(nn.Module):
    """Supervised detection as a task for the engine: ``forward((images, targets))``."""

    def __init__(self, detector: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.criterion = criterion

    def forward(self, batch: tuple[ImageBatch, list[BoxTargets]]) -> LossOutput:
        images, targets = batch
        out = self.detector(images)
        loss, _ = self.criterion(out, targets)
        return loss


@dataclass
class InitReport:
    loaded: int
    skipped_shape: list[str]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        return (f"loaded {self.loaded} tensors; re-initialised (shape differs) "
                f"{len(self.skipped_shape)}: {self.skipped_shape[:4]}; "
                f"missing {len(self.missing)}: {self.missing[:4]}; "
                f"unexpected {len(self.unexpected)}: {self.unexpected[:4]}")


def load_init(detector: nn.Module, path: str | Path, variant: str) -> InitReport:
    """Initialise ``detector`` from a checkpoint; the class head is re-initialised when its
    shape differs (a pretext head or another label set)."""
    ckpt = load_checkpoint(path)
    stored = ckpt.get("config", {}).get("model", {}).get("variant") if isinstance(
        ckpt.get("config"), dict) else None
    if stored is not None and stored != variant:
        raise ConfigError(f"--init {path} holds a {stored} detector but model.variant={variant}; "
                          f"use a {variant} checkpoint or set model.variant={stored}")
    state = detector_state_from_checkpoint(ckpt)
    own = detector.state_dict()
    usable, skipped = {}, []
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            if "class_embed" in k:
                skipped.append(k)
                continue
            raise ConfigError(f"--init {path}: '{k}' has shape {tuple(v.shape)} but the model "
                              f"expects {tuple(own[k].shape)} (check model.num_queries, "
                              "hidden_dim and layer counts)")
        usable[k] = v
    result = detector.load_state_dict(usable, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("class_embed")]
    if len(missing) > 0.5 * len(own):
        raise ConfigError(f"--init {path} matches only {len(usable)} of {len(own)} tensors of "
                          "this model: is it a checkpoint of the same detector?")
    return InitReport(len(usable), skipped, list(result.missing_keys),
                      list(result.unexpected_keys))


def build_datasets(cfg: RunConfig, train: bool = True) -> tuple[Any, Any]:
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


@torch.no_grad()
def predict(detector: nn.Module, dataset: Any, cfg: RunConfig, device: torch.device
            ) -> list[dict[str, Any]]:
    """COCO result dicts for every image of ``dataset`` (gathered over ranks)."""
    from siamese_detr.data.loaders import build_eval_loader
    from siamese_detr.eval.coco import to_coco_results
    from siamese_detr.eval.postprocess import postprocess

    cls_loss = resolved_cls_loss(cfg.model, cfg.loss)
    was_training = detector.training
    detector.eval()
    results: list[dict[str, Any]] = []
    cuda = device.type == "cuda"
    loader = build_eval_loader(dataset, cfg.data.batch_size, cfg.data.num_workers,
                               pin_memory=cuda)
    for images, targets in loader:
        out = detector(images.to(device, non_blocking=cuda))
        orig = torch.stack([t.orig_size for t in targets]).to(device)
        dets = postprocess(out.logits[-1], out.boxes[-1], orig, cls_loss,
                           cfg.eval.max_detections, cfg.eval.score_threshold)
        results += to_coco_results([t.image_id for t in targets], dets)
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    detector.train(was_training)
    return results


def score(results: list[dict[str, Any]], dataset: Any, metric: str) -> dict[str, float]:
    """COCO AP always; VOC AP50 (11-point or area) in addition when ``metric`` asks for it."""
    from siamese_detr.eval.coco import coco_evaluate
    from siamese_detr.eval.voc import voc_evaluate

    metrics = {f"coco/{k}": v for k, v in coco_evaluate(dataset.coco, results).items()}
    if metric in ("voc07", "voc-area"):
        voc = voc_evaluate(dataset.coco, results, use_07_metric=metric == "voc07")
        metrics[f"{metric}/mAP50"] = voc["mAP"]
    return metrics


def describe_metrics(metrics: dict[str, float]) -> str:
    """Every number with its definition (COCO block, then VOC AP50 if present)."""
    from siamese_detr.eval.coco import format_metrics

    lines = [format_metrics({k.split("/", 1)[1]: v for k, v in metrics.items()
                             if k.startswith("coco/")}, "coco")]
    for k, v in metrics.items():
        if not k.startswith("coco/"):
            kind = "VOC2007 11-point" if k.startswith("voc07") else "VOC area-under-curve"
            lines.append(f"{k} = {v:.4f}  ({kind} AP@IoU>0.5)")
    return "\n".join(lines)


def evaluate_detector(detector: nn.Module, dataset: Any, cfg: RunConfig, device: torch.device,
                      out_dir: Path | None = None) -> dict[str, float]:
    results = predict(detector, dataset, cfg, device)
    metrics = score(results, dataset, cfg.eval.metric)
    if out_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        from siamese_detr.eval.coco import write_json_atomic

        write_json_atomic(out_dir / "predictions.json", results)
        write_json_atomic(out_dir / "eval_metrics.json", metrics)
    return metrics


def run_finetune(cfg: RunConfig, dist_info: DistInfo, resume_path: str | None = None
                 ) -> dict[str, float]:
    """Fine-tune ``cfg``'s detector (from ``cfg.init`` or from scratch), then evaluate."""
    from siamese_detr.data.loaders import build_detection_loader
    from siamese_detr.engine.loop import train
    from siamese_detr.engine.setup import prepare_training
    from siamese_detr.losses.set_criterion import build_criterion, num_logits
    from siamese_detr.models.detector import build_detector

    log = get_logger()
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    train_set, val_set = build_datasets(cfg)
    detector = build_detector(cfg.model, num_logits(cfg.model, cfg.loss))
    if cfg.model.backbone.weights:  # loaded by build_detector
        log.info("backbone weights: %s", cfg.model.backbone.weights)
    if cfg.init:
        log.info("init from %s: %s", cfg.init, load_init(detector, cfg.init,
                                                         cfg.model.variant).summary())
    task: nn.Module = DetectionTask(detector, build_criterion(cfg.model, cfg.loss)).to(
        dist_info.device)
    prep = prepare_training(task, cfg, dist_info, len(train_set), cfg.data.batch_size,
                            resume_path)
    log.info("fine-tuning %s: %d iterations (lr drops at %s), %d train images, global batch %d",
             cfg.model.variant, prep.schedule.total_steps, list(prep.schedule.lr_drops),
             len(train_set), prep.global_batch)

    def batches(position: int) -> Iterator[Any]:
        return build_detection_loader(train_set, cfg.data.batch_size, cfg.data.num_workers,
                                      cfg.seed, start_step=position,
                                      pin_memory=dist_info.device.type == "cuda")

    result = train(
        task=prep.model, batches=batches, optimizer=prep.optimizer, schedule=prep.schedule,
        engine=cfg.engine, run_dir=run_dir, dist_info=dist_info,
        checkpoint_meta={"kind": "finetune", "config": to_dict(cfg)},
        start=prep.start, scaler=prep.scaler,
        evaluate=lambda t: evaluate_detector(t.detector, val_set, cfg, dist_info.device, run_dir),
    )
    if dist_info.is_main:
        (run_dir / "final_metrics.json").write_text(json.dumps(result.eval_metrics, indent=2))
    return result.eval_metrics
