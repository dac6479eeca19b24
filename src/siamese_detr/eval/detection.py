"""Inference and scoring of a detector on a COCO-format data set.

``predict`` runs the detector and turns its outputs into COCO result dicts (the head's meaning,
softmax with a no-object column or sigmoid, comes from ``detector.head_activation``);
``score`` computes COCO AP (and VOC AP50 on request); ``evaluate_detector`` does both and
writes ``predictions.json`` / ``eval_metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from siamese_detr.config import RunConfig

__all__ = ["describe_metrics", "evaluate_detector", "predict", "score"]


@torch.no_grad()
def predict(detector: nn.Module, dataset: Any, cfg: RunConfig, device: torch.device
            ) -> list[dict[str, Any]]:
    """COCO result dicts for every image of ``dataset`` (gathered over ranks)."""
    from siamese_detr.data.loaders import build_eval_loader
    from siamese_detr.eval.coco import to_coco_results
    from siamese_detr.eval.postprocess import postprocess

    activation = detector.head_activation
    was_training = detector.training
    detector.eval()
    results: list[dict[str, Any]] = []
    loader = build_eval_loader(dataset, cfg.data.batch_size, cfg.data.num_workers)
    for images, targets in loader:
        out = detector(images.to(device))
        orig = torch.stack([t.orig_size for t in targets]).to(device)
        dets = postprocess(out.logits[-1], out.boxes[-1], orig, activation,
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
            shown = "n/a (no ground truth)" if v < 0 else f"{v:.4f}"
            lines.append(f"{k} = {shown}  ({kind} AP@IoU>0.5)")
    return "\n".join(lines)


def evaluate_detector(detector: nn.Module, dataset: Any, cfg: RunConfig, device: torch.device,
                      out_dir: Path | None = None) -> dict[str, float]:
    """``score(predict(...))``; rank 0 writes ``predictions.json`` and ``eval_metrics.json``
    into ``out_dir`` when given."""
    from siamese_detr.files import write_json

    results = predict(detector, dataset, cfg, device)
    metrics = score(results, dataset, cfg.eval.metric)
    if out_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        write_json(out_dir / "predictions.json", results)
        write_json(out_dir / "eval_metrics.json", metrics)
    return metrics
