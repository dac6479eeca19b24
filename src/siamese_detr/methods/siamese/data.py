"""Siamese DETR pretraining data: dataset, collation and a debugging drawer.

Boxes are absolute **xyxy** pixels: proposals in original-image pixels (as stored), region
boxes in each view's unpadded pixels. Sizes are ``(H, W)``. Masks are True on padding.
"""

from __future__ import annotations

import colorsys
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from siamese_detr.config import ProposalReadConfig, RunConfig, SiameseOptions
from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD
from siamese_detr.data.collate import pad_images, padding_mask
from siamese_detr.data.images import IMAGE_ERRORS, load_rgb
from siamese_detr.errors import ConfigError
from siamese_detr.methods.siamese.colour import (
    colour_augment_tensor,
    colour_normalise,
    resolve_augment_on,
)
from siamese_detr.methods.siamese.views import (
    DeferredAugment,
    SiameseSample,
    normalise_uint8,
    sample_views,
)
from siamese_detr.structures import ImageBatch, imagenet_normalise

if TYPE_CHECKING:
    from siamese_detr.data.sources import ImageRecord
    from siamese_detr.proposals.store import ProposalStore

__all__ = [
    "PretrainDataset",
    "build_pretrain_dataset",
    "SiameseBatch",
    "collate_siamese",
    "draw_views",
    "sample_rng",
]

log = logging.getLogger(__name__)
_IMAGE_ERRORS = IMAGE_ERRORS


@dataclass(frozen=True)
class SkippedSample:
    """What a :class:`PretrainDataset` with ``report_skips`` gives instead of ``None``: the
    reason travels to :func:`collate_siamese` and is counted in ``SiameseBatch.skip_reasons``."""

    image_id: str
    reason: str


def sample_rng(seed: int, index: int, position: int = 0) -> np.random.Generator:
    """The generator of one sample: a pure function of ``(seed, index, stream position)``."""
    mask = (1 << 64) - 1
    return np.random.default_rng([seed & mask, index & mask, position & mask])


class PretrainDataset(Dataset):
    """Unlabelled images + offline proposals -> :class:`SiameseSample` (or ``None``).

    ``dataset[i]`` or ``dataset[(i, position)]``: the sample's randomness is drawn from
    :func:`sample_rng` ``(seed, i, position)`` (position 0 for a bare index). Data problems
    (unreadable image, no stored proposals, no surviving region) give ``None`` and at most
    one warning per image; :func:`collate_siamese` counts them as skipped.
    """

    accepts_position = True  # build_detection_loader passes (index, stream position)

    def __init__(
        self, records: Sequence[ImageRecord], store: ProposalStore | None, opts: SiameseOptions,
        seed: int, proposals_cfg: ProposalReadConfig | None = None,
    ) -> None:
        if store is None and opts.box_source == "proposals":
            raise ValueError("box_source='proposals' needs a proposal store")
        self.records = list(records)
        self.store = store
        self.opts = opts
        self.seed = int(seed)
        self.proposals_cfg = proposals_cfg or ProposalReadConfig()
        self._warned: set[str] = set()
        self.report_skips = False  # True: SkippedSample(reason) instead of None
        self._reason = ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> SiameseSample | SkippedSample | None:
        index, position = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        record = self.records[index]
        self._reason = ""
        image = self._load_image(record)
        if image is None:
            return self._skipped(record)
        proposals = None
        if self.opts.box_source == "proposals":
            proposals = self._load_proposals(record, image.size)
            if proposals is None:
                return self._skipped(record)
        rng = sample_rng(self.seed, index, position)
        sample = sample_views(image, proposals, self.opts, rng, image_id=record.image_id)
        if sample is None:
            self._warn(record.image_id, "no region box survived the view crop (skipped)",
                       "no region survived the view crop")
            return self._skipped(record)
        return sample

    def _skipped(self, record: ImageRecord) -> SkippedSample | None:
        return SkippedSample(record.image_id, self._reason) if self.report_skips else None

    def _warn(self, image_id: str, message: str, reason: str = "") -> None:
        self._reason = reason or message
        if image_id not in self._warned:
            self._warned.add(image_id)
            log.warning("pretrain data: image %s: %s", image_id, message)

    def _load_image(self, record: ImageRecord) -> Image.Image | None:
        try:
            image = load_rgb(record.path)
        except _IMAGE_ERRORS as exc:
            self._warn(record.image_id, f"unreadable image {record.path} ({exc})",
                       "unreadable image")
            return None
        if min(image.size) < 2:
            self._warn(record.image_id, f"image too small {image.size}", "image too small")
            return None
        return image

    def _load_proposals(self, record: ImageRecord, image_size: tuple[int, int] | None = None
                        ) -> np.ndarray | None:
        assert self.store is not None
        cfg = self.proposals_cfg
        try:
            if record.image_id not in self.store:
                self._warn(record.image_id, "no proposals in the store (skipped)",
                           "no proposals in the store")
                return None
            stored = getattr(self.store, "image_size", None)
            h, w = stored(record.image_id) if stored is not None else (0, 0)
            boxes, _ = self.store.get(
                record.image_id, top_k=cfg.top_k, min_size=cfg.min_size, min_score=cfg.min_score
            )
        except (KeyError, OSError, ValueError) as exc:
            self._warn(record.image_id, f"unreadable proposals ({exc})", "unreadable proposals")
            return None
        if image_size is not None and h > 0 and w > 0 and (w, h) != tuple(image_size):
            self._warn(record.image_id, f"image is {image_size[0]}x{image_size[1]} but its "
                       f"proposals were computed on {w}x{h} (skipped)",
                       "image size differs from the proposal store")
            return None
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            self._warn(record.image_id, "empty proposal list (skipped)",
                       "no proposal left after pretrain.proposals filters (top_k, min_size, "
                       "min_score)")
            return None
        return boxes


@dataclass
class SiameseBatch:
    """A collated batch; both views of every sample share one padded ``[Hmax, Wmax]``.

    Attributes:
        view1, view2: ``ImageBatch`` ``[B, 3, Hmax, Wmax]`` (mask True on padding): uint8 RGB
            as collated (zero padding), float normalised after :meth:`normalised`.
        boxes1, boxes2: ``[B, M, 4]`` float xyxy in unpadded view pixels.
        crops1, crops2: ``[B, M, 3, c, c]`` (uint8 as collated) or ``None``.
        image_ids: ids of the ``B`` kept samples.
        skipped: number of ``None`` samples dropped from this batch.
        deferred: ``augment_on=device``: the views are un-coloured, the crops not cut yet
            (``crops1``/``crops2`` ``None``) and this holds the parameters
            (:class:`DeferredAugment` with a leading ``B``); :meth:`normalised` and
            :meth:`joint_inputs` finish the job where the batch is. ``None``: the workers did.
    """

    view1: ImageBatch
    view2: ImageBatch
    boxes1: Tensor
    boxes2: Tensor
    crops1: Tensor | None
    crops2: Tensor | None
    image_ids: list[str]
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    deferred: DeferredAugment | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def rendered(self) -> SiameseBatch:
        """The batch with its views made, where ``view_resize_on=device`` left them to the
        device (:func:`~siamese_detr.methods.siamese.views.render_views`, on the batch's
        device, in one call for both views of every sample); else itself."""
        d = self.deferred
        if d is None or d.source is None:
            return self
        mask, sizes = self.view1.mask, self.view1.sizes
        views = d.render(sizes, (int(mask.shape[-2]), int(mask.shape[-1])))
        return replace(self, view1=ImageBatch(views[:, 0], mask, sizes),
                       view2=ImageBatch(views[:, 1], self.view2.mask, self.view2.sizes),
                       deferred=d.without_source())

    def joint_raw(self, crops: bool = True
                  ) -> tuple[ImageBatch, Tensor, Tensor, Tensor | None, int]:
        """``augment_on=device``: what :meth:`joint_inputs` finishes, unfinished: both views
        as one uint8 batch of ``2B`` (rendered first where the device renders them), their
        region boxes ``[2B, M, 4]``, view colour ``[2B, P]``, crop colour ``[2B, M, P]``
        (``None`` without ``crops`` or crops) and the crop size, for
        :func:`finish_augmentation` inside the training step's dense part."""
        batch = self.rendered()
        d = batch.deferred
        if d is None:
            raise ValueError("joint_raw needs a batch with deferred augmentation")
        crop_colour = None
        if crops and d.crop_colour is not None:
            crop_colour = torch.cat([d.crop_colour[:, 0], d.crop_colour[:, 1]])
        return (batch._joint_views(), torch.cat([batch.boxes1, batch.boxes2]),
                torch.cat([d.view_colour[:, 0], d.view_colour[:, 1]]), crop_colour,
                d.crop_size)

    def _joint_views(self) -> ImageBatch:
        """Both views as one batch of ``2B``, view 1 then view 2, as they are."""
        v1, v2 = self.view1, self.view2
        return ImageBatch(torch.cat([v1.images, v2.images]), torch.cat([v1.mask, v2.mask]),
                          torch.cat([v1.sizes, v2.sizes]))

    def joint_inputs(self, crops: bool = True) -> tuple[ImageBatch, Tensor | None]:
        """Both views as one float32 normalised batch of ``2B`` (view 1 then view 2; they must
        share a padded size, as collated) and, with ``crops``, their region crops
        ``[2B, M, 3, c, c]`` normalised (``None`` when the batch has none), computed where the
        batch is, the deferred augmentation included."""
        if self.deferred is not None:
            return finish_augmentation(*self.joint_raw(crops))
        out = None
        if crops and self.crops1 is not None and self.crops2 is not None:
            out = normalise_crops(torch.cat([self.crops1, self.crops2]))
        return self._joint_views().normalised(), out

    def pin_memory(self) -> SiameseBatch:
        """Page-locked copy (``DataLoader(pin_memory=True)`` calls this)."""
        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return SiameseBatch(
            view1=self.view1.pin_memory(), view2=self.view2.pin_memory(),
            boxes1=self.boxes1.pin_memory(), boxes2=self.boxes2.pin_memory(),
            crops1=pin(self.crops1), crops2=pin(self.crops2),
            image_ids=list(self.image_ids), skipped=self.skipped,
            skip_reasons=dict(self.skip_reasons),
            deferred=None if self.deferred is None else self.deferred.pin_memory(),
        )

    def normalised(self) -> SiameseBatch:
        """Float32 ImageNet-normalised views (zero on padding, as the detector expects) and
        crops, computed where the batch is (the training device), the deferred augmentation
        included; a float batch is returned as it is. Without deferred augmentation: equal
        bits to normalising in the loader worker."""
        d = self.deferred
        if d is not None and d.source is not None:
            return self.rendered().normalised()
        if d is not None:
            done = []
            for k, (view, boxes) in enumerate([(self.view1, self.boxes1),
                                               (self.view2, self.boxes2)]):
                crop_colour = None if d.crop_colour is None else d.crop_colour[:, k]
                done.append(finish_augmentation(view, boxes, d.view_colour[:, k], crop_colour,
                                                d.crop_size))
            return replace(self, view1=done[0][0], view2=done[1][0], crops1=done[0][1],
                           crops2=done[1][1], deferred=None)
        tensors = (self.view1.images, self.view2.images, self.crops1, self.crops2)
        if not any(t is not None and t.dtype == torch.uint8 for t in tensors):
            return self
        return replace(self, view1=self.view1.normalised(),
                       view2=self.view2.normalised(), crops1=normalise_crops(self.crops1),
                       crops2=normalise_crops(self.crops2))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SiameseBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return SiameseBatch(
            view1=self.view1.to(device, non_blocking), view2=self.view2.to(device, non_blocking),
            boxes1=self.boxes1.to(device, non_blocking=non_blocking),
            boxes2=self.boxes2.to(device, non_blocking=non_blocking),
            crops1=move(self.crops1), crops2=move(self.crops2),
            image_ids=list(self.image_ids), skipped=self.skipped,
            skip_reasons=dict(self.skip_reasons),
            deferred=None if self.deferred is None else self.deferred.to(device, non_blocking),
        )


def cut_crops(images: Tensor, boxes: Tensor, sizes: Tensor, size: int) -> Tensor:
    """The worker's region crops, on the batch's device: each xyxy box of ``boxes``
    ``[N, M, 4]`` (clamped to its image's unpadded ``sizes`` ``(h, w)`` as the worker does, at
    least one pixel wide) resampled from ``images`` ``[N, 3, H, W]`` float to ``size x size``
    with RoIAlign (pixel-aligned, adaptive sampling: an average over each output pixel's
    footprint, as PIL's filtered resize), rounded to 8-bit levels -> ``[N, M, 3, size, size]``.
    """
    from torchvision.ops import roi_align

    n, m = boxes.shape[:2]
    h = sizes[:, 0].to(boxes.dtype).view(n, 1)
    w = sizes[:, 1].to(boxes.dtype).view(n, 1)
    x0 = torch.minimum(boxes[..., 0].clamp(min=0.0), w - 1.0)
    y0 = torch.minimum(boxes[..., 1].clamp(min=0.0), h - 1.0)
    x1 = torch.maximum(torch.minimum(boxes[..., 2].clamp(min=0.0), w), x0 + 1.0)
    y1 = torch.maximum(torch.minimum(boxes[..., 3].clamp(min=0.0), h), y0 + 1.0)
    index = torch.arange(n, device=boxes.device, dtype=boxes.dtype).view(n, 1).expand(n, m)
    rois = torch.stack([index, x0, y0, x1, y1], -1).reshape(n * m, 5).to(images.dtype)
    crops = roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True)
    return (torch.round(crops.clamp(0.0, 1.0) * 255.0) / 255.0).view(n, m, 3, size, size)


def finish_augmentation(views: ImageBatch, boxes: Tensor, view_colour: Tensor,
                        crop_colour: Tensor | None, crop_size: int
                        ) -> tuple[ImageBatch, Tensor | None]:
    """``augment_on=device``: cut the region crops from the un-coloured uint8 ``views`` (as
    the worker cuts them before any colour), colour crops and views with their parameters
    (``[N, M, P]`` / ``[N, P]``), then ImageNet-normalise both (views zero on padding).
    Vectorised over the batch, no host read. -> (views, crops ``[N, M, 3, c, c]`` or
    ``None``)."""
    x = views.images.to(torch.float32) / 255.0
    crops = None
    if crop_colour is not None:
        crops = colour_normalise(cut_crops(x, boxes, views.sizes, crop_size), crop_colour)
    x = colour_augment_tensor(x, view_colour, sizes=views.sizes)
    images = imagenet_normalise(x).masked_fill(views.mask[:, None], 0.0)
    return ImageBatch(images, views.mask, views.sizes), crops


def normalise_crops(t: Tensor | None) -> Tensor | None:
    """uint8 crops -> float32 ImageNet-normalised; float or ``None`` unchanged."""
    return t if t is None or t.dtype != torch.uint8 else normalise_uint8(t)


def _empty_batch(skipped: int, reasons: dict[str, int]) -> SiameseBatch:
    empty = ImageBatch(
        images=torch.zeros(0, 3, 0, 0), mask=torch.zeros(0, 0, 0, dtype=torch.bool),
        sizes=torch.zeros(0, 2, dtype=torch.int64),
    )
    boxes = torch.zeros(0, 0, 4)
    return SiameseBatch(empty, empty, boxes, boxes.clone(), None, None, [], skipped, reasons)


def _placeholder_views(sizes: Tensor) -> ImageBatch:
    """The views of a batch the device renders: their mask (True on padding) and ``(H, W)``
    ``sizes``, with ``[B, 3, 0, 0]`` images until :meth:`SiameseBatch.rendered`."""
    H, W = (int(v) for v in sizes.max(dim=0).values)
    return ImageBatch(torch.zeros(len(sizes), 3, 0, 0, dtype=torch.uint8),
                      padding_mask(sizes, (H, W)), sizes)


def _split(batch: ImageBatch, n: int) -> tuple[ImageBatch, ImageBatch]:
    return (
        ImageBatch(batch.images[:n], batch.mask[:n], batch.sizes[:n]),
        ImageBatch(batch.images[n:], batch.mask[n:], batch.sizes[n:]),
    )


def collate_siamese(samples: Sequence[SiameseSample | SkippedSample | None]) -> SiameseBatch:
    """Drop ``None`` samples (counted in ``skipped``), pad both views of all samples to one
    common size, stack boxes ``[B, M, 4]`` and crops ``[B, M, 3, c, c]``. All-``None`` -> B=0."""
    kept = [s for s in samples if isinstance(s, SiameseSample)]
    skipped = len(samples) - len(kept)
    reasons: dict[str, int] = {}
    for s in samples:
        if isinstance(s, SkippedSample):
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
    if not kept:
        return _empty_batch(skipped, reasons)
    n = len(kept)
    ds = [s.deferred for s in kept if s.deferred is not None]
    sources = len(ds) == n and all(d.source is not None for d in ds)
    if sources:  # view_resize_on=device: the device renders the views (SiameseBatch.rendered)
        view1 = view2 = _placeholder_views(torch.stack([d.view_size for d in ds]))  # type: ignore[misc]
    else:
        view1, view2 = _split(pad_images([s.view1 for s in kept] + [s.view2 for s in kept]), n)
    has_crops = all(s.crops1 is not None and s.crops2 is not None for s in kept)
    deferred = None
    if len(ds) == n:
        with_crops = all(d.crop_colour is not None for d in ds)
        deferred = DeferredAugment(
            view_colour=torch.stack([d.view_colour for d in ds]),
            crop_colour=torch.stack([d.crop_colour for d in ds])  # type: ignore[misc]
            if with_crops else None,
            crop_size=ds[0].crop_size)
        if sources:
            padded = pad_images([d.source for d in ds])  # type: ignore[misc]
            deferred.source, deferred.source_sizes = padded.images, padded.sizes
            deferred.rects = torch.stack([d.rects for d in ds])  # type: ignore[misc]
    return SiameseBatch(
        view1=view1, view2=view2,
        boxes1=torch.stack([s.boxes1 for s in kept]).float(),
        boxes2=torch.stack([s.boxes2 for s in kept]).float(),
        crops1=torch.stack([s.crops1 for s in kept]) if has_crops else None,  # type: ignore[misc]
        crops2=torch.stack([s.crops2 for s in kept]) if has_crops else None,  # type: ignore[misc]
        image_ids=[s.image_id for s in kept], skipped=skipped, skip_reasons=reasons,
        deferred=deferred,
    )


def _to_pil(view: Tensor) -> Image.Image:
    """A ``[3, H, W]`` view (uint8, or ImageNet-normalised float) -> RGB PIL image."""
    if view.dtype == torch.uint8:
        return Image.fromarray(view.detach().cpu().permute(1, 2, 0).numpy())
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    arr = ((view.detach().cpu().float() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def _palette(n: int) -> list[tuple[int, int, int]]:
    colours = []
    for j in range(n):
        r, g, b = colorsys.hsv_to_rgb(j / max(n, 1), 0.9, 1.0)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def _region_panel(view: Image.Image, box: Sequence[float], colour: tuple[int, int, int]
                  ) -> Image.Image:
    """``view`` with one region: a translucent fill plus its outline (its exact extent)."""
    panel = view.convert("RGBA")
    overlay = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1, y1], fill=(*colour, 90), outline=(*colour, 255), width=2)
    return Image.alpha_composite(panel, overlay).convert("RGB")


def _region_rows(sample: SiameseSample, width: int, gap: int) -> Image.Image:
    """One row per region ``j``: view 1 and view 2 with only region ``j`` (filled), then the
    two ``L_r`` crops of ``j`` when the sample has them, and the box sizes in pixels."""
    sample = sample.rendered()
    left, right = _to_pil(sample.view1), _to_pil(sample.view2)
    colours = _palette(len(sample.boxes1))
    h = max(left.height, right.height)
    label_h = 12
    rows = Image.new("RGB", (width, len(colours) * (h + label_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(rows)
    for j, colour in enumerate(colours):
        top = j * (h + label_h + gap)
        b1, b2 = sample.boxes1[j].tolist(), sample.boxes2[j].tolist()
        x = 0
        for view, box in ((left, b1), (right, b2)):
            rows.paste(_region_panel(view, box, colour), (x, top + label_h))
            x += view.width + gap
        crops = [] if sample.crops1 is None or sample.crops2 is None else [
            _to_pil(sample.crops1[j]), _to_pil(sample.crops2[j])]
        for crop in crops:
            crop = crop.resize((h, h), Image.Resampling.BILINEAR)
            rows.paste(crop, (x, top + label_h))
            x += h + gap
        sizes = " | ".join(f"{b[2] - b[0]:.0f}x{b[3] - b[1]:.0f} px" for b in (b1, b2))
        text = f"region {j}: view 1 {sizes.replace(' | ', ', view 2 ')}"
        draw.text((2, top), text + ("   (L_r crops right)" if crops else ""), fill=colour)
    return rows


def draw_views(sample: SiameseSample, path: str | Path, gap: int = 8, scale: int = 1,
               per_region: bool = False) -> Path:
    """Save a PNG: view 1 | view 2 side by side, region ``j`` drawn in the same colour in both
    (region 0, the intersection, on top with a thicker outline), enlarged ``scale`` times
    (nearest neighbour). Returns the path written.

    Regions clamped to the views' intersection often share sides, so in the overview a later
    outline can hide most of an earlier one (a box then looks like a line). ``per_region``
    adds one row per region below the overview with only that region (filled) in both views
    and its two ``L_r`` crops: exactly the boxes and crops that training uses."""
    sample = sample.rendered()
    left, right = _to_pil(sample.view1), _to_pil(sample.view2)
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)),
                       (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    draw = ImageDraw.Draw(canvas)
    colours = _palette(len(sample.boxes1))
    for offset, boxes in ((0, sample.boxes1), (left.width + gap, sample.boxes2)):
        for j, (x0, y0, x1, y1) in reversed(list(enumerate(boxes.tolist()))):  # 0 on top
            if x1 <= x0 or y1 <= y0:  # zero-area region (no box): nothing to draw
                continue
            draw.rectangle([x0 + offset, y0, x1 + offset, y1], outline=colours[j],
                           width=3 if j == 0 else 2)
            draw.text((x0 + offset + 2, y0 + 1), str(j), fill=colours[j])
    if per_region:
        crops = sample.crops1 is not None and sample.crops2 is not None
        width = left.width + right.width + gap + (2 * (canvas.height + gap) if crops else 0)
        rows = _region_rows(sample, width, gap)
        full = Image.new("RGB", (width, canvas.height + gap + rows.height), (255, 255, 255))
        full.paste(canvas, (0, 0))
        full.paste(rows, (0, canvas.height + gap))
        canvas = full
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale),
                               Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def build_pretrain_dataset(cfg: RunConfig) -> PretrainDataset:
    """Unlabeled images + their offline proposals -> a data set of two-view samples."""
    from siamese_detr.data.sources import list_images
    from siamese_detr.proposals.store import ProposalStore

    pre = cfg.pretrain
    if not pre.images:
        raise ConfigError("pretrain.images is empty: give an image folder, list file or COCO "
                          "json, e.g. pretrain.images=data/imagenet/train")
    records = list_images(pre.images)
    store = None
    if pre.siamese.box_source == "proposals":
        if not pre.proposals.store:
            raise ConfigError("pretrain.proposals.store is empty: run `siamese-detr proposals "
                              "run IMAGES --out STORE` first, or set "
                              "pretrain.siamese.box_source=random")
        if not Path(pre.proposals.store).is_dir():
            raise ConfigError(f"proposal store {pre.proposals.store} does not exist: run "
                              f"`siamese-detr proposals run {pre.images} --out "
                              f"{pre.proposals.store}`")
        store = ProposalStore.open(pre.proposals.store)
        check_store_matches(store, records, pre.proposals.store, pre.images)
    # colour pipelines and crops on the GPU when there is one (auto)
    opts = replace(pre.siamese,
                   augment_on=resolve_augment_on(pre.siamese.augment_on, cfg.engine.device))
    dataset = PretrainDataset(records, store, opts, cfg.seed, pre.proposals)
    dataset.report_skips = True
    return dataset


def check_store_matches(store: Any, records: Sequence[ImageRecord], store_path: str,
                        images: str, probes: int = 8) -> None:
    """Refuse a proposal store built from other images: every image must be in the store
    (or listed among its failures) and the first ``probes`` images, spread over the list,
    must have the size the store recorded. Raises :class:`DataError` naming both."""
    from siamese_detr.errors import DataError

    meta = store.meta
    failed = set(meta.get("failures", {}))
    built_from = (meta.get("source") or {}).get("path", "?")
    ids_hash = hashlib.sha1("\n".join(r.image_id for r in records).encode("utf-8")).hexdigest()
    if meta.get("ids_sha1") != ids_hash:
        missing = [r.image_id for r in records
                   if r.image_id not in failed and r.image_id not in store]
        if missing:
            raise DataError(
                f"proposal store {store_path} (built from {built_from}, "
                f"{meta.get('num_images', len(store))} images) has no proposals for "
                f"{len(missing)} of the {len(records)} images of {images} (e.g. "
                f"{', '.join(missing[:3])}); build the store from these images: siamese-detr "
                f"proposals run {images} --out NEW_STORE")
    picks = sorted({int(i) for i in np.linspace(0, len(records) - 1, min(probes, len(records)))}
                   ) if records else []
    wrong = []
    for i in picks:
        record = records[i]
        if record.image_id in failed or record.image_id not in store:
            continue
        h, w = store.image_size(record.image_id)
        try:
            with Image.open(record.path) as im:
                size = ImageOps.exif_transpose(im).size if im.getexif().get(0x0112) else im.size
        except IMAGE_ERRORS:
            continue  # counted as unreadable while training
        if h > 0 and w > 0 and size != (w, h):
            wrong.append(f"{record.image_id} is {size[0]}x{size[1]}, store says {w}x{h}")
    if wrong:
        raise DataError(f"proposal store {store_path} (built from {built_from}) does not "
                        f"match the images of {images}: {'; '.join(wrong[:3])}"
                        f"{f' (+{len(wrong) - 3} more)' if len(wrong) > 3 else ''}; build "
                        f"the store from these images: siamese-detr proposals run {images} "
                        "--out NEW_STORE")
