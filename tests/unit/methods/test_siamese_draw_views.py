"""The two-views picture can show every region as the box that training uses (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siamese_detr.methods.siamese.data import _palette, draw_views
from siamese_detr.methods.siamese.views import SiameseSample


def test_per_region_rows_show_each_region_alone(tmp_path: Path) -> None:
    H, W, gap, label = 40, 60, 8, 12
    # regions clipped to one overlap: all share the right side x = 50 and the top y = 5
    boxes = torch.tensor([[5.0, 5.0, 50.0, 35.0], [20.0, 5.0, 50.0, 30.0],
                          [30.0, 5.0, 50.0, 12.0]])
    sample = SiameseSample(view1=torch.zeros(3, H, W), view2=torch.zeros(3, H, W),
                           boxes1=boxes, boxes2=boxes - 2, crops1=torch.zeros(3, 3, 16, 16),
                           crops2=torch.zeros(3, 3, 16, 16))
    img = np.asarray(Image.open(draw_views(sample, tmp_path / "v.png", gap=gap,
                                           per_region=True)).convert("RGB")).astype(int)
    M = len(boxes)
    assert img.shape == (H + gap + M * (H + label + gap), 2 * W + gap + 2 * (H + gap), 3)
    grey = np.asarray(Image.new("RGB", (1, 1), tuple(
        int(round(m * 255)) for m in (0.485, 0.456, 0.406)))).astype(int)[0, 0]
    for j, colour in enumerate(_palette(M)):
        top = H + gap + j * (H + label + gap) + label
        for x_off, b in ((0, boxes[j]), (W + gap, boxes[j] - 2)):
            x0, y0, x1, y1 = (float(v) for v in b)
            inside = img[top + int((y0 + y1) / 2), x_off + int((x0 + x1) / 2)]
            # the fill tints the region's interior towards its colour ...
            assert np.abs(inside - grey).max() > 20
            assert np.dot(inside - grey, np.array(colour) - grey) > 0
            # ... and nothing else of that panel (a point inside region 0 only)
            if j > 0:
                assert np.abs(img[top + 33, x_off + 8] - grey).max() <= 2
    plain = np.asarray(Image.open(draw_views(sample, tmp_path / "p.png", gap=gap)))
    assert plain.shape == (H, 2 * W + gap, 3)  # the overview alone, as before
