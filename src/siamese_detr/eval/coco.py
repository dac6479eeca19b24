"""COCO-style box evaluation with pycocotools, quiet, with every number labelled.

The metrics are pycocotools' ``COCOeval(iouType="bbox")`` summary: ``AP`` is the mean over
IoU thresholds .50:.05:.95 of the 101-point interpolated precision, averaged over categories
(area all, 100 detections per image). Objects flagged ``difficult``/``ignore`` in a VOC json
are scored as normal ground truth here (pycocotools only honours ``iscrowd``).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "COCO_KEYS",
    "METRIC_DEFINITIONS",
    "to_coco_results",
    "coco_evaluate",
    "load_coco",
    "format_metrics",
]

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl")

#: the definition printed next to every number, per metric family
METRIC_DEFINITIONS: dict[str, dict[str, str]] = {
    "coco": {
        "AP": "COCO AP@[.5:.95], area=all, maxDets=100",
        "AP50": "COCO AP@.5, area=all, maxDets=100",
        "AP75": "COCO AP@.75, area=all, maxDets=100",
        "APs": "COCO AP@[.5:.95], area=small (<32^2 px), maxDets=100",
        "APm": "COCO AP@[.5:.95], area=medium (32^2-96^2 px), maxDets=100",
        "APl": "COCO AP@[.5:.95], area=large (>96^2 px), maxDets=100",
        "AR1": "COCO AR@[.5:.95], area=all, maxDets=1",
        "AR10": "COCO AR@[.5:.95], area=all, maxDets=10",
        "AR100": "COCO AR@[.5:.95], area=all, maxDets=100",
        "ARs": "COCO AR@[.5:.95], area=small, maxDets=100",
        "ARm": "COCO AR@[.5:.95], area=medium, maxDets=100",
        "ARl": "COCO AR@[.5:.95], area=large, maxDets=100",
    },
    "voc07": {"mAP": "VOC07 11-point AP@0.5 (IoU>0.5, difficult ignored), mean over classes",
              "AP50/": "VOC07 11-point AP@0.5 of class"},
    "voc-area": {"mAP": "VOC area-under-PR AP@0.5 (IoU>0.5, difficult ignored), mean over "
                        "classes", "AP50/": "VOC area-under-PR AP@0.5 of class"},
}


def to_coco_results(
    image_ids: Sequence[int], detections: Sequence[Mapping[str, Tensor]]
) -> list[dict[str, Any]]:
    """Detections (output of :func:`postprocess`, absolute xyxy) -> COCO result dicts
    ``{"image_id", "category_id" (= label), "bbox" [x, y, w, h], "score"}``."""
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detections")
    results: list[dict[str, Any]] = []
    for image_id, det in zip(image_ids, detections):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = boxes.clone()
        xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
        for box, score, label in zip(xywh.tolist(), det["scores"].tolist(),
                                     det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [float(v) for v in box], "score": float(score)})
    return results


def load_coco(gt: str | Path | Any) -> Any:
    """A ``pycocotools.coco.COCO`` from a json path (quietly) or an existing object."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    path = Path(gt)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _load_results(coco_gt: Any, results: list[dict[str, Any]]) -> Any:
    """Like ``COCO.loadRes`` (bbox results), but accepts an empty list."""
    from pycocotools.coco import COCO

    known = set(coco_gt.getImgIds())
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        raise ValueError(f"results refer to {len(unknown)} image ids missing from the ground "
                         f"truth, e.g. {sorted(unknown)[:3]}")
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    dt = COCO()
    dt.dataset = {"images": list(coco_gt.dataset["images"]),
                  "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                  "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def coco_evaluate(
    gt: str | Path | Any,
    results: list[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """pycocotools bbox evaluation.

    Args:
        gt: ground-truth json path or ``COCO`` object.
        results: COCO result dicts (see :func:`to_coco_results`).
        image_ids: evaluate only these images (default: every ground-truth image).
        verbose: print pycocotools' own summary (quiet by default).

    Returns:
        ``{AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}`` in [0, 1], or
        -1 where pycocotools reports -1 (no ground truth in that area range).
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = load_coco(gt)
    coco_dt = _load_results(coco_gt, results)
    sink: io.StringIO | None = None if verbose else io.StringIO()
    with contextlib.redirect_stdout(sink) if sink is not None else contextlib.nullcontext():
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {key: float(value) for key, value in zip(COCO_KEYS, ev.stats)}


def _definition(metric_name: str, key: str) -> str:
    table = METRIC_DEFINITIONS.get(metric_name, {})
    if key in table:
        return table[key]
    if key.startswith("AP50/") and "AP50/" in table:
        return f"{table['AP50/']} {key.split('/', 1)[1]}"
    return f"{metric_name} {key}"


def format_metrics(metrics: Mapping[str, float], metric_name: str) -> str:
    """One line per number with its definition, e.g.
    ``AP     = 0.4210  (COCO AP@[.5:.95], area=all, maxDets=100)``."""
    if metric_name not in METRIC_DEFINITIONS:
        raise ValueError(f"unknown metric {metric_name!r}; expected one of "
                         f"{sorted(METRIC_DEFINITIONS)}")
    width = max((len(k) for k in metrics), default=0)
    lines = []
    for key, value in metrics.items():
        shown = "n/a (no ground truth)" if value < 0 else f"{value:.4f}"
        lines.append(f"{key:<{width}} = {shown}  ({_definition(metric_name, key)})")
    return "\n".join(lines)
