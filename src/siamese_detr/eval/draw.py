"""The one picture of detections: ``siamese-detr predict`` and the demo report both draw with
:func:`draw_detections`.

Made to be read correctly at a glance on any background:

* predictions: **solid** boxes in the colour of their class, with a dark outline, and a
  label ``name score`` on a **filled** tag of the same colour (black or white text, whichever
  contrasts); tags are placed so that they do not cover each other;
* ground truth (optional): **dashed** black-and-white boxes, no tag;
* a legend band *under* the picture (never over its pixels): one solid swatch per predicted
  class, the dashed ground-truth swatch, and an optional caption (e.g. "the coloured frames
  inside the toy objects are part of the image").

The class colours avoid pure red, green and blue, the colours of the frames baked into the toy
objects' pixels (:mod:`siamese_detr.demo.synthetic`). Line width and text size scale with the
picture; small images are enlarged first (``min_side``) so the text stays legible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "class_color", "draw_detections", "legend_band", "load_font"]

RGB = tuple[int, int, int]

# bright, mutually distinct, none of them the toy frames' red (230, 40, 40), green
# (40, 210, 60) or blue (40, 100, 240)
PALETTE: tuple[RGB, ...] = (
    (255, 200, 0), (255, 0, 255), (0, 230, 230), (255, 140, 0), (160, 110, 255),
    (180, 255, 80), (255, 150, 190), (255, 255, 255), (0, 170, 140), (200, 160, 100),
)
GT_COLORS: tuple[RGB, RGB] = ((255, 255, 255), (0, 0, 0))


def class_color(label: int) -> RGB:
    return PALETTE[int(label) % len(PALETTE)]


def load_font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_color(bg: RGB) -> RGB:
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], width: int,
                      dash: int) -> None:
    """A rectangle of alternating white and black dashes (visible on any background)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)),
                               ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(np.ceil(length / dash)))
        for k in range(steps):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0),
                       (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=GT_COLORS[k % 2], width=width)


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_tag(box: Sequence[float], tw: float, th: float, size: tuple[int, int],
               taken: list[tuple[float, float, float, float]]
               ) -> tuple[float, float, float, float]:
    """A free spot for a ``tw x th`` tag: above the box, inside its top, below it, inside its
    bottom; else the first of them moved down until free."""
    W, H = size
    x1, y1, x2, y2 = (float(v) for v in box)
    x = min(max(0.0, x1), max(0.0, W - tw))
    candidates = [y1 - th, y1, y2, y2 - th]
    spots = [(x, min(max(0.0, y), max(0.0, H - th))) for y in candidates]
    for sx, sy in spots:
        rect = (sx, sy, sx + tw, sy + th)
        if not any(_overlaps(rect, t) for t in taken):
            return rect
    sx, sy = spots[0]
    for _ in range(200):
        rect = (sx, sy, sx + tw, sy + th)
        if not any(_overlaps(rect, t) for t in taken):
            return rect
        sy = sy + th if sy + 2 * th <= H else 0.0 if sy > 0 else sy + th
    return (sx, sy, sx + tw, sy + th)


def _tag(draw: ImageDraw.ImageDraw, rect: Sequence[float], text: str, color: RGB, font: Any,
         pad: int) -> None:
    draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=color, outline=(0, 0, 0))
    draw.text((rect[0] + pad, rect[1] + pad), text, fill=_text_color(color), font=font)


def legend_band(width: int, classes: Sequence[tuple[str, RGB]], ground_truth: bool,
                caption: str | None, font_size: int) -> Image.Image:
    """A white band ``width`` wide: solid swatch + name per class ("prediction"), a dashed
    swatch ("ground truth") when ``ground_truth``, then the wrapped ``caption``."""
    font = load_font(font_size)
    pad = max(3, font_size // 3)
    lw = max(2, font_size // 6)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 2 * pad
    sw = 2 * font_size  # swatch width
    items: list[tuple[str, RGB | None]] = [("predicted class (solid box):", None)]
    items += [(name, color) for name, color in classes]
    if ground_truth:
        items += [("   ", None), ("ground truth (dashed box)", GT_COLORS[0])]
    # lay the items out in rows
    rows: list[list[tuple[str, RGB | None, float]]] = [[]]
    x = pad
    for text, color in items:
        tw = probe.textlength(text, font=font) + (sw + pad if color is not None else 0) + 2 * pad
        if rows[-1] and x + tw > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((text, color, tw))
        x += tw
    words = (caption or "").split()
    cap_lines: list[str] = []
    while words:
        line = words.pop(0)
        while words and probe.textlength(line + " " + words[0], font=font) <= width - 2 * pad:
            line += " " + words.pop(0)
        cap_lines.append(line)
    band = Image.new("RGB", (width, line_h * (len(rows) + len(cap_lines)) + pad), "white")
    draw = ImageDraw.Draw(band)
    for r, row in enumerate(rows):
        x, y = pad, r * line_h + pad
        for text, color, tw in row:
            if color is not None:
                box = (x, y + 2, x + sw, y + font_size)
                if text.startswith("ground truth") and ground_truth:
                    draw.rectangle(box, fill=(150, 150, 150))
                    _dashed_rectangle(draw, box, lw, max(3, font_size // 3))
                else:
                    draw.rectangle(box, outline=(0, 0, 0), width=lw + 2)
                    draw.rectangle(box, outline=color, width=lw)
                x += sw + pad
            draw.text((x, y), text, fill=(0, 0, 0), font=font)
            x += tw - (sw + pad if color is not None else 0)
    for k, line in enumerate(cap_lines):
        draw.text((pad, (len(rows) + k) * line_h + pad), line, fill=(60, 60, 60), font=font)
    return band


def draw_detections(image: Image.Image, boxes: Any, scores: Sequence[float],
                    labels: Sequence[int], names: Sequence[str], *,
                    gt_boxes: Any = None, legend: bool = True, caption: str | None = None,
                    min_side: int = 480, legend_names: dict[int, str] | None = None
                    ) -> Image.Image:
    """Draw predictions (and ground truth) on a copy of ``image``.

    Args:
        image: the picture the boxes refer to (any PIL mode).
        boxes: ``[K, 4]`` absolute xyxy pixels of ``image`` (tensor, array or lists).
        scores, labels, names: per box; ``labels`` pick the colour, ``names`` the tag text.
        gt_boxes: ``[G, 4]`` absolute xyxy ground truth, drawn dashed (``None``: none).
        legend: add the legend band under the picture.
        caption: text of the legend band (wrapped), e.g. what the picture shows.
        min_side: enlarge the picture so its short side is at least this (legibility).
        legend_names: ``{label: name}`` to list in the legend (default: the predicted ones).

    Returns:
        a new RGB image (taller than the input when ``legend``).
    """
    picture = image.convert("RGB")
    scale = max(1.0, min_side / max(1, min(picture.size)))
    if scale > 1.0:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)),
                                 Image.Resampling.BICUBIC)
    else:
        picture = picture.copy()
    W, H = picture.size
    short = min(W, H)
    lw = max(2, round(short / 200))
    font_size = max(12, round(short / 30))
    font = load_font(font_size)
    pad = max(2, font_size // 6)
    draw = ImageDraw.Draw(picture)
    boxes_a = np.asarray(boxes if not hasattr(boxes, "detach") else boxes.detach().cpu(),
                         dtype=np.float64).reshape(-1, 4) * scale
    scores_l = [float(s) for s in scores]
    labels_l = [int(v) for v in labels]
    if gt_boxes is not None:
        gt = np.asarray(gt_boxes if not hasattr(gt_boxes, "detach")
                        else gt_boxes.detach().cpu(), dtype=np.float64).reshape(-1, 4) * scale
        for box in gt:
            _dashed_rectangle(draw, box, max(1, lw - 1), 3 * lw + 2)
    order = sorted(range(len(scores_l)), key=lambda i: scores_l[i])  # best drawn last (on top)
    for i in order:
        box = [float(v) for v in boxes_a[i]]
        draw.rectangle(box, outline=(0, 0, 0), width=lw + 2)
        draw.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1],
                       outline=class_color(labels_l[i]), width=lw)
    taken: list[tuple[float, float, float, float]] = []
    for i in reversed(order):  # best first: it gets the best spot
        text = f"{names[i]} {scores_l[i]:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        rect = _place_tag(boxes_a[i], r + 2 * pad, b + 2 * pad, (W, H), taken)
        taken.append(rect)
        _tag(draw, rect, text, class_color(labels_l[i]), font, pad)
    if not legend:
        return picture
    shown = legend_names if legend_names is not None else {
        labels_l[i]: names[i] for i in sorted(range(len(labels_l)), key=lambda i: labels_l[i])}
    band = legend_band(W, [(n, class_color(k)) for k, n in sorted(shown.items())],
                       gt_boxes is not None, caption, font_size)
    out = Image.new("RGB", (W, H + band.height), "white")
    out.paste(picture, (0, 0))
    out.paste(band, (0, H))
    return out
