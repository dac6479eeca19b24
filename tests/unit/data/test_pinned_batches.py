"""Training loaders pin their batches for CUDA (needs a GPU: skipped on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from siamese_detr.data.collate import collate_detection
from siamese_detr.data.loaders import build_detection_loader
from siamese_detr.structures import BoxTargets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")


class Tiny(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.full((3, 8, 8), float(i)), BoxTargets(torch.rand(1, 4), torch.tensor([i]))


def test_detection_batches_are_pinned_and_unchanged():
    plain = next(build_detection_loader(Tiny(), 2, 0, seed=0, collate_fn=collate_detection))
    images, targets = next(build_detection_loader(Tiny(), 2, 0, seed=0, pin_memory=True))
    assert images.images.is_pinned() and images.mask.is_pinned()
    assert all(t.boxes.is_pinned() and t.labels.is_pinned() for t in targets)
    assert torch.equal(images.images, plain[0].images)
    assert [t.labels.tolist() for t in targets] == [t.labels.tolist() for t in plain[1]]


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _tensors(getattr(obj, f))]
    return []


@pytest.mark.parametrize("method", ["detreg", "updetr", "siamese", "siamese_render"])
def test_pretext_batches_pin_every_tensor(method):
    """DETReg, UP-DETR and Siamese DETR batches (the device-augmentation parameters too, and
    the view sources of ``view_resize_on=device``)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
    sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
    if method == "siamese":
        batch = importlib.import_module("test_host_syncs")._deferred_siamese_batches(1)[0]
    elif method == "siamese_render":
        from siamese_detr.methods.siamese.data import collate_siamese

        pair = importlib.import_module("test_siamese_render")._pair
        batch = collate_siamese([pair("coffee", 0)[1], pair("rocket", 1)[1]])
        assert batch.deferred.source is not None
    else:
        batch = importlib.import_module(f"test_{method}_task").make_batch()
        if method == "detreg":
            batch.crop_colour = [torch.zeros(len(c), 11) for c in batch.crops]
        else:
            batch.patch_colour = torch.zeros(*batch.patches.shape[:2], 11)
    pinned = batch.pin_memory()
    before, after = _tensors(batch), _tensors(pinned)
    assert len(after) == len(before) > 3
    assert all(t.is_pinned() for t in after)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
