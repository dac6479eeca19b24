"""COCO evaluation, results conversion and post-processing on hand-made cases."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

from siamese_detr.eval.coco import (
    coco_evaluate,
    format_metrics,
    to_coco_results,
)
from siamese_detr.eval.postprocess import postprocess
from siamese_detr.files import write_json

# two images, four large objects (area > 96^2) of category 1 and one of category 3
GT_BOXES = {
    1: [(1, [10, 10, 100, 120]), (1, [200, 50, 110, 100]), (3, [50, 200, 150, 100])],
    2: [(1, [0, 0, 100, 100]), (1, [150, 150, 120, 130])],
}


def _gt(tmp_path: Path) -> Path:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 400} for i in (1, 2)]
    anns = []
    for image_id, objs in GT_BOXES.items():
        for cat, box in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    return write_json(tmp_path / "gt.json",
                             {"images": images, "annotations": anns, "categories": cats})


def _perfect_results() -> list[dict]:
    return [{"image_id": i, "category_id": c, "bbox": list(map(float, b)), "score": 0.9}
            for i, objs in GT_BOXES.items() for c, b in objs]


def test_perfect_predictions_give_ap_one(tmp_path: Path) -> None:
    m = coco_evaluate(_gt(tmp_path), _perfect_results())
    for key in ("AP", "AP50", "AP75", "APl", "AR10", "AR100"):
        assert m[key] == pytest.approx(1.0), key
    # AR1: one detection per image and category -> category 1 recalls 2 of 4, category 3 all
    assert m["AR1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["APs"] == -1.0 and m["APm"] == -1.0  # no small/medium ground truth


def test_half_found_known_ap(tmp_path: Path) -> None:
    # category 1: 2 of 4 objects found (one per image), perfect boxes, no false positive;
    # category 3: its single object found. Category 2 has no ground truth (excluded).
    results = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10, 100, 120], "score": 0.8},
               {"image_id": 2, "category_id": 1, "bbox": [0.0, 0, 100, 100], "score": 0.7},
               {"image_id": 1, "category_id": 3, "bbox": [50.0, 200, 150, 100], "score": 0.6}]
    m = coco_evaluate(_gt(tmp_path), results)
    # 101-point interpolation: precision 1 at recall thresholds 0.00..0.50 (51 points), 0 after
    ap_cat1 = 51 / 101
    assert m["AP"] == pytest.approx((ap_cat1 + 1.0) / 2)
    assert m["AP50"] == pytest.approx((ap_cat1 + 1.0) / 2)
    assert m["AR100"] == pytest.approx((0.5 + 1.0) / 2)


def test_empty_results_and_image_subset(tmp_path: Path) -> None:
    gt = _gt(tmp_path)
    m = coco_evaluate(gt, [])
    assert m["AP"] == 0.0 and m["AR100"] == 0.0 and m["APs"] == -1.0
    # only image 2 evaluated: its two objects are found perfectly
    res = [r for r in _perfect_results() if r["image_id"] == 2]
    assert coco_evaluate(gt, res, image_ids=[2])["AP"] == pytest.approx(1.0)
    assert coco_evaluate(gt, res)["AP"] < 1.0
    with pytest.raises(ValueError, match="missing from the ground truth"):
        coco_evaluate(gt, [{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1],
                            "score": 1.0}])


def test_matches_pycocotools_directly(tmp_path: Path, capsys) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = random.Random(0)
    results = []
    for i, objs in GT_BOXES.items():
        for c, (x, y, w, h) in objs:
            for _ in range(3):
                d = [x + rng.uniform(-15, 15), y + rng.uniform(-15, 15),
                     w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
                results.append({"image_id": i, "category_id": rng.choice([c, c, 2]),
                                "bbox": d, "score": rng.random()})
    gt = _gt(tmp_path)
    ours = coco_evaluate(gt, results)
    assert capsys.readouterr().out == ""  # quiet
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(results))), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]
    assert [ours[k] for k in keys] == pytest.approx(list(ev.stats[:9]))
    assert 0.0 < ours["AP"] < 1.0


def test_to_coco_results_and_format(tmp_path: Path) -> None:
    det = {"scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([3, 1]),
           "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]])}
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "boxes": torch.zeros(0, 4)}
    res = to_coco_results([7, 8], [det, empty])
    assert res == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0],
         "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0],
         "score": pytest.approx(0.2)},
    ]
    text = format_metrics({"AP": 0.421, "AP50": 0.6, "APs": -1.0}, "coco")
    lines = text.splitlines()
    assert "0.4210" in lines[0] and "COCO AP@[.5:.95]" in lines[0]
    assert "COCO AP@.5" in lines[1] and "n/a" in lines[2]
    voc = format_metrics({"mAP": 0.5, "AP50/cat": 0.25}, "voc07")
    assert "11-point" in voc.splitlines()[0] and "cat" in voc.splitlines()[1]
    with pytest.raises(ValueError):
        format_metrics({}, "nope")


def test_postprocess_ce_by_hand() -> None:
    # 1 image (h=200, w=400), Q=2, 2 classes + no-object
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.1, 0.2]]])
    (det,) = postprocess(logits, boxes, torch.tensor([[200, 400]]), "ce")
    z0 = math.exp(2) + 1 + math.exp(1)
    z1 = 2 + math.exp(3)
    # sorted by score: query 0 (class 0, p=e^2/z0) then query 1 (tie -> class 0, p=1/z1)
    assert det["scores"].tolist() == pytest.approx([math.exp(2) / z0, 1 / z1])
    assert det["labels"].tolist() == [0, 0] and det["labels"].dtype == torch.int64
    torch.testing.assert_close(det["boxes"], torch.tensor([[100.0, 50.0, 300.0, 150.0],
                                                           [80.0, 30.0, 120.0, 70.0]]))
    (one,) = postprocess(logits, boxes, torch.tensor([[200, 400]]), "ce", max_detections=1)
    assert one["scores"].numel() == 1


def test_postprocess_focal_topk_over_queries_and_classes() -> None:
    logits = torch.tensor([[[3.0, 2.0, -5.0], [-1.0, -4.0, 1.0]]])  # Q=2, C=3
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.3, 0.2, 0.2]]])
    (det,) = postprocess(logits, boxes, torch.tensor([[100, 100]]), "focal", max_detections=4)
    sig = torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, -1.0]))
    assert det["scores"].tolist() == pytest.approx(sig.tolist())
    assert det["labels"].tolist() == [0, 1, 2, 0]
    expected = [[40.0, 40.0, 60.0, 60.0]] * 2 + [[10.0, 20.0, 30.0, 40.0]] * 2
    torch.testing.assert_close(det["boxes"], torch.tensor(expected))
    (thr,) = postprocess(logits, boxes, torch.tensor([[100, 100]]), "focal",
                         score_threshold=0.5)
    assert thr["labels"].tolist() == [0, 1, 2]
