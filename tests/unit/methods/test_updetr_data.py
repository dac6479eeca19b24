"""UP-DETR data: random query patches, their boxes and crops, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.config import UPDETROptions
from siamese_detr.methods.siamese.views import to_normalised_tensor
from siamese_detr.methods.updetr.data import (
    UPDETRDataset,
    collate_updetr,
    crop_patches,
    sample_patch_boxes,
    sample_updetr,
)
from siamese_detr.methods.updetr.task import patch_targets
from siamese_detr.ops.boxes import box_cxcywh_to_xyxy

OPTS = UPDETROptions(num_patches=6, patch_size=16, min_patch=8, base_scales=(48, 64),
                     base_max_size=96)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w,h", [(17, 40), (40, 17), (100, 60), (600, 31)])
def test_patch_boxes_inside_image_with_min_side(w: int, h: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        boxes = sample_patch_boxes(w, h, 10, 8, rng)
        assert boxes is not None and boxes.shape == (10, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        sides = boxes[:, 2:] - boxes[:, :2]
        assert (sides >= 8).all() and (sides[:, 0] <= w - 8).all() and (sides[:, 1] <= h - 8).all()
        assert np.array_equal(boxes, np.round(boxes))  # integer pixel boxes, as upstream


def test_patch_sides_cover_the_whole_allowed_range() -> None:
    """Upstream draws the side uniformly in [min, w - min] inclusive: both ends occur."""
    boxes = sample_patch_boxes(20, 20, 2000, 8, np.random.default_rng(1))
    assert boxes is not None
    assert set(np.unique(boxes[:, 2] - boxes[:, 0]).tolist()) == {8.0, 9.0, 10.0, 11.0, 12.0}


@pytest.mark.parametrize("w,h", [(16, 100), (100, 16), (5, 5)])
def test_too_small_image_gives_none(w: int, h: int) -> None:
    assert sample_patch_boxes(w, h, 4, 8, np.random.default_rng(0)) is None
    assert sample_updetr(_image(w, h), OPTS, np.random.default_rng(0)) is None


def test_crop_without_augmentation_is_the_image_region() -> None:
    img = _image(64, 48)
    boxes = np.array([[8.0, 4.0, 24.0, 20.0], [0.0, 0.0, 64.0, 48.0]])
    crops, colour = crop_patches(img, boxes, 16, rng=None)
    assert colour is None
    assert crops.shape == (2, 3, 16, 16)
    torch.testing.assert_close(crops[0], to_normalised_tensor(img.crop((8, 4, 24, 20))),
                               atol=1e-5, rtol=0)


def test_sample_boxes_follow_the_resize_and_normalise_as_targets() -> None:
    img = _image(120, 80)
    sample = sample_updetr(img, OPTS, np.random.default_rng(3))
    assert sample is not None
    _, H, W = sample.image.shape
    assert min(H, W) in OPTS.base_scales and max(H, W) <= OPTS.base_max_size
    assert sample.patches.shape == (6, 3, 16, 16) and sample.boxes.shape == (6, 4)
    # the same rng draws the same original-pixel boxes first
    orig = sample_patch_boxes(120, 80, 6, 8, np.random.default_rng(3))
    assert orig is not None
    expected = torch.from_numpy(orig * np.array([W / 120, H / 80] * 2)).float()
    torch.testing.assert_close(sample.boxes, expected)
    # as targets: normalised cxcywh in [0, 1] with positive area, back to the same pixels
    (t,) = patch_targets(sample.boxes[None], torch.tensor([[H, W]]))
    assert (t.boxes >= 0).all() and (t.boxes <= 1).all() and (t.boxes[:, 2:] > 0).all()
    assert t.labels.tolist() == [0] * 6
    back = box_cxcywh_to_xyxy(t.boxes) * torch.tensor([W, H, W, H])
    torch.testing.assert_close(back, sample.boxes, atol=1e-4, rtol=0)


def test_dataset_is_a_function_of_index_and_position(tmp_path) -> None:
    from types import SimpleNamespace

    paths = []
    for i, (w, h) in enumerate([(90, 70), (12, 50), (70, 90)]):
        paths.append(tmp_path / f"{i}.png")
        _image(w, h, seed=i).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    records = [SimpleNamespace(image_id=p.stem, path=p) for p in [*paths, tmp_path / "bad.png"]]
    ds = UPDETRDataset(records, OPTS, seed=5)
    a, b, c = ds[(0, 7)], ds[(0, 7)], ds[(0, 8)]
    assert a is not None and b is not None and c is not None
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.patches, b.patches)
    assert not torch.equal(a.boxes, c.boxes)
    assert ds[1] is None and ds[3] is None  # too small / unreadable: skipped, no exception
    batch = collate_updetr([ds[0], ds[1], ds[2], ds[3]])
    assert len(batch) == 2 and batch.skipped == 2 and batch.image_ids == ["0", "2"]
    assert batch.boxes.shape == (2, 6, 4) and batch.patches.shape == (2, 6, 3, 16, 16)
    for i, s in enumerate([ds[0], ds[2]]):
        assert s is not None
        h, w = s.image.shape[1:]
        assert batch.images.sizes[i].tolist() == [h, w]
        assert not batch.images.mask[i, :h, :w].any() and batch.images.mask[i].sum() == (
            batch.images.mask.shape[1] * batch.images.mask.shape[2] - h * w)
    empty = collate_updetr([None, None])
    assert len(empty) == 0 and empty.skipped == 2
