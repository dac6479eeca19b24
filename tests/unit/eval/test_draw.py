"""The detections picture: solid class-coloured predictions with a tag, dashed ground truth,
a legend band under the picture, enlarged when small."""

from __future__ import annotations

import numpy as np
from PIL import Image

from siamese_detr.eval.draw import (
    GT_COLORS,
    PALETTE,
    _overlaps,
    _place_tag,
    class_color,
    draw_detections,
)

TOY_FRAMES = [(230, 40, 40), (40, 210, 60), (40, 100, 240)]


def _grey(w: int = 400, h: int = 300) -> Image.Image:
    return Image.new("RGB", (w, h), (90, 90, 90))


def test_prediction_box_tag_and_legend():
    out = draw_detections(_grey(), [[100, 120, 300, 280]], [0.9], [1], ["cat"], legend=True)
    assert out.width == 640 and out.height > 480  # short side enlarged to 480, band below
    a = np.asarray(out).astype(int)
    scale = 480 / 300
    # the box's left edge (inside the dark outline) has the class colour
    y = int(200 * scale)
    x_edge = int(100 * scale)
    edge = a[y, x_edge - 2: x_edge + 6]
    assert any((px == class_color(1)).all() for px in edge)
    assert any((px == 0).all() for px in edge)  # dark outline for any background
    # the tag sits above the box, filled with the class colour
    tag = a[int(120 * scale) - 12, x_edge + 4]
    assert (tag == class_color(1)).all() or (tag == 0).all() or (tag == 255).all()
    # the legend band is white and names the class (dark text pixels in it)
    band = a[481:]
    assert (band == 255).mean() > 0.8 and (band < 60).any()


def test_ground_truth_is_dashed_black_and_white():
    out = draw_detections(_grey(480, 480), [], [], [], [], gt_boxes=[[40, 40, 440, 440]],
                          legend=False)
    top = np.asarray(out)[40, 40:440].astype(int)
    white = (top == 255).all(axis=1)
    black = (top == 0).all(axis=1)
    assert white.sum() > 100 and black.sum() > 100  # alternating dashes
    assert (white | black).all()
    changes = np.count_nonzero(np.diff(white.astype(int)))
    assert changes >= 20  # many dashes, not two long lines


def test_tags_do_not_overlap_and_colours_avoid_the_toy_frames():
    boxes = [[50 + 3 * k, 50 + 2 * k, 200, 200] for k in range(6)]  # nearly identical boxes
    out = draw_detections(_grey(480, 480), boxes, [0.9 - 0.1 * k for k in range(6)],
                          list(range(6)), [f"c{k}" for k in range(6)], legend=False)
    a = np.asarray(out).astype(int)
    for k in range(6):  # every tag stays visible: its fill colour is somewhere on the picture
        assert ((a == class_color(k)).all(axis=-1)).sum() > 50, k
    for frame in TOY_FRAMES:
        assert all(np.abs(np.subtract(c, frame)).sum() > 120 for c in PALETTE)
    assert GT_COLORS == ((255, 255, 255), (0, 0, 0))


def test_tag_places_never_overlap():
    taken: list = []
    for _ in range(8):  # eight tags for one box: above, inside, below, ... then stacked
        rect = _place_tag([100, 100, 200, 200], 60, 14, (480, 480), taken)
        assert not any(_overlaps(rect, t) for t in taken)
        assert rect[0] >= 0 and rect[2] <= 480 and rect[1] >= 0 and rect[3] <= 480
        taken.append(rect)
