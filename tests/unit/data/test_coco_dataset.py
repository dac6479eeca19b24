"""CocoDetection on the bundled synthetic set."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from siamese_detr.config import ConfigError, DataConfig
from siamese_detr.data.coco import CocoDetection
from siamese_detr.data.transforms import build_transforms
from siamese_detr.demo.synthetic import make_detection_set
from siamese_detr.ops.boxes import box_cxcywh_to_xyxy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_detection_set(tmp_path_factory.mktemp("toy"), 6, 2, (80, 112), seed=0)


def _pixel_xyxy(t):
    h, w = t.size.tolist()
    return box_cxcywh_to_xyxy(t.boxes) * torch.tensor([w, h, w, h], dtype=torch.float32)


def test_boxes_round_trip_from_json(toy):
    ds = CocoDetection(toy.train_images, toy.train_ann, num_classes=3)
    doc = json.loads(toy.train_ann.read_text())
    assert len(ds) == 6 and ds.ids == [1, 2, 3, 4, 5, 6]
    assert len(ds.coco.getImgIds()) == 6
    for i in range(len(ds)):
        img, t = ds[i]
        # uint8 out of the worker (the detector normalises): the pixels of the file
        assert img.shape == (3, 80, 112) and img.dtype == torch.uint8
        anns = [a for a in doc["annotations"] if a["image_id"] == ds.ids[i]]
        assert t.image_id == ds.ids[i]
        assert t.size.tolist() == t.orig_size.tolist() == [80, 112]
        assert t.labels.tolist() == [a["category_id"] for a in anns]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                                 (a["bbox"] for a in anns)])
        assert torch.allclose(_pixel_xyxy(t), expected, atol=1e-4)
        assert ((t.boxes >= 0) & (t.boxes <= 1)).all()
        assert t.area.tolist() == [a["area"] for a in anns]
        assert t.iscrowd.tolist() == [0] * len(anns)


def test_eval_transform_scales_boxes_keeps_orig_size(toy):
    tf = build_transforms(DataConfig(val_size=40, max_size=1000), train=False)
    plain = CocoDetection(toy.val_images, toy.val_ann)
    ds = CocoDetection(toy.val_images, toy.val_ann, tf)
    img, t = ds[0]
    _, t0 = plain[0]
    assert img.shape == (3, 40, 56)
    assert t.size.tolist() == [40, 56] and t.orig_size.tolist() == [80, 112]
    assert torch.allclose(t.boxes, t0.boxes, atol=1e-5)  # normalised boxes are scale-free
    assert torch.allclose(_pixel_xyxy(t), _pixel_xyxy(t0) * 0.5, atol=1e-3)


def test_crowd_filtered_and_boxes_clipped(toy, tmp_path):
    doc = json.loads(toy.train_ann.read_text())
    n_before = sum(a["image_id"] == 1 for a in doc["annotations"])
    extra = [
        {"id": 1000, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 20], "area": 600,
         "iscrowd": 1},
        {"id": 1001, "image_id": 1, "category_id": 2, "bbox": [100, 70, 50, 50], "area": 2500,
         "iscrowd": 0},  # sticks out of the 112x80 image -> clipped to [100, 70, 112, 80]
        {"id": 1002, "image_id": 1, "category_id": 2, "bbox": [200, 10, 5, 5], "area": 25,
         "iscrowd": 0},  # entirely outside -> empty after clipping -> dropped
    ]
    doc["annotations"] += extra
    ann = tmp_path / "crowd.json"
    ann.write_text(json.dumps(doc))
    ds = CocoDetection(toy.train_images, ann)
    _, t = ds[0]
    assert len(t) == n_before + 1
    assert t.labels.tolist()[-1] == 2
    assert torch.allclose(_pixel_xyxy(t)[-1], torch.tensor([100.0, 70, 112, 80]), atol=1e-4)
    assert not (t.iscrowd != 0).any()


def test_label_too_large_is_a_config_error(toy, tmp_path):
    doc = json.loads(toy.train_ann.read_text())
    doc["annotations"][0]["category_id"] = 5
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"model\.num_classes.*at least 6"):
        CocoDetection(toy.train_images, ann, num_classes=3)
    CocoDetection(toy.train_images, ann, num_classes=6)  # large enough: accepted


def test_missing_files_are_config_errors(toy, tmp_path):
    with pytest.raises(ConfigError, match="nope.json"):
        CocoDetection(toy.train_images, tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="no_images"):
        CocoDetection(tmp_path / "no_images", toy.train_ann)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid json"):
        CocoDetection(toy.train_images, bad)
    folder = tmp_path / "imgs"
    shutil.copytree(toy.train_images, folder)
    (folder / "000002.jpg").unlink()
    ds = CocoDetection(folder, toy.train_ann)
    assert ds[0][0].shape == (3, 80, 112)  # present images still load
    with pytest.raises(ConfigError, match="000002.jpg"):
        ds[2]
