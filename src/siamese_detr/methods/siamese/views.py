"""Siamese DETR data side: one image + its proposals -> two overlapping views with shared regions.

Implements the view sampling of the official ``SiameseDETRDataset`` (Zx55/SiameseDETR; see
docs/method.md, "One training step").

Coordinate frames (all boxes are absolute **xyxy**, float):

* *original*: pixels of the image on disk (the proposals given to :func:`sample_views`);
* *image*: the base-resized and (maybe) horizontally flipped image; view rectangles, the outer
  rectangle and the intersection rectangle live here;
* *view k*: pixels of view k after it was cropped from the image and resized to the outer
  rectangle's size ``(H, W)``; region boxes returned to the model live here.

Sizes are always written ``(H, W)``. All randomness comes from the ``rng`` argument
(``np.random.Generator``), so a sample is a pure function of (image, proposals, opts, rng state).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from siamese_detr.config import SiameseOptions
from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD
from siamese_detr.data.collate import padding_mask
from siamese_detr.data.transforms import get_size
from siamese_detr.methods.siamese.colour import (
    NUM_COLOUR_PARAMS,
    apply_colour_pil,
    colour_augment,
    sample_colour_params,
)
from siamese_detr.structures import imagenet_normalise

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DeferredAugment", "SiameseSample", "ViewGeometry",
    "ViewPlan", "colour_augment", "crop_and_colour", "detr_resize_size", "image_to_view",
    "normalise_uint8", "plan_views", "region_boxes", "render_views", "sample_outer_rect",
    "sample_views",
    "to_normalised_tensor", "to_uint8_tensor", "two_view_boxes", "view_to_image",
]

FLIP_P = 0.5
PAD_JITTER = 0.1  # +-10 % jitter of padded region copies (the code, not its "20 %" comment)
DICE_NUM = 100  # random-box ablation: candidates per image
RATIO_MAX = 8.0  # random-box ablation: aspect ratio in [1/8, 8]
_EPS = 1e-6  # tolerance (px) for float noise in validity tests


@dataclass
class SiameseSample:
    """One training sample.

    Attributes:
        view1, view2: ``[3, H, W]`` uint8 RGB views of identical size (normalised on the
            training device: :meth:`~siamese_detr.methods.siamese.data.SiameseBatch.normalised`).
        boxes1, boxes2: ``[M, 4]`` float32 absolute xyxy in view-1 / view-2 pixels; row ``j`` is
            the same physical region in both views, row 0 the views' intersection rectangle.
        crops1, crops2: ``[M, 3, c, c]`` uint8 region crops or ``None``.
        image_id: id of the source image.
        deferred: with ``augment_on=device``, the colour parameters the worker drew and
            did not apply: ``view1``/``view2`` are then un-coloured and ``crops1``/``crops2``
            ``None`` (cut and coloured on the training device); else ``None``.
    """

    view1: Tensor
    view2: Tensor
    boxes1: Tensor
    boxes2: Tensor
    crops1: Tensor | None
    crops2: Tensor | None
    image_id: str = ""
    deferred: DeferredAugment | None = None

    def rendered(self) -> SiameseSample:
        """This sample with its views made, where ``view_resize_on=device`` left them to the
        device (:func:`render_views`, here on the sample's device); else itself."""
        d = self.deferred
        if d is None or d.source is None:
            return self
        assert d.view_size is not None
        hw = (int(d.view_size[0]), int(d.view_size[1]))
        views = d._map(lambda t: t[None]).render(d.view_size[None], hw)[0]
        return replace(self, view1=views[0], view2=views[1], deferred=d.without_source())


@dataclass
class DeferredAugment:
    """What the training device applies (``augment_on=device``), of one sample or, with a
    leading batch dimension ``B``, of a batch.

    Attributes:
        view_colour: ``[2, P]`` (``[B, 2, P]``) colour parameters of view 1 and view 2
            (``P = NUM_COLOUR_PARAMS``, see :mod:`~siamese_detr.methods.siamese.colour`).
        crop_colour: ``[2, M, P]`` (``[B, 2, M, P]``) parameters of each region crop of each
            view, or ``None`` without region discrimination.
        crop_size: side of the square crops cut from the views at their region boxes.
        source: with ``view_resize_on=device``, ``[3, h, w]`` uint8 (``[B, 3, h, w]`` zero
            padded): the base image's outer view rectangle with a 1-pixel margin, from which
            the device renders both views (:func:`render_views`); the sample's views are then
            empty placeholders. ``None``: the worker resized the views.
        source_sizes: ``[2]`` (``[B, 2]``) unpadded ``(h, w)`` of ``source``.
        rects: ``[2, 4]`` (``[B, 2, 4]``) float32 xyxy of view 1 and view 2 in ``source``
            pixels.
        view_size: ``[2]`` (``[B, 2]``) int64 ``(H, W)`` of the views.
    """

    view_colour: Tensor
    crop_colour: Tensor | None
    crop_size: int
    source: Tensor | None = None
    source_sizes: Tensor | None = None
    rects: Tensor | None = None
    view_size: Tensor | None = None

    def _map(self, fn: Callable[[Tensor], Tensor]) -> DeferredAugment:
        def each(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return DeferredAugment(fn(self.view_colour), each(self.crop_colour), self.crop_size,
                               each(self.source), each(self.source_sizes), each(self.rects),
                               each(self.view_size))

    def render(self, sizes: Tensor, pad_hw: tuple[int, int]) -> Tensor:
        """Both views of every sample, ``[B, 2, 3, H_pad, W_pad]`` uint8, rendered from the
        batched ``source`` (:func:`render_views`); ``sizes [B, 2]``: the views' ``(H, W)``."""
        assert self.source is not None and self.source_sizes is not None
        assert self.rects is not None
        return render_views(self.source, self.source_sizes, self.rects, sizes, pad_hw)

    def without_source(self) -> DeferredAugment:
        """What is left for the training step once the views are rendered: the colours."""
        return DeferredAugment(self.view_colour, self.crop_colour, self.crop_size)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DeferredAugment:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DeferredAugment:
        return self._map(lambda t: t.pin_memory())


@dataclass(frozen=True)
class ViewGeometry:
    """Rectangles in *image* coordinates (xyxy float64) plus the common view size ``(H, W)``."""

    outer: np.ndarray
    view1: np.ndarray
    view2: np.ndarray
    inter: np.ndarray
    size: tuple[int, int]


@dataclass
class ViewPlan:
    """Geometry of one sample before colour augmentation (for tests and debugging).

    ``image`` is the base-resized, maybe flipped image; ``proposals`` are in its coordinates;
    ``view1``/``view2`` are the resized, not yet colour-augmented views; ``boxes1``/``boxes2``
    are ``[M, 4]`` float32 xyxy view pixels.
    """

    image: Image.Image
    proposals: np.ndarray
    flipped: bool
    geom: ViewGeometry
    view1: Image.Image
    view2: Image.Image
    boxes1: np.ndarray
    boxes2: np.ndarray


# ----------------------------------------------------------------------------- geometry helpers


def detr_resize_size(width: int, height: int, short: int, max_size: int | None) -> tuple[int, int]:
    """DETR's ``get_size_with_aspect_ratio`` (see :func:`siamese_detr.data.transforms.get_size`):
    output ``(H, W)`` for a shorter-side target."""
    return get_size((height, width), short, max_size)


def sample_outer_rect(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """torchvision ``RandomResizedCrop.get_params`` (10 attempts, centre fallback): xyxy ints."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return np.array([x, y, x + w, y + h], dtype=np.float64)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    y, x = (height - h) // 2, (width - w) // 2
    return np.array([x, y, x + w, y + h], dtype=np.float64)


def two_view_boxes(
    outer: np.ndarray, iou: float, stochastic: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two boxes of the outer rectangle's aspect whose IoU is ``iou`` (``>= iou`` when shrunk).

    The intersection (same aspect ``r = W/H``, centred) has height ``h`` solving
    ``r(iou+2)h^2 - iou(rH+W)h - iou*W*H = 0``. Box A spans outer top-left -> intersection
    bottom-right, B intersection top-left -> outer bottom-right. With ``stochastic`` A's top-left
    and B's bottom-right move inward along the diagonal by ``(r*d, d)``, ``d`` uniform up to the
    intersection. The two are swapped with p = 0.5.

    Returns ``(view1, view2, intersection)`` xyxy float64 in the frame of ``outer``.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"view IoU must be in (0, 1], got {iou}")
    ox0, oy0, ox1, oy1 = (float(v) for v in outer)
    W, H = ox1 - ox0, oy1 - oy0
    r = W / H
    a, b, c = r * (iou + 2.0), -iou * (r * H + W), -iou * W * H
    ih = (-b + math.sqrt(b * b - 4.0 * a * c)) / (2.0 * a)
    iw = r * ih
    cx, cy = (ox0 + ox1) / 2.0, (oy0 + oy1) / 2.0
    inter = np.array([cx - iw / 2, cy - ih / 2, cx + iw / 2, cy + ih / 2])
    box_a = np.array([ox0, oy0, inter[2], inter[3]])
    box_b = np.array([inter[0], inter[1], ox1, oy1])
    if stochastic:
        dy = rng.uniform(0.0, min((inter[0] - ox0) / r, inter[1] - oy0))
        box_a[:2] += (r * dy, dy)
        dy = rng.uniform(0.0, min((ox1 - inter[2]) / r, oy1 - inter[3]))
        box_b[2:] -= (r * dy, dy)
    if rng.random() > 0.5:
        box_a, box_b = box_b, box_a
    return box_a, box_b, inter


def image_to_view(
    boxes: np.ndarray, view_rect: np.ndarray, out_size: tuple[int, int]
) -> np.ndarray:
    """Map xyxy boxes ``[..., 4]`` from image coordinates into the pixels of a view cut at
    ``view_rect`` (image xyxy) and resized to ``out_size = (H, W)``."""
    H, W = out_size
    vx0, vy0, vx1, vy1 = (float(v) for v in view_rect)
    scale = np.array([W / (vx1 - vx0), H / (vy1 - vy0)] * 2)
    return (np.asarray(boxes, dtype=np.float64) - np.array([vx0, vy0, vx0, vy0])) * scale


def view_to_image(
    boxes: np.ndarray, view_rect: np.ndarray, out_size: tuple[int, int]
) -> np.ndarray:
    """Inverse of :func:`image_to_view`: view pixels -> image coordinates (xyxy)."""
    H, W = out_size
    vx0, vy0, vx1, vy1 = (float(v) for v in view_rect)
    scale = np.array([(vx1 - vx0) / W, (vy1 - vy0) / H] * 2)
    return np.asarray(boxes, dtype=np.float64) * scale + np.array([vx0, vy0, vx0, vy0])


def _inside_view(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Official validity test in a view: ``x0, y0 >= 0`` and ``x1 < W``, ``y1 < H``."""
    H, W = size
    return (
        (boxes[:, 0] >= -_EPS) & (boxes[:, 1] >= -_EPS) & (boxes[:, 2] < W) & (boxes[:, 3] < H)
    )


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# ----------------------------------------------------------------------------- region boxes


def _proposal_candidates(
    proposals: np.ndarray, geom: ViewGeometry, opts: SiameseOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Section 2.2 steps 1-4: clamp to the intersection's inner side, filter; view-1/2 boxes."""
    ix0, iy0, ix1, iy1 = geom.inter
    boxes = np.asarray(proposals, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 0] = np.maximum(boxes[:, 0], ix0)
    boxes[:, 1] = np.maximum(boxes[:, 1], iy0)
    boxes[:, 2] = np.minimum(boxes[:, 2], ix1 - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3], iy1 - 1)
    v1 = image_to_view(boxes, geom.view1, geom.size)
    inter_area = _area(image_to_view(geom.inter[None], geom.view1, geom.size))[0]
    keep = _area(v1) >= opts.area_min_ratio * inter_area
    keep &= (v1 >= -_EPS).all(axis=1) & (v1[:, 2:] >= v1[:, :2]).all(axis=1)
    v2 = image_to_view(boxes, geom.view2, geom.size)  # straight from image coords: exact
    keep &= _inside_view(v2, geom.size)
    return v1[keep], v2[keep]


def _random_candidates(
    geom: ViewGeometry, opts: SiameseOptions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random-box ablation: ``DICE_NUM`` boxes inside the view-1 intersection (section 2.2)."""
    rx0, ry0, rx1, ry1 = image_to_view(geom.inter, geom.view1, geom.size)
    min_area = opts.area_min_ratio * (rx1 - rx0) * (ry1 - ry0)
    y0, x0 = rng.uniform(ry0, ry1, DICE_NUM), rng.uniform(rx0, rx1, DICE_NUM)
    heights = rng.random(DICE_NUM) * (ry1 - y0) + 1e-10
    width_min = min_area / heights
    widths = width_min + rng.random(DICE_NUM) * ((rx1 - x0) - width_min)
    v1 = np.stack([x0, y0, x0 + widths, y0 + heights], axis=1)
    v2 = image_to_view(view_to_image(v1, geom.view1, geom.size), geom.view2, geom.size)

    def ratio_ok(b: np.ndarray) -> np.ndarray:
        r = (b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1] + 1e-10)
        return (r >= 1.0 / RATIO_MAX) & (r <= RATIO_MAX)

    keep = (v1[:, 2] < rx1) & ratio_ok(v1) & ratio_ok(v2) & (_area(v2) >= min_area)
    keep &= _inside_view(v2, geom.size)
    return v1[keep], v2[keep]


def region_boxes(
    proposals: np.ndarray | None, geom: ViewGeometry, opts: SiameseOptions,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``M`` shared regions as ``(boxes1, boxes2)``, float32 ``[M, 4]`` xyxy view pixels.

    ``proposals`` are xyxy in *image* coordinates, best first (ignored when
    ``opts.box_source == "random"``). Row 0 is the intersection; then the first ``M-1``
    surviving candidates; missing rows are jittered copies of the survivors (cycled), clamped
    to the view-1 intersection. ``None`` when no candidate survives.
    """
    if opts.box_source == "random":
        c1, c2 = _random_candidates(geom, opts, rng)
    else:
        if proposals is None or len(proposals) == 0:
            return None
        c1, c2 = _proposal_candidates(proposals, geom, opts)
    if len(c1) == 0:
        return None
    m = opts.num_regions
    c1, c2 = c1[: m - 1], c2[: m - 1]
    need = m - 1 - len(c1)
    inter1 = image_to_view(geom.inter[None], geom.view1, geom.size)
    inter2 = image_to_view(geom.inter[None], geom.view2, geom.size)
    parts1, parts2 = [inter1, c1], [inter2, c2]
    if need > 0:
        pad = c1[np.arange(need) % len(c1)].copy()
        wh = np.concatenate([pad[:, 2:] - pad[:, :2]] * 2, axis=1)
        delta = 2 * PAD_JITTER / (1.0 + np.exp(-rng.standard_normal((need, 4)))) - PAD_JITTER
        pad += delta * wh
        ix0, iy0, ix1, iy1 = inter1[0]
        pad[:, 0::2] = np.clip(pad[:, 0::2], ix0, ix1 - 1)
        pad[:, 1::2] = np.clip(pad[:, 1::2], iy0, iy1 - 1)
        parts1.append(pad)
        parts2.append(image_to_view(view_to_image(pad, geom.view1, geom.size), geom.view2,
                                    geom.size))
    H, W = geom.size
    limit = np.array([W, H, W, H], dtype=np.float64)
    b1 = np.clip(np.concatenate(parts1)[:m], 0.0, limit)  # clip only removes float noise
    b2 = np.clip(np.concatenate(parts2)[:m], 0.0, limit)
    return b1.astype(np.float32), b2.astype(np.float32)


# ----------------------------------------------------------------------------- images


def _base_resize_and_flip(
    image: Image.Image, proposals: np.ndarray, opts: SiameseOptions, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray, bool]:
    """Steps 2-3: DETR random resize (boxes scaled) and one horizontal flip with p = 0.5."""
    w, h = image.size
    short = int(opts.base_scales[int(rng.integers(len(opts.base_scales)))])
    oh, ow = detr_resize_size(w, h, short, opts.base_max_size)
    image = image.resize((ow, oh), Image.BILINEAR)
    boxes = np.asarray(proposals, dtype=np.float64).reshape(-1, 4) * np.array([ow / w, oh / h] * 2)
    flipped = bool(rng.random() < FLIP_P)
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        boxes = np.stack([ow - boxes[:, 2], boxes[:, 1], ow - boxes[:, 0], boxes[:, 3]], axis=1)
    return image, boxes, flipped


def plan_views(
    image: Image.Image, proposals: np.ndarray | None, opts: SiameseOptions,
    rng: np.random.Generator, render: bool = True,
) -> ViewPlan | None:
    """Steps 1-5 of section 2.1: geometry, un-augmented views and region boxes, or ``None``.

    ``proposals``: ``[K, 4]`` xyxy in *original* pixels, best first (may be ``None`` / empty
    for ``box_source="random"``). Without ``render`` the views are not resized (``view1`` and
    ``view2`` are the base image: the device renders them, :func:`render_views`); the random
    draws are the same.
    """
    props = np.zeros((0, 4)) if proposals is None else proposals
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # no copy when already RGB
    img, boxes, flipped = _base_resize_and_flip(rgb, props, opts, rng)
    outer = sample_outer_rect(img.width, img.height, opts.view_scale, opts.view_ratio, rng)
    box1, box2, inter = two_view_boxes(outer, opts.view_iou, opts.view_stochastic, rng)
    size = (int(outer[3] - outer[1]), int(outer[2] - outer[0]))
    geom = ViewGeometry(outer=outer, view1=box1, view2=box2, inter=inter, size=size)
    regions = region_boxes(boxes if proposals is not None else None, geom, opts, rng)
    if regions is None:
        return None
    if not render:
        return ViewPlan(img, boxes, flipped, geom, img, img, regions[0], regions[1])
    out_wh = (size[1], size[0])
    view1 = img.resize(out_wh, Image.BILINEAR, box=tuple(float(v) for v in box1))
    view2 = img.resize(out_wh, Image.BILINEAR, box=tuple(float(v) for v in box2))
    return ViewPlan(img, boxes, flipped, geom, view1, view2, regions[0], regions[1])


def _view_source(plan: ViewPlan) -> tuple[Tensor, Tensor, Tensor]:
    """``view_resize_on=device``: the base image's outer rectangle with a 1-pixel margin
    (clamped to the image: all that the bilinear upscale of either view reads) as ``[3, h, w]``
    uint8, its ``(h, w)``, and the two view rectangles in its pixels ``[2, 4]`` float32."""
    img, geom = plan.image, plan.geom
    x0 = max(0, math.floor(geom.outer[0]) - 1)
    y0 = max(0, math.floor(geom.outer[1]) - 1)
    x1 = min(img.width, math.ceil(geom.outer[2]) + 1)
    y1 = min(img.height, math.ceil(geom.outer[3]) + 1)
    source = to_uint8_tensor(img.crop((x0, y0, x1, y1)))
    rects = np.stack([geom.view1, geom.view2]) - np.array([x0, y0, x0, y0], dtype=np.float64)
    return (source, torch.tensor([y1 - y0, x1 - x0], dtype=torch.int64),
            torch.from_numpy(rects).float())


def render_views(sources: Tensor, source_sizes: Tensor, rects: Tensor, sizes: Tensor,
                 pad_hw: tuple[int, int]) -> Tensor:
    """The views PIL's bilinear resize would make, rendered on ``sources``' device.

    Args:
        sources: ``[B, 3, h, w]`` uint8, zero padded (what :func:`_view_source` cuts).
        source_sizes: ``[B, 2]`` unpadded ``(h, w)`` of each source.
        rects: ``[B, K, 4]`` xyxy view rectangles in source pixels.
        sizes: ``[B, 2]`` ``(H, W)`` of each sample's views.
        pad_hw: the padded output size (at least every ``sizes`` row).

    Returns:
        ``[B, K, 3, H_pad, W_pad]`` uint8; pixels outside a sample's ``sizes`` are zero.

    A view is only ever upscaled (its rectangle lies inside the outer rectangle, whose size
    it takes), where PIL's bilinear filter is plain bilinear interpolation: output pixel ``j``
    samples the source at ``x0 + (j + 0.5) * (x1 - x0) / W - 0.5`` (pixel-index units).
    Clamping that position to the source reproduces PIL's renormalised weights at the image
    border. PIL computes in 8-bit fixed point, this in float32 then rounds: within 1 level,
    0.15 on average (``tests/unit/methods/test_siamese_render.py``). No host read.
    """
    import torch.nn.functional as F

    B, K = int(rects.shape[0]), int(rects.shape[1])
    H, W = pad_hw
    hs, ws = int(sources.shape[-2]), int(sources.shape[-1])
    dev, dt = sources.device, torch.float32
    r = rects.to(dt)
    h = sizes[:, 0].to(dt).view(B, 1, 1)
    w = sizes[:, 1].to(dt).view(B, 1, 1)
    cols = torch.arange(W, device=dev, dtype=dt).view(1, 1, W)
    rows = torch.arange(H, device=dev, dtype=dt).view(1, 1, H)
    x = r[..., 0:1] + (cols + 0.5) * (r[..., 2:3] - r[..., 0:1]) / w - 0.5  # [B, K, W]
    y = r[..., 1:2] + (rows + 0.5) * (r[..., 3:4] - r[..., 1:2]) / h - 0.5  # [B, K, H]
    x = torch.minimum(x.clamp(min=0.0), (source_sizes[:, 1].to(dt) - 1.0).view(B, 1, 1))
    y = torch.minimum(y.clamp(min=0.0), (source_sizes[:, 0].to(dt) - 1.0).view(B, 1, 1))
    gx = ((2.0 * x + 1.0) / ws - 1.0)[:, :, None, :].expand(B, K, H, W)
    gy = ((2.0 * y + 1.0) / hs - 1.0)[:, :, :, None].expand(B, K, H, W)
    # the K views of a sample stacked along the output's height: one source read per sample
    grid = torch.stack([gx, gy], dim=-1).view(B, K * H, W, 2)
    out = F.grid_sample(sources.to(dt), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # [B, 3, K*H, W]
    out = torch.round(out).clamp(0.0, 255.0).to(torch.uint8)
    out = out.view(B, 3, K, H, W).transpose(1, 2)
    inside = ~padding_mask(sizes.to(dev), (H, W))  # [B, H, W]
    return (out * inside[:, None, None].to(torch.uint8)).contiguous()


def to_uint8_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> ``[3, H, W]`` uint8 (what loader workers send: 4x fewer bytes than float;
    :func:`normalise_uint8` finishes the job where the batch is used)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def normalise_uint8(x: Tensor) -> Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 in [0, 1], then ImageNet mean/std normalisation, on
    ``x``'s device; the same float32 operations as :func:`to_normalised_tensor`, so equal bits."""
    return imagenet_normalise(x.to(torch.float32) / 255.0)


def to_normalised_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> ``[3, H, W]`` float32 in [0, 1], then ImageNet mean/std normalisation."""
    return normalise_uint8(to_uint8_tensor(img))


def _region_crops(
    view: Image.Image, boxes: np.ndarray, size: int, rng: np.random.Generator
) -> Tensor:
    """Crop each xyxy view-pixel box, resize to ``size x size`` (aspect not kept), then an
    independent colour pipeline per crop -> ``[M, 3, size, size]`` uint8."""
    W, H = view.size
    crops = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64):
        x0, x1 = min(max(x0, 0.0), W - 1.0), min(max(x1, 0.0), float(W))
        y0, y1 = min(max(y0, 0.0), H - 1.0), min(max(y1, 0.0), float(H))
        x1, y1 = max(x1, x0 + 1.0), max(y1, y0 + 1.0)  # at least one pixel
        crop = view.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))
        crops.append(to_uint8_tensor(colour_augment(crop, rng)))
    return torch.stack(crops)


def sample_views(
    image: Image.Image, proposals: np.ndarray | None, opts: SiameseOptions,
    rng: np.random.Generator, image_id: str = "",
) -> SiameseSample | None:
    """One Siamese DETR sample (method.md section 2.1), or ``None`` when no region survives.

    Args:
        image: PIL image (converted to RGB).
        proposals: ``[K, 4]`` xyxy in original-image pixels, in score order (best first).
        opts: Siamese options (views, regions, crops).
        rng: the only source of randomness.
        image_id: copied into the sample.
    """
    on_device = opts.augment_on == "device"
    render = not (on_device and opts.view_resize_on == "device")
    plan = plan_views(image, proposals, opts, rng, render=render)
    if plan is None:
        return None
    boxes1, boxes2 = torch.from_numpy(plan.boxes1), torch.from_numpy(plan.boxes2)
    if on_device:  # the same random draws, in the same order; not applied
        crop_colour = None
        if opts.region_discrimination:
            crop_colour = torch.from_numpy(np.stack([
                np.stack([sample_colour_params(rng) for _ in range(len(b))])
                for b in (plan.boxes1, plan.boxes2)])).float()
        view_colour = torch.from_numpy(np.stack([sample_colour_params(rng),
                                                 sample_colour_params(rng)])).float()
        deferred = DeferredAugment(view_colour, crop_colour, opts.crop_size)
        if not render:  # the device renders the views from the outer rectangle
            deferred.source, deferred.source_sizes, deferred.rects = _view_source(plan)
            deferred.view_size = torch.tensor(plan.geom.size, dtype=torch.int64)
            empty = torch.zeros(3, 0, 0, dtype=torch.uint8)
            return SiameseSample(view1=empty, view2=empty, boxes1=boxes1, boxes2=boxes2,
                                 crops1=None, crops2=None, image_id=image_id,
                                 deferred=deferred)
        return SiameseSample(
            view1=to_uint8_tensor(plan.view1), view2=to_uint8_tensor(plan.view2),
            boxes1=boxes1, boxes2=boxes2, crops1=None, crops2=None, image_id=image_id,
            deferred=deferred)
    crops1 = crops2 = None
    if opts.region_discrimination:  # from the resized views, before their colour pipeline
        crops1 = _region_crops(plan.view1, plan.boxes1, opts.crop_size, rng)
        crops2 = _region_crops(plan.view2, plan.boxes2, opts.crop_size, rng)
    view1 = to_uint8_tensor(colour_augment(plan.view1, rng))
    view2 = to_uint8_tensor(colour_augment(plan.view2, rng))
    return SiameseSample(view1=view1, view2=view2, boxes1=boxes1, boxes2=boxes2,
                         crops1=crops1, crops2=crops2, image_id=image_id)


def crop_and_colour(image: Image.Image, boxes: np.ndarray, size: int,
                    rng: np.random.Generator | None, defer_colour: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
    """Crop every xyxy pixel box of ``image``, resize it to ``size x size`` (bilinear, aspect
    not kept), apply an independent colour pipeline to each when ``rng`` is given, normalise
    -> (``[K, 3, size, size]`` float, ``None``). With ``defer_colour`` (``augment_on=device``)
    the same parameters are drawn but not applied -> (uint8 crops, ``[K, NUM_COLOUR_PARAMS]``)
    for :func:`~siamese_detr.methods.siamese.colour.colour_normalise` on the device. The
    crops of DETReg and the patches of UP-DETR."""
    defer = defer_colour and rng is not None
    crops, params = [], []
    for b in np.asarray(boxes, dtype=np.float64):
        crop = image.resize((size, size), Image.Resampling.BILINEAR,
                            box=tuple(float(v) for v in b))
        p = None if rng is None else sample_colour_params(rng)
        if defer:
            crops.append(to_uint8_tensor(crop))
            params.append(p)
        else:
            crops.append(to_normalised_tensor(crop if p is None else apply_colour_pil(crop, p)))
    out = torch.stack(crops) if crops else torch.zeros(
        0, 3, size, size, dtype=torch.uint8 if defer else torch.float32)
    if not defer:
        return out, None
    return out, torch.from_numpy(np.stack(params)).float() if params else torch.zeros(
        0, NUM_COLOUR_PARAMS)
