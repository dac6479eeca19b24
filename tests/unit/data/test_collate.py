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


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_pad_images_in_a_worker_builds_the_batch_in_shared_memory(monkeypatch, dtype):
    """In a DataLoader worker the batch is built in shared memory (no copy into it when the
    worker sends it), with the same values as in the main process; padding and mask are
    written explicitly, so memory that does not start zeroed gives the same batch."""
    import siamese_detr.data.collate as collate

    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, h, w, generator=g) * 255).to(dtype)
              for h, w in ((5, 7), (6, 3), (2, 8))]
    ref = pad_images(images)
    assert not ref.images.is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    real = collate._shared_empty

    def dirty(shape, dt):  # shared memory holding garbage
        t = real(shape, dt)
        t.fill_(True if dt == torch.bool else 77)
        return t

    for make in (real, dirty):
        monkeypatch.setattr(collate, "_shared_empty", make)
        out = pad_images(images)
        assert out.images.is_shared() and out.mask.is_shared()
        assert out.images.dtype == dtype and out.images.shape == ref.images.shape
        assert torch.equal(out.images, ref.images) and torch.equal(out.mask, ref.mask)
        assert torch.equal(out.sizes, ref.sizes)


def test_stack_batch_in_a_worker_stacks_into_shared_memory(monkeypatch):
    import siamese_detr.data.collate as collate

    xs = [torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8) for _ in range(3)]
    assert not collate.stack_batch(xs).is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    out = collate.stack_batch(xs)
    assert out.is_shared() and torch.equal(out, torch.stack(xs))
