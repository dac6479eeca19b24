"""PASCAL VOC detection AP at IoU 0.5, computed from a COCO-format ground-truth json.

This follows the VOC devkit / py-faster-rcnn ``voc_eval`` algorithm per class:

* detections of the class are sorted by decreasing score; each is assigned to the ground
  truth of its image with the highest IoU; if that IoU is ``> iou_threshold`` and the object
  is not yet detected it is a true positive, if already detected a false positive; if the
  best object is *difficult* the detection counts as neither; below the threshold it is a
  false positive;
* recall is relative to the number of non-difficult objects;
* AP is the VOC2007 11-point interpolated precision (``use_07_metric=True``, recall
  thresholds 0, 0.1, ..., 1) or the area under the monotone (interpolated) PR curve
  (VOC2010+ definition, ``use_07_metric=False``).

Differences from the devkit, stated on purpose: the ground truth comes from a COCO json whose
boxes are continuous ``[x, y, w, h]`` (our converter maps VOC's 1-based pixel indices to
0-based continuous coordinates), so IoU is computed on continuous boxes **without** the
devkit's ``+1`` pixel convention. Objects are ignored when their annotation has a true
``difficult``, ``ignore`` or ``iscrowd`` key. Values are fractions in [0, 1].
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from siamese_detr.eval.coco import category_names, load_coco

__all__ = ["voc_ap", "voc_evaluate"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a PR curve (``recall``, ``precision`` ``[N]`` in detection-rank order)."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            above = precision[recall >= t]
            ap += (above.max() if above.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    # precision envelope: p_interp(r) = max_{r' >= r} p(r')
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy ``box [4]`` against ``boxes [N, 4]`` (continuous coordinates)."""
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = iw * ih
    union = ((box[2] - box[0]) * (box[3] - box[1])
             + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def _is_ignored(ann: dict[str, Any]) -> bool:
    return bool(ann.get("difficult", 0) or ann.get("ignore", 0) or ann.get("iscrowd", 0))


def _class_ap(
    gts: dict[int, tuple[np.ndarray, np.ndarray]],
    dets: list[tuple[int, float, list[float]]],
    iou_threshold: float,
    use_07_metric: bool,
) -> float:
    """AP of one class. ``gts[image] = (xyxy [G, 4], ignored [G] bool)``;
    ``dets = [(image_id, score, xyxy)]``. Returns -1 without non-difficult objects."""
    npos = int(sum((~ign).sum() for _, ign in gts.values()))
    if npos == 0:
        return -1.0
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1])  # stable for ties
    detected = {img: np.zeros(len(b), dtype=bool) for img, (b, _) in gts.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, i in enumerate(order):
        image_id, _, box = dets[i]
        if image_id not in gts or len(gts[image_id][0]) == 0:
            fp[rank] = 1
            continue
        boxes, ignored = gts[image_id]
        ious = _iou(np.asarray(box, dtype=np.float64), boxes)
        j = int(ious.argmax())
        if ious[j] > iou_threshold:
            if ignored[j]:
                continue
            if not detected[image_id][j]:
                tp[rank] = 1
                detected[image_id][j] = True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    recall = tp_c / npos
    precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def voc_evaluate(
    gt: str | Path | Any,
    results: list[dict[str, Any]],
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """VOC AP50 of COCO-format results against a COCO-format ground truth.

    Args:
        gt: ground-truth json path or ``pycocotools`` ``COCO`` object (boxes ``[x, y, w, h]``).
        results: COCO result dicts ``{"image_id", "category_id", "bbox" [x,y,w,h], "score"}``.
        use_07_metric: 11-point AP (VOC2007) if True, else area under the interpolated curve.
        iou_threshold: a detection matches when IoU ``>`` this value.
        image_ids: evaluate only these images (default: every ground-truth image).

    Returns:
        ``{"mAP": mean over classes with ground truth, "AP50/<class name>": AP, ...}``;
        classes without non-difficult objects get -1 and are left out of the mean.
    """
    coco = load_coco(gt)
    keep = set(coco.getImgIds()) if image_ids is None else {int(i) for i in image_ids}
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    gts: dict[int, dict[int, list[tuple[list[float], bool]]]] = defaultdict(dict)
    for image_id in keep:
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            x, y, w, h = ann["bbox"]
            gts[ann["category_id"]].setdefault(image_id, []).append(
                ([x, y, x + w, y + h], _is_ignored(ann)))
    dets: dict[int, list[tuple[int, float, list[float]]]] = defaultdict(list)
    for r in results:
        if int(r["image_id"]) not in keep:
            continue
        x, y, w, h = r["bbox"]
        dets[int(r["category_id"])].append((int(r["image_id"]), float(r["score"]),
                                            [x, y, x + w, y + h]))
    names = category_names(coco)
    out: dict[str, float] = {}
    valid = []
    for cat in cats:
        per_image = {
            img: (np.asarray([b for b, _ in objs], dtype=np.float64).reshape(-1, 4),
                  np.asarray([ig for _, ig in objs], dtype=bool))
            for img, objs in gts[cat["id"]].items()
        }
        ap = _class_ap(per_image, dets[cat["id"]], iou_threshold, use_07_metric)
        out[f"AP50/{names[int(cat['id'])]}"] = ap
        if ap >= 0:
            valid.append(ap)
    out = {"mAP": float(np.mean(valid)) if valid else -1.0, **out}
    return out
