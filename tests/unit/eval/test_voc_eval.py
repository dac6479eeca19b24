"""VOC AP50 (11-point and area) on a hand-computed case; difficult objects ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from siamese_detr.eval.voc import voc_ap, voc_evaluate
from siamese_detr.files import write_json


def _gt(tmp_path: Path, flag: str = "difficult", difficult: int = 1) -> Path:
    objs = [  # (image, category, xywh, difficult)
        (1, 0, [0, 0, 10, 10], 0),     # A
        (1, 0, [20, 20, 10, 10], 0),   # B (never found)
        (1, 0, [50, 50, 10, 10], difficult),  # D
        (2, 0, [0, 0, 20, 20], 0),     # C
        (2, 1, [30, 30, 10, 10], 1),   # class b: only a difficult object
        (2, 2, [60, 60, 20, 20], 0),   # class c
    ]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0, flag: d} for k, (i, c, b, d) in enumerate(objs)]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)]
    cats = [{"id": i, "name": n} for i, n in enumerate("abc")]
    return write_json(tmp_path / "gt.json",
                             {"images": images, "annotations": anns, "categories": cats})


def _det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


RESULTS = [
    _det(1, 0, [0, 0, 10, 10], 0.9),      # TP (A)
    _det(2, 0, [40, 40, 10, 10], 0.8),    # FP (no overlap)
    _det(1, 0, [50, 50, 10, 10], 0.75),   # on the difficult D: ignored
    _det(2, 0, [1, 1, 20, 19], 0.7),      # TP (C), IoU = 19*18/(400+380-342) > 0.5
    _det(1, 0, [0.5, 0, 10, 10], 0.6),    # duplicate of A: FP
    _det(2, 2, [60, 60, 20, 20], 0.5),    # class c: perfect
    _det(1, 2, [0, 0, 5, 5], 0.1),        # class c: FP with the lowest score
]
# class a: ranks TP, FP, TP, FP with npos = 3
#   recall    1/3, 1/3, 2/3, 2/3 ; precision 1, 1/2, 2/3, 1/2
#   11-point: t in {0,.1,.2,.3} -> 1 ; t in {.4,.5,.6} -> 2/3 ; t >= .7 -> 0  => 6/11
#   area:     1/3 * 1 + 1/3 * 2/3 = 5/9
AP07_A, AREA_A = 6 / 11, 5 / 9


def test_hand_computed_11_point_and_area(tmp_path: Path) -> None:
    gt = _gt(tmp_path)
    m07 = voc_evaluate(gt, RESULTS, use_07_metric=True)
    assert m07["AP50/a"] == pytest.approx(AP07_A)
    assert m07["AP50/b"] == -1.0  # no non-difficult object: left out of the mean
    assert m07["AP50/c"] == pytest.approx(1.0)
    assert m07["mAP"] == pytest.approx((AP07_A + 1.0) / 2)
    marea = voc_evaluate(gt, RESULTS, use_07_metric=False)
    assert marea["AP50/a"] == pytest.approx(AREA_A)
    assert marea["mAP"] == pytest.approx((AREA_A + 1.0) / 2)


@pytest.mark.parametrize("flag", ["difficult", "ignore", "iscrowd"])
def test_difficult_objects_ignored(tmp_path: Path, flag: str) -> None:
    # the same flag spelled differently gives the same AP
    assert voc_evaluate(_gt(tmp_path, flag), RESULTS)["AP50/a"] == pytest.approx(AP07_A)


def test_difficult_flag_changes_the_result(tmp_path: Path) -> None:
    # D becomes a normal object: npos = 4, the 0.75 detection is a TP
    # ranks TP FP TP TP FP: recall .25 .25 .5 .75 .75; precision 1 .5 .667 .75 .6
    # 11-point: t<=.2 -> 1 (3 pts); t in .3..0.7 -> .75 (5 pts); t>=.8 -> 0  => 6.75/11
    m = voc_evaluate(_gt(tmp_path, difficult=0), RESULTS)
    assert m["AP50/a"] == pytest.approx(6.75 / 11)
    # unfound difficult objects do not lower recall: only A and C, found perfectly
    perfect = [_det(1, 0, [0, 0, 10, 10], 0.9), _det(1, 0, [20, 20, 10, 10], 0.8),
               _det(2, 0, [0, 0, 20, 20], 0.7)]
    assert voc_evaluate(_gt(tmp_path), perfect)["AP50/a"] == pytest.approx(1.0)


def test_voc_ap_curves() -> None:
    rec, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 + 0.25)
    # 11-point: t in 0..0.5 -> 1 (6 points), t in 0.6..1.0 -> 0.5 (5 points)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 + 2.5) / 11)
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=True) == 0.0


def test_image_subset_and_no_results(tmp_path: Path) -> None:
    gt = _gt(tmp_path)
    m = voc_evaluate(gt, [], use_07_metric=False)
    assert m["mAP"] == 0.0 and m["AP50/b"] == -1.0
    only2 = voc_evaluate(gt, RESULTS, image_ids=[2], use_07_metric=False)
    # image 2, class a: C (npos 1): ranks FP, TP -> precision 1/2 at recall 1
    assert only2["AP50/a"] == pytest.approx(0.5)
