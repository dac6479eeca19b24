"""Joint image + target transforms for supervised detection (DETR's ``datasets/transforms.py``).

Every transform is a callable ``(image, target) -> (image, target)``. ``image`` is a PIL image
(or a ``[3, H, W]`` tensor; flip/resize/crop accept both) and ``target`` a dict with

* ``"boxes"``: ``[K, 4]`` float32, **absolute pixel xyxy** (until :class:`Normalize`),
* ``"labels"``: ``[K]`` int64, ``"area"``: ``[K]`` float32, ``"iscrowd"``: ``[K]`` int64,
* ``"size"``: ``[2]`` int64 ``(h, w)`` of the current image (kept up to date).

:class:`Normalize` is the last step: it normalises the image with mean/std and converts
``boxes`` to **normalised cxcywh** relative to the image size, as DETR does.

Randomness comes only from Python's :mod:`random` module (as in DETR; the crop position too),
so seeding ``random`` makes a pipeline deterministic; the data loaders do this per sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from siamese_detr.config import DataConfig
from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD
from siamese_detr.ops.boxes import box_xyxy_to_cxcywh

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSizeCrop",
    "RandomSelect",
    "ToTensor",
    "ToUint8Tensor",
    "NormalizeBoxes",
    "Normalize",
    "get_size",
    "hflip",
    "resize",
    "crop",
    "build_transforms",
]


ImageLike = Image.Image | Tensor
Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]


def image_hw(image: ImageLike) -> tuple[int, int]:
    """``(h, w)`` of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def get_size(hw: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """DETR's ``get_size_with_aspect_ratio``: output ``(h, w)`` whose short side is ``size``
    unless the long side would exceed ``max_size``, in which case the short side shrinks to
    ``round(max_size * short / long)``. The long side is truncated (``int``), as upstream.

    Example: ``get_size((480, 640), 800, 1333) == (800, 1066)``.
    """
    h, w = hw
    if max_size is not None:
        min_orig, max_orig = float(min(h, w)), float(max(h, w))
        if max_orig / min_orig * size > max_size:
            size = int(round(max_size * min_orig / max_orig))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def hflip(image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
    """Mirror left-right; boxes ``x1' = w - x2``, ``x2' = w - x1``."""
    _, w = image_hw(image)
    out = F.horizontal_flip(image)
    target = dict(target)
    boxes = target.get("boxes")
    if boxes is not None:
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * boxes.new_tensor([-1, 1, -1, 1]) + (
            boxes.new_tensor([w, 0, w, 0])
        )
    return out, target


def resize(
    image: ImageLike, target: Target, size: int | tuple[int, int], max_size: int | None = None
) -> tuple[ImageLike, Target]:
    """Resize to ``size`` (short side, DETR's rule, see :func:`get_size`) or to an exact
    ``(h, w)`` tuple; boxes scale by ``(w'/w, h'/h)`` and areas by their product."""
    h, w = image_hw(image)
    new_h, new_w = size if isinstance(size, tuple) else get_size((h, w), size, max_size)
    out = F.resize(image, [new_h, new_w], antialias=True)
    rw, rh = new_w / w, new_h / h
    target = dict(target)
    if target.get("boxes") is not None:
        target["boxes"] = target["boxes"] * target["boxes"].new_tensor([rw, rh, rw, rh])
    if target.get("area") is not None:
        target["area"] = target["area"] * (rw * rh)
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return out, target


def crop(
    image: ImageLike, target: Target, region: tuple[int, int, int, int]
) -> tuple[ImageLike, Target]:
    """Crop ``region = (top, left, height, width)``. Boxes are shifted and clipped to the crop,
    ``area`` becomes the clipped box area, and objects whose clipped box is empty are removed
    (from ``boxes``, ``labels``, ``area``, ``iscrowd``)."""
    top, left, height, width = region
    out = F.crop(image, top, left, height, width)
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    boxes = target.get("boxes")
    if boxes is not None:
        limit = boxes.new_tensor([width, height])
        shifted = (boxes - boxes.new_tensor([left, top, left, top])).reshape(-1, 2, 2)
        clipped = torch.min(shifted, limit).clamp(min=0)
        keep = torch.all(clipped[:, 1, :] > clipped[:, 0, :], dim=1)
        target["boxes"] = clipped.reshape(-1, 4)
        target["area"] = (clipped[:, 1, :] - clipped[:, 0, :]).prod(dim=1)
        for key in ("boxes", "labels", "area", "iscrowd"):
            if target.get(key) is not None:
                target[key] = target[key][keep]
    return out, target


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the short side to a size drawn uniformly from ``sizes`` (long side capped at
    ``max_size``, DETR's :func:`get_size` rule)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize({self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random ``h x w`` window with ``h, w`` uniform in ``[min_size, min(side,
    max_size)]`` at a uniform position (DETR). Unlike upstream, a side shorter than
    ``min_size`` is kept whole instead of raising."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        h, w = image_hw(image)
        tw = random.randint(min(self.min_size, w), min(w, self.max_size))
        th = random.randint(min(self.min_size, h), min(h, self.max_size))
        top = random.randint(0, h - th)
        left = random.randint(0, w - tw)
        return crop(image, target, (top, left, th, tw))

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class ToTensor:
    """PIL image -> ``[3, H, W]`` float32 in ``[0, 1]`` (tensors are converted to float)."""

    def __call__(self, image: ImageLike, target: Target) -> tuple[Tensor, Target]:
        if isinstance(image, Image.Image):
            image = F.pil_to_tensor(image.convert("RGB"))
        if not image.is_floating_point():
            image = image.to(torch.float32) / 255.0
        return image, target

    def __repr__(self) -> str:
        return "ToTensor()"


class ToUint8Tensor:
    """PIL image -> ``[3, H, W]`` uint8 (4x fewer bytes than float for a loader worker to hand
    over; normalised where the batch is used, as ``ToTensor() + Normalize()`` would)."""

    def __call__(self, image: ImageLike, target: Target) -> tuple[Tensor, Target]:
        if isinstance(image, Image.Image):
            image = F.pil_to_tensor(image.convert("RGB"))
        return image, target

    def __repr__(self) -> str:
        return "ToUint8Tensor()"


class NormalizeBoxes:
    """Boxes absolute xyxy -> normalised cxcywh in ``[0, 1]`` relative to the image's
    ``(h, w)``, and ``target["size"]``; the image is left as it is. Must be the last
    transform."""

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        h, w = image_hw(image)
        target = dict(target)
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        boxes = target.get("boxes")
        if boxes is not None:
            target["boxes"] = box_xyxy_to_cxcywh(boxes) / boxes.new_tensor([w, h, w, h])
        return image, target

    def __repr__(self) -> str:
        return "NormalizeBoxes()"


class Normalize(NormalizeBoxes):
    """``(image - mean) / std``; boxes absolute xyxy -> normalised cxcywh in ``[0, 1]``
    relative to the image's ``(h, w)``. Must be the last transform."""

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        return super().__call__(F.normalize(image, mean=self.mean, std=self.std), target)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_transforms(cfg: DataConfig, train: bool) -> Compose:
    """The detection pipeline of ``cfg.augment`` (DETR ``make_coco_transforms``).

    * train, ``detr``: flip; either resize(train_scales, max_size) or
      [resize(crop_scales), RandomSizeCrop(*crop_size), resize(train_scales, max_size)].
    * train, ``fixed``: flip; resize to ``val_size`` (max ``max_size``).
    * train, ``none``: no geometric change.
    * eval (any ``augment``): resize to ``val_size`` (max ``max_size``).

    All end with ToUint8Tensor + NormalizeBoxes (boxes -> normalised cxcywh): the image
    leaves the worker as uint8 and the detector normalises it (``ImageBatch.normalised``),
    the same bits as ToTensor + Normalize in the worker.
    """
    final: list[Transform] = [ToUint8Tensor(), NormalizeBoxes()]
    if not train:
        return Compose([RandomResize([cfg.val_size], cfg.max_size), *final])
    if cfg.augment == "detr":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(cfg.train_scales, cfg.max_size),
                Compose([
                    RandomResize(cfg.crop_scales),
                    RandomSizeCrop(*cfg.crop_size),
                    RandomResize(cfg.train_scales, cfg.max_size),
                ]),
            ),
            *final,
        ])
    if cfg.augment == "fixed":
        return Compose([RandomHorizontalFlip(), RandomResize([cfg.val_size], cfg.max_size),
                        *final])
    return Compose(final)
