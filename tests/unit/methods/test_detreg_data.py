"""DETReg pseudo targets: top-k proposals, augmentation, crops, collation, determinism."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.config import DETRegOptions
from siamese_detr.data.loaders import SeededSamples
from siamese_detr.methods.detreg.data import (
    DETRegDataset,
    clip_boxes,
    collate_detreg,
    detreg_transforms,
)
from siamese_detr.ops.boxes import box_cxcywh_to_xyxy
from siamese_detr.proposals.store import StoreWriter

H, W, TOPK = 96, 128, 5


@dataclass
class _Rec:
    image_id: str
    path: Path


def _store(tmp_path: Path, n: int = 3):
    rng = np.random.default_rng(0)
    records = []
    writer = StoreWriter(tmp_path / "store", chunk_size=2)
    for i in range(n):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
        records.append(_Rec(f"im{i}.png", path))
        x0 = rng.integers(0, W - 40, 12)
        y0 = rng.integers(0, H - 40, 12)
        boxes = np.stack([x0, y0, x0 + 20 + i, y0 + 30], 1).astype(np.float32)
        boxes[0] = [-10, -5, W + 20, 40]  # sticks out of the image: must be clipped
        scores = np.arange(12, 0, -1, dtype=np.float32)  # already in score order
        writer.add(f"im{i}.png", boxes, scores, (H, W))
    return records, writer.close()


OPTS = DETRegOptions(max_proposals=TOPK, crop_size=16, base_scales=(64, 80), base_max_size=128,
                     crop_scales=(64, 80), crop_range=(48, 80))


def test_proposals_are_the_clipped_top_k(tmp_path: Path) -> None:
    records, store = _store(tmp_path)
    ds = DETRegDataset(records, store, OPTS, seed=0)
    boxes = ds.proposals(1, W, H, np.random.default_rng(0))
    ref, _ = store.get("im1.png", top_k=TOPK)
    assert boxes.shape == (TOPK, 4)
    np.testing.assert_array_equal(boxes[0], [0, 0, W, 40])  # clipped to the image
    np.testing.assert_array_equal(boxes[1:], ref[1:])


def test_clip_boxes_drops_degenerate() -> None:
    b = clip_boxes(np.array([[5, 5, 5.5, 20], [200, 0, 300, 10], [1, 2, 3, 4]]), 50, 100)
    np.testing.assert_array_equal(b, [[1, 2, 3, 4]])


def test_sample_targets_valid_normalised_and_crops_follow_boxes(tmp_path: Path) -> None:
    records, store = _store(tmp_path)
    ds = SeededSamples(DETRegDataset(records, store, OPTS, seed=3), seed=3)
    for pos in range(12):
        s = ds[(pos % 3, pos)]
        assert s is not None
        k = len(s.boxes)
        assert OPTS.min_boxes <= k <= TOPK
        assert s.crops is not None and s.crops.shape == (k, 3, 16, 16)
        assert ((s.boxes >= 0) & (s.boxes <= 1)).all()
        assert (s.boxes[:, 2:] > 0).all()  # positive width and height
        xyxy = box_cxcywh_to_xyxy(s.boxes)
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()  # inside the image
        h, w = s.image.shape[1:]
        # last step is the base resize: short side from base_scales unless the long side hit
        # base_max_size
        assert max(h, w) <= 128 and (min(h, w) in (64, 80) or max(h, w) >= 127), (h, w)


def test_same_position_same_sample_other_position_differs(tmp_path: Path) -> None:
    records, store = _store(tmp_path)
    ds = SeededSamples(DETRegDataset(records, store, OPTS, seed=1), seed=1)
    a, b, c = ds[(0, 7)], ds[(0, 7)], ds[(0, 8)]
    torch.testing.assert_close(a.image, b.image)
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.crops, b.crops)
    assert a.image.shape != c.image.shape or not torch.equal(a.image, c.image)


def test_crop_branch_drops_cut_boxes_with_their_crops() -> None:
    """With the crop branch, boxes outside the crop vanish; crops are indexed alongside."""
    import random

    tf = detreg_transforms(replace(OPTS, crop_range=(20, 20)))
    img = Image.new("RGB", (W, H))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 70.0, 127.0, 95.0]])
    kept = set()
    for s in range(40):
        random.seed(s)
        _, t = tf(img, {"boxes": boxes, "labels": torch.arange(2)})
        kept.add(tuple(t["labels"].tolist()))
    assert (0, 1) in kept and len(kept) > 1  # some crops cut a box away


def test_random_strategy_uses_another_images_boxes(tmp_path: Path) -> None:
    records, store = _store(tmp_path)
    ds = DETRegDataset(records, store, replace(OPTS, strategy="random"), seed=0)
    own, _ = store.get("im0.png", top_k=TOPK)
    got = ds.proposals(0, W, H, np.random.default_rng(0))
    assert not np.array_equal(got[1:], own[1:])
    others = [store.get(r.image_id, top_k=TOPK)[0][1:] for r in records[1:]]
    assert any(np.array_equal(got[1:], o) for o in others)


def test_too_few_boxes_gives_none_and_collate_counts_it(tmp_path: Path) -> None:
    records, store = _store(tmp_path)
    ds = DETRegDataset(records, store, replace(OPTS, min_boxes=TOPK + 1), seed=0)
    assert ds[(0, 0)] is None
    good = DETRegDataset(records, store, OPTS, seed=0, with_crops=False)
    batch = collate_detreg([good[(0, 0)], None, good[(1, 1)]])
    assert len(batch) == 2 and batch.skipped == 1 and batch.crops is None
    assert batch.images.images.shape[0] == 2
    for i, t in enumerate(batch.targets):
        assert t.labels.tolist() == [0] * len(t)
        assert t.size.tolist() == batch.images.sizes[i].tolist()
    assert len(collate_detreg([None, None])) == 0


def test_missing_image_in_store_is_skipped(tmp_path: Path) -> None:
    records, store = _store(tmp_path)
    extra = tmp_path / "new.png"
    Image.new("RGB", (W, H)).save(extra)
    ds = DETRegDataset([*records, _Rec("new.png", extra)], store, OPTS, seed=0)
    assert ds[(3, 0)] is None


def test_options_validate() -> None:
    from siamese_detr.config import ConfigError

    with pytest.raises(ConfigError):
        DETRegOptions(max_proposals=0)
    with pytest.raises(ConfigError):
        DETRegOptions(crop_range=(500, 400))
