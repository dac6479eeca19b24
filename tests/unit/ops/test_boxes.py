"""Box conversions and overlaps against hand-computed values."""

import pytest
import torch

from siamese_detr.ops.boxes import (
    batched_generalized_box_iou,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    clip_xyxy,
    denormalize_cxcywh,
    generalized_box_iou,
    jitter_xyxy,
    normalize_xyxy,
)


def test_conversions_by_hand():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    cxcywh = torch.tensor([[20.0, 40.0, 20.0, 40.0]])
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.equal(box_cxcywh_to_xyxy(cxcywh), xyxy)


def test_normalise_round_trip_and_values():
    xyxy = torch.tensor([[0.0, 0.0, 50.0, 100.0], [25.0, 50.0, 75.0, 150.0]])
    n = normalize_xyxy(xyxy, height=200, width=100)
    assert torch.allclose(n, torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(denormalize_cxcywh(n, 200, 100), xyxy)
    batched = denormalize_cxcywh(n[None].repeat(2, 1, 1), torch.tensor([200.0, 100.0]),
                                 torch.tensor([100.0, 50.0]))
    assert torch.allclose(batched[0], xyxy) and torch.allclose(batched[1], xyxy / 2)


def test_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    # overlap 1, union 7; hull 9 -> giou = 1/7 - (9-7)/9
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
    expected = torch.tensor([[1 / 7 - 2 / 9, 1.0, 0.0 - (8 - 5) / 8]])
    assert torch.allclose(generalized_box_iou(a, b), expected)


def test_clip_and_jitter():
    boxes = torch.tensor([[-5.0, 2.0, 120.0, 50.0]])
    assert torch.equal(clip_xyxy(boxes, 40, 100), torch.tensor([[0.0, 2.0, 100.0, 40.0]]))
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([[10.0, 10.0, 30.0, 50.0]]).repeat(1000, 1)
    j = jitter_xyxy(base, 0.1, generator=g)
    d = (j - base).abs()
    assert (d[:, 0] < 0.1 * 20 + 1e-6).all() and (d[:, 1] < 0.1 * 40 + 1e-6).all()
    assert d.max() > 0.5  # it does move
    assert torch.equal(jitter_xyxy(base, 0.0), base)


@pytest.mark.parametrize("seed", range(3))
def test_giou_bounds_random(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(20, 2, generator=g)
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g) + 0.01], 1)
    giou = generalized_box_iou(boxes, boxes)
    assert torch.allclose(torch.diagonal(giou), torch.ones(20))
    assert (giou <= 1 + 1e-6).all() and (giou >= -1 - 1e-6).all()


def test_batched_giou_is_torchvisions_bitwise_per_batch_entry():
    """The matcher's per-image cost blocks use the broadcast GIoU; it must give exactly
    torchvision's 2-D values, for a plain 2-D call and for every entry of a batched one (the
    hand-made boxes above included)."""
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    assert torch.equal(batched_generalized_box_iou(a, b), generalized_box_iou(a, b))
    g = torch.Generator().manual_seed(5)

    def boxes(*shape: int) -> torch.Tensor:
        xy = torch.rand(*shape, 2, generator=g)
        return torch.cat([xy, xy + torch.rand(*shape, 2, generator=g) * 0.5 + 1e-3], -1)

    preds, tgts = boxes(3, 4, 9), boxes(4, 6)  # [L, B, N, 4] against [B, T, 4]
    out = batched_generalized_box_iou(preds, tgts)
    assert out.shape == (3, 4, 9, 6)
    for layer in range(3):
        for i in range(4):
            assert torch.equal(out[layer, i], generalized_box_iou(preds[layer, i], tgts[i]))


def test_paired_giou_loss_equals_torchvision_without_a_host_read():
    """``1 - GIoU`` of paired boxes: torchvision's values and gradients (overlapping,
    disjoint, touching, nested and identical pairs), with no boolean-mask indexing, which syncs
    on a GPU and breaks a CUDA graph capture."""
    from torchvision.ops import generalized_box_iou_loss

    from siamese_detr.engine.profiling import OpCounter
    from siamese_detr.ops.boxes import paired_generalized_box_iou_loss

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 64, 2, generator=g)
    wh = torch.rand(3, 64, 2, generator=g) * 0.5 + 0.01
    a = torch.cat([xy, xy + wh], -1)
    xy2 = torch.rand(3, 64, 2, generator=g)
    b = torch.cat([xy2, xy2 + torch.rand(3, 64, 2, generator=g) * 0.5 + 0.01], -1)
    fixed = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0],   # touching
                          [0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.4],   # nested
                          [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0],   # identical
                          [0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 4.0, 5.0]])  # disjoint
    a = torch.cat([a.reshape(-1, 4), fixed[0::2]])
    b = torch.cat([b.reshape(-1, 4), fixed[1::2]])
    for eps in (0.0, 1e-7):
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        with OpCounter() as c:
            ours = paired_generalized_box_iou_loss(a1, b1, eps=eps)
        ref = generalized_box_iou_loss(a2, b2, reduction="none", eps=eps)
        assert torch.equal(ours, ref)
        assert c.op_names["nonzero"] == 0 and c.op_names["index_put_"] == 0
        w = torch.rand(ours.shape, generator=g)
        (ours * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-6, atol=1e-7)
    assert float(ours[-4].detach()) == pytest.approx(1.0, abs=1e-6)  # touching: IoU 0, hull = union
    assert float(ours[-2].detach()) == pytest.approx(0.0, abs=1e-6)  # identical
