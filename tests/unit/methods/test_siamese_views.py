"""Siamese DETR view sampling (method.md section 2.1-2.2)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.config import SiameseOptions
from siamese_detr.methods.siamese.views import (
    ViewGeometry,
    detr_resize_size,
    image_to_view,
    normalise_uint8,
    plan_views,
    region_boxes,
    sample_outer_rect,
    sample_views,
    two_view_boxes,
    view_to_image,
)

OPTS = SiameseOptions(base_scales=(96, 112), base_max_size=160, crop_size=16)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _noise_image(w: int = 150, h: int = 120, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _proposals(w: int = 150, h: int = 120) -> np.ndarray:
    return np.array(
        [[0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h], [0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h],
         [0.4 * w, 0.1 * h, 0.95 * w, 0.8 * h], [0.0, 0.0, w, h]], dtype=np.float32)


def test_detr_resize_rule() -> None:
    assert detr_resize_size(500, 375, 480, 600) == (450, 600)  # capped: round(600*375/500)
    assert detr_resize_size(375, 500, 320, 600) == (426, 320)  # int(320*500/375) truncated
    assert detr_resize_size(400, 300, 300, 600) == (300, 400)  # already at target


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_two_view_boxes_iou_and_aspect(iou: float) -> None:
    for seed in range(50):
        rng = np.random.default_rng(seed)
        outer = sample_outer_rect(320, 240, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        aspect = (outer[2] - outer[0]) / (outer[3] - outer[1])
        a, b, inter = two_view_boxes(outer, iou, stochastic=False, rng=rng)
        assert _iou(a, b) == pytest.approx(iou, abs=1e-9)
        a2, b2, inter2 = two_view_boxes(outer, iou, stochastic=True, rng=rng)
        assert _iou(a2, b2) >= iou - 1e-9
        np.testing.assert_allclose(inter2, inter)
        for box in (a, b, a2, b2, inter):
            assert box[0] >= outer[0] - 1e-9 and box[1] >= outer[1] - 1e-9
            assert box[2] <= outer[2] + 1e-9 and box[3] <= outer[3] + 1e-9
            assert (box[2] - box[0]) / (box[3] - box[1]) == pytest.approx(aspect, rel=1e-9)
        # the intersection of the two views is the intersection rectangle
        got = np.r_[np.maximum(a2[:2], b2[:2]), np.minimum(a2[2:], b2[2:])]
        np.testing.assert_allclose(got, inter, atol=1e-9)


def test_stochastic_shrink_actually_varies() -> None:
    outer = np.array([0.0, 0.0, 200.0, 150.0])
    ious = {round(_iou(*two_view_boxes(outer, 0.5, True, np.random.default_rng(s))[:2]), 6)
            for s in range(20)}
    assert len(ious) > 10 and min(ious) >= 0.5


def test_outer_rect_fallback_is_centre_crop() -> None:
    # a 1000x10 image: no attempt can fit, fallback clamps the aspect to 4/3
    outer = sample_outer_rect(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    np.testing.assert_array_equal(outer, [493, 0, 506, 10])


def test_view_mapping_round_trip() -> None:
    rng = np.random.default_rng(3)
    boxes = rng.uniform(0, 100, (20, 4))
    rect = np.array([10.5, 20.25, 90.0, 80.0])
    mapped = image_to_view(boxes, rect, (60, 80))
    np.testing.assert_allclose(view_to_image(mapped, rect, (60, 80)), boxes, atol=1e-9)
    np.testing.assert_allclose(image_to_view(rect, rect, (60, 80)), [0, 0, 80, 60])


@pytest.mark.parametrize("seed", range(25))
def test_regions_are_same_physical_boxes(seed: int) -> None:
    plan = plan_views(_noise_image(), _proposals(), OPTS, np.random.default_rng(seed))
    assert plan is not None
    g = plan.geom
    H, W = g.size
    assert plan.view1.size == (W, H) and plan.view2.size == (W, H)
    assert plan.boxes1.shape == (OPTS.num_regions, 4) == plan.boxes2.shape
    for b in (plan.boxes1, plan.boxes2):
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
        assert (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
    img1 = view_to_image(plan.boxes1, g.view1, g.size)
    img2 = view_to_image(plan.boxes2, g.view2, g.size)
    np.testing.assert_allclose(img1, img2, atol=1e-3)
    # region 0 is the intersection rectangle in both views; all regions lie inside it
    np.testing.assert_allclose(plan.boxes1[0], image_to_view(g.inter, g.view1, g.size), atol=1e-3)
    np.testing.assert_allclose(plan.boxes2[0], image_to_view(g.inter, g.view2, g.size), atol=1e-3)
    assert (img1[:, :2] >= g.inter[:2] - 1e-3).all() and (img1[:, 2:] <= g.inter[2:] + 1e-3).all()


def _geometry() -> ViewGeometry:
    """Views [0,0,120,90] and [40,30,160,120] of a 160x120 image, resized to 180x240."""
    return ViewGeometry(
        outer=np.array([0.0, 0.0, 160.0, 120.0]), view1=np.array([0.0, 0.0, 120.0, 90.0]),
        view2=np.array([40.0, 30.0, 160.0, 120.0]), inter=np.array([40.0, 30.0, 120.0, 90.0]),
        size=(180, 240),
    )


def test_region_boxes_clamp_filter_and_order() -> None:
    g = _geometry()
    props = np.array([
        [0, 0, 10, 10],        # outside the intersection -> inverted -> dropped
        [0, 0, 80, 60],        # partly inside -> truncated to [40, 30, 80, 60]
        [50, 40, 52, 42],      # inside but too small (area < 5 %)
        [60, 40, 200, 200],    # truncated to [60, 40, 119, 89]
        [45, 35, 100, 80],
        [50, 50, 70, 70],
    ], dtype=np.float64)
    opts = replace(OPTS, num_regions=3)
    b1, b2 = region_boxes(props, g, opts, np.random.default_rng(0))
    expected_img = np.array([[40, 30, 120, 90], [40, 30, 80, 60], [60, 40, 119, 89]], float)
    np.testing.assert_allclose(view_to_image(b1, g.view1, g.size), expected_img, atol=1e-4)
    np.testing.assert_allclose(view_to_image(b2, g.view2, g.size), expected_img, atol=1e-4)
    np.testing.assert_allclose(b1[1], [80, 60, 160, 120], atol=1e-4)  # x2 scale, view-1 pixels


def test_padding_by_jitter_when_few_survive() -> None:
    g = _geometry()
    props = np.array([[50, 40, 100, 80], [0, 0, 5, 5]], dtype=np.float64)  # one survivor
    b1, b2 = region_boxes(props, g, OPTS, np.random.default_rng(1))
    assert b1.shape == (OPTS.num_regions, 4)
    base = b1[1]
    w, h = base[2] - base[0], base[3] - base[1]
    pads = b1[2:]
    assert not np.allclose(pads, base)  # jittered, not plain copies
    assert len({tuple(np.round(p, 4)) for p in pads}) == len(pads)
    tol = 0.1 * np.array([w, h, w, h]) + 1e-4
    assert (np.abs(pads - base) <= tol).all()
    inter1 = image_to_view(g.inter, g.view1, g.size)
    assert (pads[:, 0::2] >= inter1[0] - 1e-4).all() and (pads[:, 0::2] <= inter1[2] - 1).all()
    np.testing.assert_allclose(view_to_image(b1, g.view1, g.size),
                               view_to_image(b2, g.view2, g.size), atol=1e-3)


def test_none_without_usable_proposal() -> None:
    img = _noise_image()
    rng = np.random.default_rng(0)
    assert sample_views(img, np.zeros((0, 4), np.float32), OPTS, rng) is None
    assert sample_views(img, None, OPTS, rng) is None
    tiny = np.array([[0, 0, 2, 2]], np.float32)  # never 5 % of any intersection
    assert all(sample_views(img, tiny, OPTS, np.random.default_rng(s)) is None for s in range(5))


def test_random_box_source_needs_no_proposals() -> None:
    opts = replace(OPTS, box_source="random")
    plan = plan_views(_noise_image(), None, opts, np.random.default_rng(4))
    assert plan is not None and plan.boxes1.shape == (opts.num_regions, 4)
    g = plan.geom
    np.testing.assert_allclose(view_to_image(plan.boxes1, g.view1, g.size),
                               view_to_image(plan.boxes2, g.view2, g.size), atol=1e-3)
    r = (plan.boxes1[1:, 2] - plan.boxes1[1:, 0]) / (plan.boxes1[1:, 3] - plan.boxes1[1:, 1])
    assert (r >= 1 / 8 * 0.8).all() and (r <= 8 * 1.25).all()


def test_sample_shapes_crops_and_determinism() -> None:
    img, props = _noise_image(), _proposals()
    s1 = sample_views(img, props, OPTS, np.random.default_rng(7), image_id="x")
    s2 = sample_views(img, props, OPTS, np.random.default_rng(7), image_id="x")
    s3 = sample_views(img, props, OPTS, np.random.default_rng(8), image_id="x")
    assert s1 is not None and s2 is not None and s3 is not None
    M, c = OPTS.num_regions, OPTS.crop_size
    assert s1.view1.shape == s1.view2.shape and s1.view1.shape[0] == 3
    assert s1.crops1.shape == (M, 3, c, c) == s1.crops2.shape
    assert s1.boxes1.dtype == torch.float32 and s1.image_id == "x"
    for name in ("view1", "view2", "boxes1", "boxes2", "crops1", "crops2"):
        assert torch.equal(getattr(s1, name), getattr(s2, name)), name
    assert not torch.equal(s1.view1, s3.view1) or not torch.equal(s1.boxes1, s3.boxes1)
    # workers send uint8 RGB (4x fewer bytes); the batch is normalised on the device
    assert s1.view1.dtype == s1.crops1.dtype == torch.uint8
    assert normalise_uint8(s1.view1).abs().max() < 3.0
    no_crops = sample_views(img, props, replace(OPTS, region_discrimination=False),
                            np.random.default_rng(7))
    assert no_crops.crops1 is None and no_crops.crops2 is None


def test_flip_is_shared_by_both_views() -> None:
    w, h = 160, 120
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # red left half, blue right half
    arr[:, w // 2 :] = (0, 0, 255)
    img = Image.fromarray(arr)
    props = np.array([[0, 0, w // 2 - 1, h]], np.float32)  # the red half
    seen: list[bool] = []
    for seed in range(40):
        plan = plan_views(img, props, OPTS, np.random.default_rng(seed))
        if plan is None:  # the red half can miss the views' overlap
            continue
        seen.append(plan.flipped)
        iw = plan.image.width
        red_side_right = plan.proposals[0, 0] > iw / 4
        assert red_side_right == plan.flipped  # the box moved with the image
        px = np.asarray(plan.image)[h // 4, int(iw * 0.9)]
        assert (px[0] > 200) == plan.flipped  # the image content was mirrored too
        for view, boxes in ((plan.view1, plan.boxes1), (plan.view2, plan.boxes2)):
            x0, y0, x1, y1 = boxes[1]
            patch = np.asarray(view)[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1]
            assert patch[..., 0].mean() > 200 and patch[..., 2].mean() < 55  # red in both
    assert seen.count(True) >= 5 and seen.count(False) >= 5
