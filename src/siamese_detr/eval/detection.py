"""Inference and scoring of a detector on a COCO-format data set.

``detect`` is the one inference step (a padded batch -> the detector -> post-processed
absolute boxes; the head's meaning, softmax with a no-object column or sigmoid, comes from
``detector.head_activation``): ``predict`` (data sets, evaluation) and
:meth:`siamese_detr.eval.loading.LoadedDetector.predict` (the user API, ``siamese-detr
predict``) both call it. ``predict`` turns its outputs into COCO result dicts; ``score``
computes COCO AP (and VOC AP50 on request), the mean and per category; ``evaluate_detector``
does both and writes ``predictions.json`` / ``eval_metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from siamese_detr.config import RunConfig
from siamese_detr.structures import ImageBatch

__all__ = ["describe_metrics", "detect", "evaluate_detector", "predict", "score"]


def detect(detector: nn.Module, images: ImageBatch, orig_sizes: Tensor, max_detections: int,
           score_threshold: float = 0.0, clip: bool = False) -> list[dict[str, Tensor]]:
    """Run ``detector`` (in eval mode, on the batch's device) and post-process its last
    decoder layer: per image ``{"scores", "labels", "boxes"}`` in absolute xyxy pixels of the
    original image ``orig_sizes [B, 2] (h, w)`` (see :func:`~.postprocess.postprocess`).
    The caller chooses the grad mode (``no_grad`` / ``inference_mode``)."""
    from siamese_detr.eval.postprocess import postprocess

    out = detector(images)
    return postprocess(out.logits[-1], out.boxes[-1], orig_sizes.to(images.images.device),
                       detector.head_activation, max_detections, score_threshold, clip=clip)


@torch.no_grad()
def predict(detector: nn.Module, dataset: Any, cfg: RunConfig, device: torch.device,
            progress: bool = False) -> list[dict[str, Any]]:
    """COCO result dicts for every image of ``dataset`` (gathered over ranks); ``progress``
    shows a progress bar (rank 0)."""
    from siamese_detr.data.loaders import build_eval_loader
    from siamese_detr.engine.env import resolve_num_workers
    from siamese_detr.eval.coco import to_coco_results

    was_training = detector.training
    detector.eval()
    results: list[dict[str, Any]] = []
    cuda = torch.device(device).type == "cuda"
    loader = build_eval_loader(dataset, cfg.data.batch_size,
                               resolve_num_workers(cfg.data.num_workers), pin_memory=cuda)
    bar = None
    if progress and (not dist.is_initialized() or dist.get_rank() == 0):
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc="evaluate", unit="batch", dynamic_ncols=True)
    for images, targets in loader:
        orig = torch.stack([t.orig_size for t in targets])
        dets = detect(detector, images.to(device, non_blocking=cuda), orig,
                      cfg.eval.max_detections, cfg.eval.score_threshold)
        results += to_coco_results([t.image_id for t in targets], dets)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    detector.train(was_training)
    return results


def score(results: list[dict[str, Any]], dataset: Any, metric: str) -> dict[str, float]:
    """COCO AP always; VOC AP50 (11-point or area) in addition when ``metric`` asks for it.

    Besides the means, every ground-truth category ``NAME`` gets ``coco/AP/NAME`` and
    ``coco/AP50/NAME`` (pycocotools' per-category precision, before the mean over categories)
    and, with a VOC metric, ``METRIC/AP50/NAME`` (-1: no ground truth of that category)."""
    from siamese_detr.eval.coco import coco_evaluate
    from siamese_detr.eval.voc import voc_evaluate

    coco = coco_evaluate(dataset.coco, results, per_category=True)
    metrics = {f"coco/{k}": v for k, v in coco.items() if "/" not in k}
    if metric in ("voc07", "voc-area"):
        voc = voc_evaluate(dataset.coco, results, use_07_metric=metric == "voc07")
        metrics[f"{metric}/mAP50"] = voc["mAP"]
        metrics.update({f"{metric}/{k}": v for k, v in voc.items() if k != "mAP"})
    metrics.update({f"coco/{k}": v for k, v in coco.items() if "/" in k})
    return metrics


def _per_class_table(metrics: dict[str, float]) -> list[str]:
    """Rows ``class | COCO AP | COCO AP50 | VOC AP50`` of the ``*/AP*/NAME`` keys."""
    columns = [("coco/AP/", "COCO AP"), ("coco/AP50/", "COCO AP50"),
               ("voc07/AP50/", "VOC07 AP50"), ("voc-area/AP50/", "VOC AP50")]
    columns = [(p, t) for p, t in columns if any(k.startswith(p) for k in metrics)]
    names: list[str] = []
    for prefix, _ in columns:
        names += [k[len(prefix):] for k in metrics if k.startswith(prefix)
                  and k[len(prefix):] not in names]
    if not names:
        return []
    width = max(len("class"), *(len(n) for n in names))

    def cell(key: str) -> str:
        v = metrics.get(key)
        return "n/a" if v is None or v < 0 else f"{v:.4f}"

    rows = ["per class (n/a: no ground truth of the class)",
            f"{'class':<{width}}  " + "  ".join(f"{t:>10}" for _, t in columns)]
    rows += [f"{n:<{width}}  " + "  ".join(f"{cell(p + n):>10}" for p, _ in columns)
             for n in names]
    return rows


def describe_metrics(metrics: dict[str, float]) -> str:
    """Every number with its definition (COCO block, then VOC AP50 if present), then the
    per-class table."""
    from siamese_detr.eval.coco import format_metrics

    per_class = {k for k in metrics if k.count("/") >= 2}
    lines = [format_metrics({k.split("/", 1)[1]: v for k, v in metrics.items()
                             if k.startswith("coco/") and k not in per_class}, "coco")]
    for k, v in metrics.items():
        if not k.startswith("coco/") and k not in per_class:
            kind = "VOC2007 11-point" if k.startswith("voc07") else "VOC area-under-curve"
            shown = "n/a (no ground truth)" if v < 0 else f"{v:.4f}"
            lines.append(f"{k} = {shown}  ({kind} AP@IoU>0.5)")
    return "\n".join(lines + _per_class_table(metrics))


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
