"""DETReg pretraining data: top-k region proposals of an image as class-agnostic targets.

One sample (amirbar/DETReg ``datasets/selfdet.py``, see docs/method.md "DETReg"):

1. read the image and its first ``max_proposals`` boxes from the proposal store (score order;
   ``strategy="random"`` takes another image's boxes, rescaled to this image);
2. when the embedding target comes from crops: crop every box from the *original* image,
   resize to ``crop_size`` x ``crop_size`` and give each crop its own colour pipeline
   (SimCLR: jitter p=0.8, grayscale p=0.2, blur p=0.5), the official query transform;
3. DETR's augmentation of the image and boxes: flip p=0.5, then with p=0.5 a resize to
   ``base_scales`` (long side <= ``base_max_size``), else resize to ``crop_scales``, a random
   crop with sides in ``crop_range``, and the ``base_scales`` resize;
4. boxes cut away by the crop are dropped (with their crops); fewer than ``min_boxes`` left
   gives ``None`` (the official code draws another image instead).

Targets are normalised cxcywh boxes of the augmented image with label 0 ("object").
Randomness: Python ``random`` (the DETR transforms; seeded per stream position by
:class:`~siamese_detr.data.loaders.SeededSamples`) and a NumPy generator that is a pure
function of ``(seed, index, position)`` (crops, random strategy), so resume is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from siamese_detr.config import DETRegOptions, ProposalReadConfig, RunConfig
from siamese_detr.data import transforms as T
from siamese_detr.data.collate import pad_images
from siamese_detr.data.images import IMAGE_ERRORS, load_rgb
from siamese_detr.errors import ConfigError
from siamese_detr.methods.siamese.colour import resolve_augment_on
from siamese_detr.methods.siamese.views import crop_and_colour
from siamese_detr.structures import BoxTargets, ImageBatch

if TYPE_CHECKING:
    from siamese_detr.data.sources import ImageRecord
    from siamese_detr.proposals.store import ProposalStore

__all__ = [
    "build_detreg_dataset",
    "DETRegBatch",
    "DETRegDataset",
    "DETRegSample",
    "collate_detreg",
    "detreg_transforms",
    "region_crops",
]

log = logging.getLogger(__name__)


def _rng(seed: int, index: int, position: int) -> np.random.Generator:
    mask = (1 << 64) - 1
    return np.random.default_rng([seed & mask, index & mask, position & mask, 0xDE7E6])


@dataclass
class DETRegSample:
    """One training sample.

    Attributes:
        image: ``[3, h, w]`` uint8 augmented image (the detector normalises it,
            :meth:`~siamese_detr.structures.ImageBatch.normalised`).
        boxes: ``[K, 4]`` normalised cxcywh pseudo targets in that image (``K >= min_boxes``).
        crops: ``[K, 3, c, c]`` normalised crops of the same boxes, or ``None``.
        image_id: the record's id.
        crop_colour: ``augment_on=device``: the crops are uint8 and un-coloured, and these
            ``[K, NUM_COLOUR_PARAMS]`` are their colour parameters; else ``None``.
    """

    image: Tensor
    boxes: Tensor
    crops: Tensor | None
    image_id: str
    crop_colour: Tensor | None = None


def detreg_transforms(opts: DETRegOptions) -> T.Compose:
    """DETReg's detection augmentation (``make_self_det_transforms('train')``), ending with a
    uint8 image (normalised on the training device) and normalised cxcywh boxes."""
    base = T.RandomResize(opts.base_scales, max_size=opts.base_max_size)
    cropped = T.Compose([T.RandomResize(opts.crop_scales), T.RandomSizeCrop(*opts.crop_range),
                         T.RandomResize(opts.base_scales, max_size=opts.base_max_size)])
    return T.Compose([T.RandomHorizontalFlip(), T.RandomSelect(base, cropped),
                      T.ToUint8Tensor(), T.NormalizeBoxes()])


def region_crops(image: Image.Image, boxes: np.ndarray, size: int,
                 rng: np.random.Generator, defer_colour: bool = False
                 ) -> tuple[Tensor, Tensor | None]:
    """Crop every xyxy pixel box of ``image``, resize to ``size x size`` (aspect not kept) and
    apply an independent colour pipeline to each -> (``[K, 3, size, size]`` normalised float,
    ``None``), or with ``defer_colour`` (uint8 crops, their colour parameters):
    :func:`~siamese_detr.methods.siamese.views.crop_and_colour`."""
    return crop_and_colour(image, boxes, size, rng, defer_colour)


def clip_boxes(boxes: np.ndarray, height: int, width: int, min_side: float = 1.0
               ) -> np.ndarray:
    """Clip ``[K, 4]`` xyxy boxes to the image; drop those with a side below ``min_side``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = b[:, 0::2].clip(0, width)
    b[:, 1::2] = b[:, 1::2].clip(0, height)
    keep = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= min_side
    return b[keep]


class DETRegDataset(Dataset):
    """Unlabelled images + a proposal store -> :class:`DETRegSample` (or ``None``).

    ``dataset[(i, position)]`` draws its randomness from ``(seed, i, position)``; data problems
    (unreadable image, no proposals, too few boxes left) give ``None`` with one warning per
    image, which :func:`collate_detreg` counts as skipped.
    """

    accepts_position = True

    def __init__(self, records: Sequence[ImageRecord], store: ProposalStore, opts: DETRegOptions,
                 seed: int, proposals_cfg: ProposalReadConfig | None = None,
                 with_crops: bool = True) -> None:
        self.records = list(records)
        self.store = store
        self.opts = opts
        self.seed = int(seed)
        self.proposals_cfg = proposals_cfg or ProposalReadConfig()
        self.with_crops = with_crops
        self.transform = detreg_transforms(opts)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def _warn(self, image_id: str, message: str) -> None:
        if image_id not in self._warned:
            self._warned.add(image_id)
            log.warning("detreg data: image %s: %s", image_id, message)

    def proposals(self, index: int, width: int, height: int, rng: np.random.Generator
                  ) -> np.ndarray | None:
        """The pseudo-target boxes (xyxy pixels of image ``index``), at most ``max_proposals``,
        clipped to the image, before augmentation."""
        cfg, opts = self.proposals_cfg, self.opts
        source = self.records[index].image_id
        if opts.strategy == "random" and len(self.records) > 1:
            other = int(rng.integers(len(self.records) - 1))
            source = self.records[other + (other >= index)].image_id
        try:
            if source not in self.store:
                self._warn(source, "no proposals in the store (skipped)")
                return None
            boxes, _ = self.store.get(source, top_k=opts.max_proposals,
                                      min_size=cfg.min_size, min_score=cfg.min_score)
            if source != self.records[index].image_id:  # another image's boxes, rescaled
                src_h, src_w = self.store.image_size(source)
                if src_h > 0 and src_w > 0:
                    boxes = boxes * np.array([width / src_w, height / src_h] * 2, np.float32)
        except (KeyError, OSError, ValueError) as exc:
            self._warn(source, f"unreadable proposals ({exc})")
            return None
        return clip_boxes(boxes, height, width)

    def __getitem__(self, key: int | tuple[int, int]) -> DETRegSample | None:
        index, position = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        record = self.records[index]
        try:
            image = load_rgb(record.path)  # the one decoder (16-bit, palette, CMYK, EXIF)
        except IMAGE_ERRORS as exc:
            self._warn(record.image_id, f"unreadable image {record.path} ({exc})")
            return None
        rng = _rng(self.seed, index, position)
        boxes = self.proposals(index, image.width, image.height, rng)
        if boxes is None or len(boxes) < self.opts.min_boxes:
            self._warn(record.image_id, f"fewer than {self.opts.min_boxes} proposals (skipped)")
            return None
        crops = colour = None
        if self.with_crops:
            crops, colour = region_crops(image, boxes, self.opts.crop_size, rng,
                                         defer_colour=self.opts.augment_on == "device")
        target = {"boxes": torch.from_numpy(boxes),
                  "labels": torch.arange(len(boxes), dtype=torch.int64)}  # tracks survivors
        tensor, target = self.transform(image, target)
        keep = target["labels"]
        if len(keep) < self.opts.min_boxes:
            return None
        return DETRegSample(image=tensor, boxes=target["boxes"].float(),
                            crops=None if crops is None else crops[keep],
                            image_id=record.image_id,
                            crop_colour=None if colour is None else colour[keep])


@dataclass
class DETRegBatch:
    """A collated batch.

    Attributes:
        images: padded ``ImageBatch`` ``[B, 3, H, W]``.
        targets: per image ``BoxTargets`` (normalised cxcywh, labels all 0, ``size``).
        crops: per image ``[K_i, 3, c, c]`` crops or ``None``.
        image_ids: ids of the ``B`` kept samples.
        skipped: ``None`` samples dropped from this batch.
        crop_colour: per image ``[K_i, NUM_COLOUR_PARAMS]`` colour parameters of uint8,
            un-coloured crops (``augment_on=device``), or ``None``.
    """

    images: ImageBatch
    targets: list[BoxTargets]
    crops: list[Tensor] | None
    image_ids: list[str]
    skipped: int = 0
    crop_colour: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def pin_memory(self) -> DETRegBatch:
        """Page-locked copy (``DataLoader(pin_memory=True)`` calls this)."""
        return DETRegBatch(
            images=self.images.pin_memory(), targets=[t.pin_memory() for t in self.targets],
            crops=None if self.crops is None else [c.pin_memory() for c in self.crops],
            image_ids=list(self.image_ids), skipped=self.skipped,
            crop_colour=None if self.crop_colour is None else [
                c.pin_memory() for c in self.crop_colour],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DETRegBatch:
        return DETRegBatch(
            images=self.images.to(device, non_blocking),
            targets=[t.to(device) for t in self.targets],
            crops=None if self.crops is None else [c.to(device, non_blocking=non_blocking)
                                                   for c in self.crops],
            image_ids=list(self.image_ids), skipped=self.skipped,
            crop_colour=None if self.crop_colour is None else [
                c.to(device, non_blocking=non_blocking) for c in self.crop_colour],
        )


def collate_detreg(samples: Sequence[DETRegSample | None]) -> DETRegBatch:
    """Drop ``None`` samples (counted in ``skipped``), pad the images, wrap the boxes as
    ``BoxTargets`` with label 0. All-``None`` gives an empty batch (``len == 0``)."""
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        empty = ImageBatch(images=torch.zeros(0, 3, 0, 0),
                           mask=torch.zeros(0, 0, 0, dtype=torch.bool),
                           sizes=torch.zeros(0, 2, dtype=torch.int64))
        return DETRegBatch(empty, [], None, [], skipped)
    images = pad_images([s.image for s in kept])
    targets = [BoxTargets(boxes=s.boxes, labels=torch.zeros(len(s.boxes), dtype=torch.int64),
                          size=images.sizes[i].clone(), orig_size=images.sizes[i].clone())
               for i, s in enumerate(kept)]
    has_crops = all(s.crops is not None for s in kept)
    crops = [s.crops for s in kept] if has_crops else None  # type: ignore[misc]
    deferred = has_crops and all(s.crop_colour is not None for s in kept)
    colour = [s.crop_colour for s in kept] if deferred else None  # type: ignore[misc]
    return DETRegBatch(images, targets, crops, [s.image_id for s in kept], skipped, colour)


def build_detreg_dataset(cfg: RunConfig, records: Sequence[Any] | None = None) -> DETRegDataset:
    """The data set of ``cfg``: ``pretrain.images`` (or ``records``) with the proposal store
    ``pretrain.proposals.store``; one-line errors name the key to fix."""
    from siamese_detr.data.sources import list_images
    from siamese_detr.proposals.store import ProposalStore

    pre = cfg.pretrain
    if records is None:
        if not pre.images:
            raise ConfigError("pretrain.images is empty: give an image folder, list file or "
                              "COCO json, e.g. pretrain.images=data/imagenet/train")
        records = list_images(pre.images)
    if not pre.proposals.store:
        raise ConfigError("pretrain.proposals.store is empty: run `siamese-detr proposals run "
                          "IMAGES --out STORE` first and set pretrain.proposals.store=STORE")
    if not Path(pre.proposals.store).is_dir():
        raise ConfigError(f"proposal store {pre.proposals.store} does not exist: run "
                          f"`siamese-detr proposals run {pre.images} --out {pre.proposals.store}"
                          "` (DETReg used --method selective-search)")
    store = ProposalStore.open(pre.proposals.store)
    with_crops = pre.detreg.object_embedding_loss and pre.detreg.embedding_source == "crops"
    opts = replace(pre.detreg,
                   augment_on=resolve_augment_on(pre.detreg.augment_on, cfg.engine.device))
    return DETRegDataset(records, store, opts, cfg.seed, pre.proposals, with_crops)
