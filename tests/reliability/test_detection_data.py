"""Items 5 and 6: a COCO-format data set is validated when loaded, with one line per kind of
problem (count + first ids); unusable boxes follow one rule in training and evaluation; an
unreadable image is skipped and counted, never a traceback."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.data.coco import CocoDetection


def _write(tmp_path, anns, images=None, extra_files=()):
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    images = images or [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30}
                        for i in (1, 2, 3)]
    for im in images:
        if im["file_name"] not in extra_files:
            Image.fromarray(np.full((30, 40, 3), 120, np.uint8)).save(folder / im["file_name"])
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return folder, tmp_path / "ann.json"


def _ann(i, image_id=1, bbox=(2, 3, 10, 8), cat=1):
    a = {"id": i, "image_id": image_id, "category_id": cat, "iscrowd": 0, "area": 80.0}
    if bbox is not None:
        a["bbox"] = list(bbox)
    return a


def test_bad_annotations_are_counted_and_dropped_in_training_and_evaluation(tmp_path, caplog):
    anns = [_ann(1), _ann(2, bbox=None), _ann(3, cat=None), _ann(4, image_id=99),
            _ann(5, bbox=(5, 5, -3, 4)), _ann(6, bbox=(5, 5, 0, 4)), _ann(7, bbox=(50, 5, 4, 4)),
            _ann(8, image_id=2)]
    folder, ann = _write(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="siamese_detr"):
        ds = CocoDetection(folder, ann)
    lines = [r.getMessage() for r in caplog.records]
    assert f"{ann}: 1 annotations without a valid bbox [x, y, w, h] dropped from training and " \
        "evaluation (e.g. 2)" in lines
    assert any("1 annotations whose category_id is missing, null or not an integer" in m
               and m.endswith("(e.g. 3)") for m in lines)
    assert any("1 annotations pointing to an image id that is not listed" in m for m in lines)
    assert any("3 boxes of zero or negative size (after clipping to the image) dropped from "
               "training and evaluation (e.g. 5, 6, 7)" in m for m in lines)
    # the evaluation ground truth (dataset.coco) and the training targets agree
    assert sorted(ds.coco.anns) == [1, 8]
    _, target = ds[0]
    assert len(target.boxes) == 1


def test_every_box_bad_is_an_error(tmp_path, capsys):
    from siamese_detr.errors import DataError

    folder, ann = _write(tmp_path, [_ann(1, bbox=(5, 5, 0, 0)), _ann(2, bbox=(1, 1, -2, 3))])
    with pytest.raises(DataError, match=r"none of its 2 annotations is usable \(2 boxes of "
                                        r"zero or negative size"):
        CocoDetection(folder, ann)


def test_no_images_key_is_one_line(tmp_path):
    from siamese_detr.errors import ConfigError

    (tmp_path / "img").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(ConfigError, match="lists no images"):
        CocoDetection(tmp_path / "img", tmp_path / "a.json")


def test_unreadable_images_are_counted_not_fatal(tmp_path, caplog):
    from siamese_detr.data.collate import collate_detection

    folder, ann = _write(tmp_path, [_ann(1), _ann(2, image_id=2), _ann(3, image_id=3)],
                         extra_files=("2.png", "3.png"))
    (folder / "2.png").write_bytes(b"")  # zero bytes: found at load
    good = (folder / "1.png").read_bytes()
    (folder / "3.png").write_bytes(good[: len(good) // 2])  # truncated: found when decoded
    with caplog.at_level(logging.WARNING, logger="siamese_detr"):
        ds = CocoDetection(folder, ann)
        samples = [ds[i] for i in range(len(ds))]
    assert ds.ids == [1, 3]
    assert any("1 empty image files (0 bytes) dropped" in r.getMessage() and "2.png" in
               r.getMessage() for r in caplog.records)
    assert samples[1] is None
    batch = collate_detection(samples)
    assert len(batch[0]) == 1 and batch.skipped == 1
    assert batch.skip_reasons == {"unreadable image": 1}
    empty = collate_detection([None])
    assert len(empty[0]) == 0 and empty.skipped == 1
    assert isinstance(batch[0].images, torch.Tensor)
