"""Joint image + box transforms (DETR semantics)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from siamese_detr.config import DataConfig
from siamese_detr.data import transforms as T


def _image(h: int, w: int, value: int = 128) -> Image.Image:
    return Image.new("RGB", (w, h), (value, value, value))


def _target(boxes: list[list[float]], labels: list[int] | None = None) -> dict:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = labels if labels is not None else list(range(len(b)))
    return {
        "boxes": b,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
        "iscrowd": torch.zeros(len(b), dtype=torch.int64),
    }


@pytest.mark.parametrize(
    ("hw", "size", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1066)),  # landscape, long side truncated
        ((640, 480), 800, 1333, (1066, 800)),  # portrait
        ((480, 1500), 800, 1333, (427, 1334)),  # capped: short = round(1333*480/1500) = 427
        ((800, 1000), 800, 1333, (800, 1000)),  # already right: unchanged
        ((100, 100), 64, None, (64, 64)),
    ],
)
def test_get_size_detr_rule(hw, size, max_size, expected):
    assert T.get_size(hw, size, max_size) == expected


def test_hflip_known_values_and_twice_is_identity():
    img = Image.new("RGB", (100, 50))
    img.putpixel((0, 0), (255, 0, 0))
    target = _target([[10, 20, 30, 40], [0, 0, 100, 50]])
    flipped, t1 = T.hflip(img, target)
    assert torch.equal(t1["boxes"], torch.tensor([[70.0, 20, 90, 40], [0, 0, 100, 50]]))
    assert flipped.getpixel((99, 0)) == (255, 0, 0)
    back, t2 = T.hflip(flipped, t1)
    assert torch.equal(t2["boxes"], target["boxes"])
    assert back.getpixel((0, 0)) == (255, 0, 0)


def test_resize_scales_boxes_and_area_by_hand_factors():
    img = _image(100, 200)
    target = _target([[10, 20, 50, 60]])
    out, t = T.resize(img, target, 50)  # short side 100 -> 50: factor 0.5 both ways
    assert (out.height, out.width) == (50, 100)
    assert torch.allclose(t["boxes"], torch.tensor([[5.0, 10, 25, 30]]))
    assert torch.allclose(t["area"], torch.tensor([1600 * 0.25]))
    assert t["size"].tolist() == [50, 100]
    # exact (h, w): independent factors 0.3 (y) and 0.2 (x)
    out, t = T.resize(img, target, (30, 40))
    assert (out.height, out.width) == (30, 40)
    assert torch.allclose(t["boxes"], torch.tensor([[2.0, 6, 10, 18]]))
    # with a max size: 100x200, size 80, max 120 -> short side round(120*100/200) = 60
    out, t = T.resize(img, target, 80, max_size=120)
    assert (out.height, out.width) == (60, 120)
    assert torch.allclose(t["boxes"], target["boxes"] * 0.6)


def test_crop_clips_boxes_and_drops_empty_ones():
    img = _image(100, 100)
    target = _target(
        [[0, 0, 40, 40], [15, 15, 25, 25], [80, 80, 95, 95], [30, 0, 50, 10]],
        labels=[1, 2, 3, 4],
    )
    out, t = T.crop(img, target, (10, 20, 50, 60))  # top, left, h, w
    assert (out.height, out.width) == (50, 60)
    # box 0 clipped to the crop; 1 shifted; 2 outside -> gone; 3 touches only y<=10 -> gone
    assert torch.equal(t["boxes"], torch.tensor([[0.0, 0, 20, 30], [0, 5, 5, 15]]))
    assert t["labels"].tolist() == [1, 2]
    assert torch.equal(t["area"], torch.tensor([600.0, 50.0]))
    assert t["iscrowd"].tolist() == [0, 0]
    assert t["size"].tolist() == [50, 60]


def test_random_size_crop_keeps_boxes_inside():
    random.seed(0)
    img = _image(120, 160)
    target = _target([[5, 5, 60, 70], [50, 40, 150, 110], [100, 0, 160, 30]])
    sizes = set()
    for _ in range(50):
        out, t = T.RandomSizeCrop(40, 100)(img, target)
        h, w = out.height, out.width
        sizes.add((h, w))
        assert 40 <= h <= 100 and 40 <= w <= 100
        b = t["boxes"]
        assert (b >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert len(t["labels"]) == len(b) == len(t["area"])
    assert len(sizes) > 5


def test_normalize_gives_cxcywh_relative_to_size():
    mean = [int(round(m * 255)) for m in T.IMAGENET_MEAN]
    img = Image.new("RGB", (200, 100), tuple(mean))
    target = _target([[10, 20, 50, 60]])
    x, t = T.Compose([T.ToTensor(), T.Normalize()])(img, target)
    assert x.shape == (3, 100, 200) and x.dtype == torch.float32
    assert x.abs().max() < 0.02  # the mean colour maps to ~0
    expected = torch.tensor([[30 / 200, 40 / 100, 40 / 200, 40 / 100]])
    assert torch.allclose(t["boxes"], expected)
    assert t["size"].tolist() == [100, 200]


def test_eval_pipeline_resizes_with_val_size_and_max_size():
    cfg = DataConfig(val_size=64, max_size=100)
    tf = T.build_transforms(cfg, train=False)
    img = _image(48, 96)
    x, t = tf(img, _target([[0, 0, 96, 48]]))
    assert x.shape == (3, 50, 100)  # 96/48*64 > 100 -> short side round(100*48/96) = 50
    assert torch.allclose(t["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def test_detr_train_pipeline_boxes_stay_normalised_and_is_seedable():
    cfg = DataConfig(augment="detr", train_scales=(64, 80), crop_scales=(60, 70),
                     crop_size=(30, 50), max_size=120)
    tf = T.build_transforms(cfg, train=True)
    img = _image(90, 120)
    target = _target([[10, 10, 60, 50], [70, 30, 110, 80]])
    shapes = set()
    for seed in range(30):
        random.seed(seed)
        x, t = tf(img, target)
        random.seed(seed)
        x2, t2 = tf(img, target)
        assert torch.equal(x, x2) and torch.equal(t["boxes"], t2["boxes"])
        shapes.add(tuple(x.shape))
        b = t["boxes"]
        assert ((b >= 0) & (b <= 1)).all()
        xyxy = torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
        assert min(x.shape[1:]) <= 80 and max(x.shape[1:]) <= 120
    assert len(shapes) > 2  # multi-scale + crop really vary the size


def test_fixed_and_none_pipelines():
    cfg = DataConfig(augment="fixed", val_size=60, max_size=200)
    x, _ = T.build_transforms(cfg, train=True)(_image(90, 120), _target([[0, 0, 10, 10]]))
    assert x.shape == (3, 60, 80)
    cfg = DataConfig(augment="none")
    x, t = T.build_transforms(cfg, train=True)(_image(90, 120), _target([[0, 0, 12, 9]]))
    assert x.shape == (3, 90, 120)
    assert torch.allclose(t["boxes"], torch.tensor([[0.05, 0.05, 0.1, 0.1]]))


def test_uint8_handover_equals_normalising_in_the_worker():
    """``ToUint8Tensor() + NormalizeBoxes()`` in the worker, ``ImageBatch.normalised`` on the
    device: the bits of ``ToTensor() + Normalize()``, padding zero in both."""
    import numpy as np

    from siamese_detr.data.collate import pad_images

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((20, 30), (26, 18))]
    target = _target([[2.0, 3.0, 12.0, 15.0], [0.0, 0.0, 18.0, 20.0]])
    old = [T.Compose([T.ToTensor(), T.Normalize()])(im, target) for im in images]
    new = [T.Compose([T.ToUint8Tensor(), T.NormalizeBoxes()])(im, target) for im in images]
    for (_, ta), (b, tb) in zip(old, new):
        assert b.dtype == torch.uint8
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["size"], tb["size"])
    padded_old = pad_images([a for a, _ in old])
    padded_new = pad_images([b for b, _ in new]).normalised()
    assert torch.equal(padded_old.mask, padded_new.mask)
    assert torch.equal(padded_old.images, padded_new.images)
