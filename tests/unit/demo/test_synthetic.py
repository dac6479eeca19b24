"""The bundled toy data: deterministic, well-formed COCO json, boxes match pasted objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from siamese_detr.demo import synthetic
from siamese_detr.demo.synthetic import NUM_CLASSES, make_detection_set, make_unlabeled_set

SIZE = (96, 128)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    make_detection_set(tmp_path / "a", 6, 3, SIZE, seed=3)
    make_detection_set(tmp_path / "b", 6, 3, SIZE, seed=3)
    make_detection_set(tmp_path / "c", 6, 3, SIZE, seed=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 6 + 3 + 2
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_image_does_not_depend_on_set_size(tmp_path):
    make_detection_set(tmp_path / "small", 2, 0, SIZE, seed=1)
    make_detection_set(tmp_path / "big", 5, 1, SIZE, seed=1)
    for name in ("000000.jpg", "000001.jpg"):
        assert (tmp_path / "small/train" / name).read_bytes() == (
            tmp_path / "big/train" / name).read_bytes()


def test_json_counts_boxes_and_categories(tmp_path):
    paths = make_detection_set(tmp_path, 12, 4, SIZE, seed=0, max_objects=2)
    assert paths.num_classes == NUM_CLASSES == 3
    for folder, ann, n in ((paths.train_images, paths.train_ann, 12),
                           (paths.val_images, paths.val_ann, 4)):
        doc = json.loads(ann.read_text())
        assert [c["id"] for c in doc["categories"]] == [0, 1, 2]
        assert len(doc["images"]) == n == len(list(folder.glob("*.jpg")))
        assert sorted(im["id"] for im in doc["images"]) == list(range(1, n + 1))
        per_image: dict[int, list] = {}
        for a in doc["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a["bbox"])
            x, y, w, h = a["bbox"]
            assert a["category_id"] in (0, 1, 2) and a["iscrowd"] == 0
            assert a["area"] == w * h
            assert x >= 0 and y >= 0 and x + w <= SIZE[1] and y + h <= SIZE[0]
            assert 0.25 * SIZE[0] - 1 <= h <= 0.6 * SIZE[0] + 1
            assert 0.25 * SIZE[1] - 1 <= w <= 0.6 * SIZE[1] + 1
        assert set(per_image) == {im["id"] for im in doc["images"]}  # >= 1 object each
        for boxes in per_image.values():
            assert 1 <= len(boxes) <= 2
            if len(boxes) == 2:
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes
                assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1
        for im in doc["images"]:
            with Image.open(folder / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) == (SIZE[1], SIZE[0])


def test_box_edges_carry_the_category_border(tmp_path):
    paths = make_detection_set(tmp_path, 10, 0, SIZE, seed=5)
    doc = json.loads(paths.train_ann.read_text())
    colours = {cid: np.array(rgb, dtype=float) for cid, *_, rgb in synthetic._OBJECTS}
    files = {im["id"]: im["file_name"] for im in doc["images"]}
    for a in doc["annotations"]:
        img = np.asarray(Image.open(paths.train_images / files[a["image_id"]]), dtype=float)
        x, y, w, h = (int(v) for v in a["bbox"])
        # middle of the left and right border columns, one pixel inside the box
        for px in (img[y + h // 2, x + 1], img[y + h // 2, x + w - 2]):
            assert np.abs(px - colours[a["category_id"]]).max() < 70, (a, px)


def test_unlabeled_set(tmp_path):
    p1 = make_unlabeled_set(tmp_path / "u1", 7, 64, seed=2)
    p2 = make_unlabeled_set(tmp_path / "u2", 7, 64, seed=2)
    assert len(p1) == 7 and all(p.suffix == ".jpg" for p in p1)
    assert [p.read_bytes() for p in p1] == [p.read_bytes() for p in p2]
    assert not list((tmp_path / "u1").glob("*.json"))
    with Image.open(p1[0]) as img:
        assert img.size == (64, 64)


def test_bad_arguments():
    with pytest.raises(ValueError):
        synthetic.compose_image(np.random.default_rng(0), (16, 16))
    with pytest.raises(ValueError):
        synthetic.compose_image(np.random.default_rng(0), (64, 64), max_objects=0)
