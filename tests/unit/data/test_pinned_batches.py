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
