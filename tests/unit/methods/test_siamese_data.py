"""Siamese DETR pretraining dataset, collation and drawing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.config import ProposalReadConfig, SiameseOptions
from siamese_detr.data.loaders import PositionedSampler
from siamese_detr.methods.siamese.data import (
    PretrainDataset,
    collate_siamese,
    draw_views,
)
from siamese_detr.methods.siamese.views import SiameseSample

OPTS = SiameseOptions(base_scales=(96, 112), base_max_size=160, crop_size=16, num_regions=4)


@dataclass(frozen=True)
class Record:
    image_id: str
    path: Path


class FakeStore:
    """Duck-typed ProposalStore: ``get`` returns boxes in score order, records its calls."""

    def __init__(self, boxes: dict[str, np.ndarray]) -> None:
        self.boxes = boxes
        self.calls: list[dict] = []

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.boxes

    def get(self, image_id, top_k=None, min_size=0.0, min_score=float("-inf")):
        self.calls.append(dict(image_id=image_id, top_k=top_k, min_size=min_size,
                               min_score=min_score))
        b = self.boxes[image_id][:top_k]
        return b.astype(np.float32), np.linspace(1, 0, len(b), dtype=np.float32)


def _write_image(path: Path, w: int, h: int, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def _props(w: int, h: int) -> np.ndarray:
    return np.array([[0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h], [0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h],
                     [0.0, 0.0, w, h]], np.float32)


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[list[Record], FakeStore]:
    _write_image(tmp_path / "good.jpg", 150, 120, 0)
    _write_image(tmp_path / "good2.png", 110, 140, 1)
    good = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    _write_image(tmp_path / "noprops.jpg", 150, 120, 2)
    records = [Record("good.jpg", tmp_path / "good.jpg"),
               Record("corrupt.jpg", tmp_path / "corrupt.jpg"),
               Record("noprops.jpg", tmp_path / "noprops.jpg"),
               Record("good2.png", tmp_path / "good2.png")]
    store = FakeStore({"good.jpg": _props(150, 120), "corrupt.jpg": _props(150, 120),
                       "good2.png": _props(110, 140)})
    return records, store


def _fake_sample(h: int, w: int, m: int = 4, c: int = 8, crops: bool = True) -> SiameseSample:
    boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2]] * m)
    return SiameseSample(
        view1=torch.randn(3, h, w) + 5, view2=torch.randn(3, h, w) - 5,
        boxes1=boxes, boxes2=boxes + 1,
        crops1=torch.randn(m, 3, c, c) if crops else None,
        crops2=torch.randn(m, 3, c, c) if crops else None, image_id=f"{h}x{w}")


def test_collate_pads_both_views_to_one_size() -> None:
    a, b = _fake_sample(40, 50), _fake_sample(60, 30)
    batch = collate_siamese([a, None, b])
    assert batch.skipped == 1 and len(batch) == 2 and batch.image_ids == ["40x50", "60x30"]
    for vb in (batch.view1, batch.view2):
        assert vb.images.shape == (2, 3, 60, 50) and vb.mask.shape == (2, 60, 50)
        assert vb.sizes.tolist() == [[40, 50], [60, 30]]
        assert not vb.mask[0, :40, :50].any() and vb.mask[0, 40:].all() and vb.mask[0, :, 50:].all()
        assert not vb.mask[1, :, :30].any() and vb.mask[1, :, 30:].all()
        assert (vb.images[0, :, 40:] == 0).all() and (vb.images[1, :, :, 30:] == 0).all()
    assert torch.equal(batch.view1.images[0, :, :40, :50], a.view1)
    assert torch.equal(batch.view2.images[1, :, :60, :30], b.view2)
    assert batch.boxes1.shape == (2, 4, 4) and torch.equal(batch.boxes2[1], b.boxes2)
    assert batch.crops1.shape == (2, 4, 3, 8, 8) and torch.equal(batch.crops2[0], a.crops2)
    moved = batch.to("cpu")
    assert torch.equal(moved.view1.mask, batch.view1.mask) and moved.skipped == 1


def test_uint8_batch_normalised_on_device_equals_normalising_in_the_worker() -> None:
    """Workers send uint8 views and crops; ``normalised()`` gives the very bits the former
    float pipeline gave (normalise each image, then pad with zeros), padding included."""
    from siamese_detr.data.collate import pad_images
    from siamese_detr.methods.siamese.views import normalise_uint8, to_normalised_tensor

    g = torch.Generator().manual_seed(0)
    samples = []
    for h, w in ((40, 50), (60, 30)):
        def u8(*shape):
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2]] * 4)
        samples.append(SiameseSample(view1=u8(3, h, w), view2=u8(3, h, w), boxes1=boxes,
                                     boxes2=boxes + 1, crops1=u8(4, 3, 8, 8),
                                     crops2=u8(4, 3, 8, 8), image_id=f"{h}x{w}"))
    batch = collate_siamese(samples)
    assert batch.view1.images.dtype == torch.uint8 and batch.crops1.dtype == torch.uint8
    norm = batch.pin_memory().normalised() if torch.cuda.is_available() else batch.normalised()
    old = pad_images([to_normalised_tensor(Image.fromarray(s.view1.permute(1, 2, 0).numpy()))
                      for s in samples])
    assert norm.view1.images.dtype == torch.float32
    assert torch.equal(norm.view1.images, old.images)  # bit-exact, zero on padding
    assert torch.equal(norm.view1.mask, batch.view1.mask)
    assert (norm.view2.images[0, :, 40:] == 0).all()
    ref_crops = torch.stack([torch.stack([to_normalised_tensor(Image.fromarray(
        c.permute(1, 2, 0).numpy())) for c in s.crops2]) for s in samples])
    assert torch.equal(norm.crops2, ref_crops)
    assert torch.equal(normalise_uint8(batch.crops1), norm.crops1)
    assert norm.normalised() is norm  # a float batch is left as it is


def test_collate_without_crops_and_all_none() -> None:
    batch = collate_siamese([_fake_sample(20, 20, crops=False)])
    assert batch.crops1 is None and batch.crops2 is None
    empty = collate_siamese([None, None, None])
    assert len(empty) == 0 and empty.skipped == 3
    assert empty.view1.images.shape[0] == 0 and empty.boxes1.shape[0] == 0


def test_dataset_skips_bad_data(setup, caplog) -> None:
    records, store = setup
    cfg = ProposalReadConfig(top_k=2, min_size=3.0, min_score=0.1)
    ds = PretrainDataset(records, store, OPTS, seed=1, proposals_cfg=cfg)
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(4)]
        assert ds[1] is None and ds[2] is None  # again: no second warning
    assert samples[1] is None and samples[2] is None
    assert samples[0] is not None and samples[3] is not None
    assert samples[0].image_id == "good.jpg"
    warned = [r.getMessage() for r in caplog.records]
    assert sum("corrupt.jpg" in m for m in warned) == 1
    assert sum("noprops.jpg" in m for m in warned) == 1
    call = store.calls[0]
    assert (call["top_k"], call["min_size"], call["min_score"]) == (2, 3.0, 0.1)
    batch = collate_siamese(samples)
    assert batch.skipped == 2 and batch.image_ids == ["good.jpg", "good2.png"]
    H = max(samples[0].view1.shape[1], samples[3].view1.shape[1])
    W = max(samples[0].view1.shape[2], samples[3].view1.shape[2])
    assert batch.view1.images.shape == (2, 3, H, W) == batch.view2.images.shape
    assert batch.boxes1.shape == (2, 4, 4) and batch.crops1.shape == (2, 4, 3, 16, 16)


def test_dataset_determinism_by_seed_index_position(setup) -> None:
    records, store = setup
    ds = PretrainDataset(records, store, OPTS, seed=3)
    same = PretrainDataset(records, store, OPTS, seed=3)
    other_seed = PretrainDataset(records, store, OPTS, seed=4)
    a, b = ds[(0, 5)], same[(0, 5)]
    for name in ("view1", "view2", "boxes1", "boxes2", "crops1", "crops2"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(ds[0].view1, ds[(0, 0)].view1)

    def differs(x: SiameseSample, y: SiameseSample) -> bool:
        return x.view1.shape != y.view1.shape or not torch.equal(x.view1, y.view1)

    assert differs(a, ds[(0, 6)])
    assert differs(a, other_seed[(0, 5)])


def test_positioned_sampler_counts_from_start() -> None:
    assert list(PositionedSampler([4, 2, 9], start=10)) == [(4, 10), (2, 11), (9, 12)]


def test_random_box_source_needs_no_store(setup) -> None:
    records, _ = setup
    from dataclasses import replace

    ds = PretrainDataset(records, None, replace(OPTS, box_source="random"), seed=0)
    s = ds[2]  # has no proposals, but random boxes do not need any
    assert s is not None and s.boxes1.shape == (4, 4)
    with pytest.raises(ValueError):
        PretrainDataset(records, None, OPTS, seed=0)


def test_draw_views_marks_regions(setup, tmp_path: Path) -> None:
    records, store = setup
    s = PretrainDataset(records, store, OPTS, seed=0)[0]
    out = draw_views(s, tmp_path / "demo" / "views.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    H, W = s.view1.shape[1:]
    assert img.shape == (H, 2 * W + 8, 3)
    x0, y0, x1, y1 = s.boxes1[0].tolist()  # region 0 outline, thick, in palette colour 0
    row = img[int((y0 + y1) / 2), int(round(x0)) : int(round(x0)) + 2]
    assert (np.abs(row.astype(int) - [255, 25, 25]).max(axis=-1) <= 2).any()


def test_dataloader_with_positions_is_resumable(setup) -> None:
    from torch.utils.data import DataLoader

    records, store = setup
    ds = PretrainDataset(records, store, OPTS, seed=5)
    order = [0, 3, 0, 3]

    def loader(start: int) -> DataLoader:
        return DataLoader(ds, batch_size=2, collate_fn=collate_siamese,
                          sampler=PositionedSampler(order[start:], start=start))

    full = list(loader(0))
    resumed = list(loader(2))
    assert len(full) == 2 and len(resumed) == 1
    assert torch.equal(full[1].view1.images, resumed[0].view1.images)
    assert torch.equal(full[1].boxes2, resumed[0].boxes2)
    # the same image at a later stream position gets a different sample
    assert not torch.equal(full[0].boxes1[0], full[1].boxes1[0])
