"""Proposal methods on real photos: valid boxes, working size, the original's fallbacks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from skimage import data

from siamese_detr.proposals import methods
from siamese_detr.proposals.methods import (
    edgeboxes,
    gradient_edges,
    random_boxes,
    sanitize_boxes,
    selective_search,
)


def _photo(name: str, w: int, h: int) -> np.ndarray:
    image = getattr(data, name)()
    return np.ascontiguousarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA))


def _assert_valid(boxes: np.ndarray, scores: np.ndarray, h: int, w: int, max_boxes: int) -> None:
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(scores)
    assert 1 <= len(boxes) <= max_boxes
    assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])
    assert boxes.min() >= 0 and np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
    assert np.array_equal(boxes, np.round(boxes))  # integer pixel boxes, as the original
    assert np.all(np.diff(scores) <= 0)  # score order


@pytest.mark.parametrize("name,w,h", [("astronaut", 160, 160), ("coffee", 150, 100)])
def test_every_method_gives_valid_boxes_on_a_photo(name: str, w: int, h: int) -> None:
    image = _photo(name, w, h)
    runs = {
        "edgeboxes": edgeboxes(image, max_boxes=100),
        "ss-fast": selective_search(image, "fast", max_boxes=100),
        "random": random_boxes(image.shape, 100, seed=1),
    }
    for boxes, scores in runs.values():
        _assert_valid(boxes, scores, h, w, 100)
    eb_boxes, eb_scores = runs["edgeboxes"]
    assert len(eb_boxes) > 10 and eb_scores[0] > 0  # real proposals, not the fallback


def test_edgeboxes_maps_working_size_back_to_the_original() -> None:
    image = _photo("astronaut", 300, 240)
    boxes, scores = edgeboxes(image, max_boxes=200, working_size=100)
    _assert_valid(boxes, scores, 240, 300, 200)
    assert boxes[:, 2].max() > 150  # boxes live in original, not 100-px, coordinates
    small, _ = edgeboxes(image, max_boxes=200, working_size=0)  # original resolution
    _assert_valid(small, _, 240, 300, 200)


def test_selective_search_scores_are_rank_based() -> None:
    boxes, scores = selective_search(_photo("coffee", 120, 96), "fast", max_boxes=50)
    k = len(boxes)
    assert np.allclose(scores, (k - np.arange(k)) / k)
    again = selective_search(_photo("coffee", 120, 96).copy(), "fast", max_boxes=50)
    assert np.array_equal(again[0], boxes)  # seeded region ranking: reproducible
    with pytest.raises(ValueError, match="mode"):
        selective_search(_photo("coffee", 64, 64), "slow")  # type: ignore[arg-type]


def test_random_boxes_are_seeded() -> None:
    a = random_boxes((90, 120, 3), 64, seed=5)
    b = random_boxes((90, 120), 64, seed=5)
    c = random_boxes((90, 120), 64, seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    _assert_valid(*a, h=90, w=120, max_boxes=64)
    assert len(a[0]) == 64


def test_flat_image_falls_back_to_the_centre_box(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = methods._run_edgeboxes

    def counting(image, params, model_path):  # noqa: ANN001, ANN202
        calls.append(image.shape)
        return real(image, params, model_path)

    monkeypatch.setattr(methods, "_run_edgeboxes", counting)
    boxes, scores = edgeboxes(np.full((100, 120, 3), 128, np.uint8))
    assert boxes.tolist() == [[30.0, 25.0, 90.0, 75.0]] and scores.tolist() == [0.0]
    factor = math.ceil(1000 / 100)
    assert calls == [(100, 120, 3), (100 * factor, 120 * factor, 3)]  # retry was upscaled


def test_retry_boxes_are_divided_by_the_upscale_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake(image, params, model_path):  # noqa: ANN001, ANN202
        seen.append(image.shape[:2])
        if len(seen) == 1:
            raise cv2.error("no edges")
        return np.array([[130, 130, 260, 390]], np.float32), np.array([0.5], np.float32)

    monkeypatch.setattr(methods, "_run_edgeboxes", fake)
    boxes, scores = edgeboxes(_photo("coffee", 100, 80))
    assert seen == [(80, 100), (80 * 13, 100 * 13)]  # ceil(1000 / 80) = 13
    assert boxes.tolist() == [[10.0, 10.0, 20.0, 30.0]] and scores.tolist() == [0.5]


def test_gradient_edges_are_thin_and_normalised() -> None:
    edges = gradient_edges(_photo("astronaut", 128, 128))
    assert edges.dtype == np.float32 and edges.shape == (128, 128)
    assert edges.min() >= 0 and edges.max() <= 1.0
    assert 0.01 < (edges > 0).mean() < 0.3  # Canny-thinned, not a dense magnitude map
    assert not gradient_edges(np.zeros((32, 32, 3), np.uint8)).any()


def test_sanitize_boxes_clips_and_drops_degenerate() -> None:
    boxes = np.array([[-5, 2.4, 50, 30], [10, 10, 10, 20], [5, 5, 8.6, 9]], np.float32)
    scores = np.array([0.25, 0.9, 0.5], np.float32)
    out, s = sanitize_boxes(boxes, scores, height=20, width=40)
    assert out.tolist() == [[5, 5, 9, 9], [0, 2, 40, 20]] and s.tolist() == [0.5, 0.25]


def test_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        edgeboxes(np.zeros((10, 10), np.uint8))


def test_edgeboxes_is_deterministic_across_buffers() -> None:
    """Same pixels in differently aligned buffers -> identical proposals (resume and shard
    equality depend on it; cv2.magnitude once broke this)."""
    image = _photo("astronaut", 160, 160)
    ref_boxes, ref_scores = edgeboxes(image, max_boxes=64)
    for shift in range(1, 8):
        padded = np.zeros(160 * 160 * 3 + shift, np.uint8)
        moved = padded[shift:].reshape(160, 160, 3)
        moved[...] = image
        boxes, scores = edgeboxes(moved, max_boxes=64)
        assert np.array_equal(boxes, ref_boxes) and np.array_equal(scores, ref_scores)
