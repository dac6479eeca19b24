"""Per-class AP (issue 9): COCO AP / AP50 per category and VOC AP50 per class, hand-computed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from siamese_detr.eval.coco import category_names, coco_evaluate, load_coco
from siamese_detr.eval.detection import describe_metrics, score
from siamese_detr.files import write_json

# image 1: two objects of "cat" (id 1) and one "cup" (id 3); image 2: two "cat"; "dog" (id 2)
# has no ground truth
GT = {1: [(1, [10, 10, 100, 120]), (1, [200, 50, 110, 100]), (3, [50, 200, 150, 100])],
      2: [(1, [0, 0, 100, 100]), (1, [150, 150, 120, 130])]}
NAMES = {1: "cat", 2: "dog", 3: "cup"}


def _gt(tmp_path: Path) -> Path:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 400} for i in GT]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0} for k, (i, c, b) in enumerate(
                 (i, c, b) for i, objs in GT.items() for c, b in objs)]
    cats = [{"id": c, "name": n} for c, n in NAMES.items()]
    return write_json(tmp_path / "gt.json", {"images": images, "annotations": anns,
                                             "categories": cats})


# 2 of the 4 cats found (perfect boxes, no false positive), the cup found
RESULTS = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10, 100, 120], "score": 0.8},
           {"image_id": 2, "category_id": 1, "bbox": [0.0, 0, 100, 100], "score": 0.7},
           {"image_id": 1, "category_id": 3, "bbox": [50.0, 200, 150, 100], "score": 0.9}]


def test_coco_ap_per_category_hand_computed(tmp_path):
    m = coco_evaluate(_gt(tmp_path), RESULTS, per_category=True)
    # cat: precision 1 up to recall 0.5, then nothing: 51 of the 101 recall points
    assert m["AP/cat"] == pytest.approx(51 / 101) and m["AP50/cat"] == pytest.approx(51 / 101)
    assert m["AP/cup"] == pytest.approx(1.0) and m["AP50/cup"] == pytest.approx(1.0)
    assert m["AP/dog"] == -1.0  # no ground truth
    assert m["AP"] == pytest.approx((m["AP/cat"] + m["AP/cup"]) / 2)  # the mean over classes
    assert "AP/cat" not in coco_evaluate(_gt(tmp_path), RESULTS)  # off by default


def test_score_and_table_have_every_class(tmp_path):
    dataset = SimpleNamespace(coco=load_coco(_gt(tmp_path)))
    m = score(RESULTS, dataset, "voc07")
    assert m["voc07/AP50/cat"] == pytest.approx(6 / 11)  # 11-point: recall 0..0.5 at 1.0
    assert m["voc07/AP50/cup"] == pytest.approx(1.0) and m["voc07/AP50/dog"] == -1.0
    assert m["voc07/mAP50"] == pytest.approx((6 / 11 + 1) / 2)
    assert m["coco/AP/cat"] == pytest.approx(51 / 101)
    assert m["coco/AP50/cup"] == pytest.approx(1.0)
    text = describe_metrics(m)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[-3:]}
    assert rows["cat"] == ["0.5050", "0.5050", "0.5455"]
    assert rows["cup"] == ["1.0000", "1.0000", "1.0000"]
    assert rows["dog"] == ["n/a", "n/a", "n/a"]
    assert "COCO AP" in text and "VOC07 AP50" in text
    # the means keep their one-line definitions
    assert any(line.startswith("AP ") and "0.7525" in line for line in text.splitlines())


def test_duplicate_category_names_are_told_apart(tmp_path):
    path = write_json(tmp_path / "gt.json", {
        "images": [], "annotations": [],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}, {"id": 3, "name": "b"}]})
    assert category_names(path) == {1: "a (1)", 2: "a (2)", 3: "b"}
