"""UP-DETR data side: one unlabelled image -> the resized image, ``M`` random query patches cut
from it and their boxes (the random-query-patch-detection targets).

Follows dddzg/up-detr ``datasets/selfdet.py`` (see docs/method.md, UP-DETR section):

1. ``M`` patches are drawn on the *original* image: width ``sw`` uniform in
   ``[min_patch, w - min_patch]``, height likewise, top-left ``x`` uniform in ``[0, w - sw)``
   (``y`` likewise), so every patch lies inside the image with sides ``>= min_patch``.
2. Each patch is cropped, resized to ``patch_size x patch_size`` (aspect not kept) and gets its
   own SimCLR colour pipeline (jitter p=0.8, grayscale p=0.2, blur p=0.5); no flip.
3. The image gets DETR's random resize (short side from ``base_scales``, long side at most
   ``base_max_size``), the boxes are scaled with it; no flip, no colour change.

Boxes are absolute **xyxy** pixels of the resized image; sizes are ``(H, W)``. All randomness
comes from the ``rng`` argument, so a sample is a pure function of (image, opts, rng state).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from siamese_detr.config import RunConfig, UPDETROptions
from siamese_detr.data.collate import pad_images, stack_batch
from siamese_detr.data.images import IMAGE_ERRORS, load_rgb
from siamese_detr.data.transforms import get_size
from siamese_detr.errors import ConfigError
from siamese_detr.methods.siamese.colour import resolve_augment_on
from siamese_detr.methods.siamese.data import sample_rng
from siamese_detr.methods.siamese.views import crop_and_colour, to_uint8_tensor
from siamese_detr.structures import ImageBatch

if TYPE_CHECKING:
    from siamese_detr.data.sources import ImageRecord

__all__ = [
    "UPDETRBatch",
    "UPDETRDataset",
    "UPDETRSample",
    "build_updetr_dataset",
    "collate_updetr",
    "crop_patches",
    "sample_patch_boxes",
    "sample_updetr",
]

log = logging.getLogger(__name__)
_IMAGE_ERRORS = IMAGE_ERRORS


@dataclass
class UPDETRSample:
    """One training sample.

    Attributes:
        image: ``[3, H, W]`` uint8 resized image (ImageNet-normalised where the batch is used).
        boxes: ``[M, 4]`` float32 xyxy of the patches in resized-image pixels.
        patches: ``[M, 3, c, c]`` normalised, colour-augmented patch crops.
        image_id: id of the source image.
        patch_colour: ``augment_on=device``: the patches are uint8 and un-coloured, and these
            ``[M, NUM_COLOUR_PARAMS]`` are their colour parameters; else ``None``.
    """

    image: Tensor
    boxes: Tensor
    patches: Tensor
    image_id: str = ""
    patch_colour: Tensor | None = None


def sample_patch_boxes(
    width: int, height: int, num: int, min_patch: int, rng: np.random.Generator
) -> np.ndarray | None:
    """``[num, 4]`` integer-valued xyxy patch boxes inside a ``width x height`` image (float64),
    or ``None`` when the image is too small (a side ``<= 2 * min_patch``; upstream skips images
    with a side ``<= 16`` for ``min_patch = 8``)."""
    if min(width, height) <= 2 * min_patch:
        return None
    sw = rng.integers(min_patch, width - min_patch + 1, size=num)
    sh = rng.integers(min_patch, height - min_patch + 1, size=num)
    x = rng.integers(0, width - sw)  # exclusive upper bound, as np.random.randint(w - sw)
    y = rng.integers(0, height - sh)
    return np.stack([x, y, x + sw, y + sh], axis=1).astype(np.float64)


def crop_patches(
    image: Image.Image, boxes: np.ndarray, size: int, rng: np.random.Generator | None,
    defer_colour: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Crop each xyxy box of ``image``, resize it to ``size x size`` (bilinear, aspect not
    kept), colour-augment it when ``rng`` is given, normalise -> (``[M, 3, size, size]``,
    ``None``), or with ``defer_colour`` (uint8 patches, their colour parameters):
    :func:`~siamese_detr.methods.siamese.views.crop_and_colour`."""
    return crop_and_colour(image, boxes, size, rng, defer_colour)


def sample_updetr(
    image: Image.Image, opts: UPDETROptions, rng: np.random.Generator, image_id: str = ""
) -> UPDETRSample | None:
    """One UP-DETR sample (module docstring), or ``None`` when the image is too small."""
    image = image.convert("RGB")
    w, h = image.size
    boxes = sample_patch_boxes(w, h, opts.num_patches, opts.min_patch, rng)
    if boxes is None:
        return None
    patches, colour = crop_patches(image, boxes, opts.patch_size, rng,
                                   defer_colour=opts.augment_on == "device")
    short = int(opts.base_scales[int(rng.integers(len(opts.base_scales)))])
    oh, ow = get_size((h, w), short, opts.base_max_size)
    resized = image.resize((ow, oh), Image.BILINEAR)
    scaled = boxes * np.array([ow / w, oh / h] * 2)
    return UPDETRSample(
        image=to_uint8_tensor(resized), boxes=torch.from_numpy(scaled).float(),
        patches=patches, image_id=image_id, patch_colour=colour,
    )


class UPDETRDataset(Dataset):
    """Unlabelled images -> :class:`UPDETRSample` (or ``None`` for an unusable image).

    ``dataset[i]`` or ``dataset[(i, position)]``; the sample's randomness comes from the shared
    per-sample generator ``(seed, i, position)``, so a resumed stream replays exactly.
    """

    accepts_position = True  # build_detection_loader passes (index, stream position)

    def __init__(self, records: Sequence[ImageRecord], opts: UPDETROptions, seed: int) -> None:
        self.records = list(records)
        self.opts = opts
        self.seed = int(seed)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> UPDETRSample | None:
        index, position = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        record = self.records[index]
        try:
            image = load_rgb(record.path)
        except _IMAGE_ERRORS as exc:
            self._warn(record.image_id, f"unreadable image {record.path} ({exc})")
            return None
        sample = sample_updetr(image, self.opts, sample_rng(self.seed, index, position),
                               image_id=record.image_id)
        if sample is None:
            self._warn(record.image_id, f"image {image.size} too small for patches of at least "
                       f"{self.opts.min_patch} px (skipped)")
        return sample

    def _warn(self, image_id: str, message: str) -> None:
        if image_id not in self._warned:
            self._warned.add(image_id)
            log.warning("pretrain data: image %s: %s", image_id, message)


@dataclass
class UPDETRBatch:
    """A collated batch.

    Attributes:
        images: ``ImageBatch [B, 3, Hmax, Wmax]`` (mask True on padding).
        boxes: ``[B, M, 4]`` float xyxy patch boxes in unpadded image pixels.
        patches: ``[B, M, 3, c, c]`` patch crops.
        image_ids: ids of the ``B`` kept samples.
        skipped: number of ``None`` samples dropped from this batch.
        patch_colour: ``[B, M, NUM_COLOUR_PARAMS]`` colour parameters of uint8 un-coloured
            patches (``augment_on=device``), or ``None``.
    """

    images: ImageBatch
    boxes: Tensor
    patches: Tensor
    image_ids: list[str]
    skipped: int = 0
    patch_colour: Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def pin_memory(self) -> UPDETRBatch:
        """Page-locked copy (``DataLoader(pin_memory=True)`` calls this)."""
        return UPDETRBatch(
            images=self.images.pin_memory(), boxes=self.boxes.pin_memory(),
            patches=self.patches.pin_memory(), image_ids=list(self.image_ids),
            skipped=self.skipped,
            patch_colour=None if self.patch_colour is None else self.patch_colour.pin_memory(),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UPDETRBatch:
        return UPDETRBatch(
            images=self.images.to(device, non_blocking),
            boxes=self.boxes.to(device, non_blocking=non_blocking),
            patches=self.patches.to(device, non_blocking=non_blocking),
            image_ids=list(self.image_ids), skipped=self.skipped,
            patch_colour=None if self.patch_colour is None else self.patch_colour.to(
                device, non_blocking=non_blocking),
        )


def collate_updetr(samples: Sequence[UPDETRSample | None]) -> UPDETRBatch:
    """Drop ``None`` samples (counted in ``skipped``), pad the images, stack boxes and patches.
    All-``None`` -> an empty batch (B = 0)."""
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        empty = ImageBatch(images=torch.zeros(0, 3, 0, 0),
                           mask=torch.zeros(0, 0, 0, dtype=torch.bool),
                           sizes=torch.zeros(0, 2, dtype=torch.int64))
        return UPDETRBatch(empty, torch.zeros(0, 0, 4), torch.zeros(0, 0, 3, 0, 0), [], skipped)
    return UPDETRBatch(
        images=pad_images([s.image for s in kept]),
        boxes=torch.stack([s.boxes for s in kept]).float(),
        patches=stack_batch([s.patches for s in kept]),
        image_ids=[s.image_id for s in kept], skipped=skipped,
        patch_colour=torch.stack([s.patch_colour for s in kept])  # type: ignore[misc]
        if all(s.patch_colour is not None for s in kept) else None,
    )


def build_updetr_dataset(cfg: RunConfig) -> UPDETRDataset:
    """The pretraining images of ``cfg.pretrain.images`` as a UP-DETR data set (no proposals)."""
    from siamese_detr.data.sources import list_images

    if not cfg.pretrain.images:
        raise ConfigError("pretrain.images is empty: give an image folder, list file or COCO "
                          "json, e.g. pretrain.images=data/imagenet/train")
    opts = cfg.pretrain.updetr
    opts = replace(opts, augment_on=resolve_augment_on(opts.augment_on, cfg.engine.device))
    return UPDETRDataset(list_images(cfg.pretrain.images), opts, cfg.seed)
