"""Padding of variable-size images into an ImageBatch."""

from __future__ import annotations

import pytest
import torch

from siamese_detr.data.collate import collate_detection, pad_images
from siamese_detr.structures import BoxTargets


def test_pad_images_mask_sizes_and_content():
    a = torch.arange(1, 1 + 3 * 2 * 3, dtype=torch.float32).reshape(3, 2, 3)
    b = -torch.arange(1, 1 + 3 * 4 * 1, dtype=torch.float32).reshape(3, 4, 1)
    batch = pad_images([a, b])
    assert batch.images.shape == (2, 3, 4, 3)
    assert batch.sizes.tolist() == [[2, 3], [4, 1]]
    assert batch.sizes.dtype == torch.int64
    expected_mask = torch.tensor(
        [
            [[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]],
            [[0, 1, 1], [0, 1, 1], [0, 1, 1], [0, 1, 1]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(batch.mask, expected_mask)
    assert torch.equal(batch.images[0, :, :2, :3], a)
    assert torch.equal(batch.images[1, :, :4, :1], b)
    # padding is exactly zero
    assert (batch.images.permute(1, 0, 2, 3)[:, batch.mask] == 0).all()
    assert len(batch) == 2


def test_pad_images_same_size_has_no_padding():
    imgs = [torch.rand(3, 5, 7) for _ in range(3)]
    batch = pad_images(imgs)
    assert not batch.mask.any()
    assert torch.equal(batch.images, torch.stack(imgs))


def test_pad_images_rejects_bad_input():
    with pytest.raises(ValueError):
        pad_images([])
    with pytest.raises(ValueError):
        pad_images([torch.rand(3, 4, 4), torch.rand(1, 4, 4)])


def test_collate_detection_keeps_targets_in_order():
    t1 = BoxTargets(boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2]]), labels=torch.tensor([1]),
                    image_id=7)
    t2 = BoxTargets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                    image_id=9)
    batch, targets = collate_detection([(torch.ones(3, 4, 6), t1), (torch.ones(3, 6, 4), t2)])
    assert batch.images.shape == (2, 3, 6, 6)
    assert [t.image_id for t in targets] == [7, 9]
    assert targets[0] is t1
    assert batch.mask[0, 4:].all() and not batch.mask[0, :4].any()
