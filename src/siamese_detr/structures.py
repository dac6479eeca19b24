"""Typed containers passed between data, models, losses and evaluation.

Conventions used everywhere in the package:

* Tensors are **batch-first**.
* ``BoxTargets.boxes`` and every predicted box are **normalised cxcywh** in [0, 1],
  relative to the *unpadded* image size (``ImageBatch.sizes``), as in DETR.
* Pixel boxes (proposals, region boxes of views) are **absolute xyxy** in pixels.
* Masks are boolean with ``True`` = padding (ignore), as in DETR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache

import torch
from torch import Tensor

from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD


@cache  # never evicted: a captured CUDA graph reads the constant's address at every replay
def device_constant(values: tuple[float, ...], device: torch.device,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """A small constant vector on ``device``, made once per (values, device, dtype) and kept
    for the process (do not modify it): creating it per call in the training step would be a
    host upload per step, which a CUDA graph cannot replay, and freeing it would leave a graph
    reading reused memory. On a GPU the one upload goes through page-locked memory without
    blocking (a copy from pageable memory waits for the device's queue). Made outside
    inference mode, so a constant first asked for by ``predict`` still serves training. The
    keys are few: fixed constants, and the level sizes of each padded image size (thousands
    at most; 512 bytes of GPU memory each)."""
    device = torch.device(device)
    with torch.inference_mode(False):
        t = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)


def imagenet_normalise(x: Tensor) -> Tensor:
    """Float ``[..., 3, H, W]`` in ``[0, 1]`` -> ImageNet mean/std normalised, on ``x``'s
    device: the one place the normalisation is written (loaders hand over uint8; the
    detector, the Siamese views and crops and the pretext crops all come through here)."""
    mean = device_constant(tuple(IMAGENET_MEAN), x.device).view(3, 1, 1)
    std = device_constant(tuple(IMAGENET_STD), x.device).view(3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class ImageBatch:
    """A padded batch of images.

    Attributes:
        images: ``[B, 3, H, W]`` float, ImageNet-normalised; zero in the padding. Or uint8
            RGB as loader workers hand it over (4x fewer bytes): :meth:`normalised`, which
            the detector applies, gives the float batch.
        mask: ``[B, H, W]`` bool, True on padding pixels.
        sizes: ``[B, 2]`` int64, the unpadded ``(h, w)`` of each image.
    """

    images: Tensor
    mask: Tensor
    sizes: Tensor

    def normalised(self) -> ImageBatch:
        """uint8 RGB -> float32 ImageNet-normalised, zero on padding, where the batch is (the
        same operations as ``ToTensor() + Normalize()`` in a worker, so the same bits); a float
        batch is returned as it is."""
        if self.images.dtype != torch.uint8:
            return self
        x = imagenet_normalise(self.images.to(torch.float32) / 255.0)
        return ImageBatch(x.masked_fill(self.mask[:, None], 0.0), self.mask, self.sizes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(
            images=self.images.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            sizes=self.sizes.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> ImageBatch:
        """Page-locked copy (``DataLoader(pin_memory=True)`` calls this)."""
        return ImageBatch(self.images.pin_memory(), self.mask.pin_memory(),
                          self.sizes.pin_memory())

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class BoxTargets:
    """Ground truth of one image.

    Attributes:
        boxes: ``[K, 4]`` normalised cxcywh relative to ``size``.
        labels: ``[K]`` int64 class indices in ``[0, num_classes)``.
        image_id: dataset image id (COCO ``id``), -1 when unknown.
        size: ``[2]`` int64 ``(h, w)`` of the image as fed to the model (unpadded).
        orig_size: ``[2]`` int64 ``(h, w)`` of the image on disk (for evaluation).
        area: ``[K]`` optional box areas in the fed image (COCO eval convention).
        iscrowd: ``[K]`` optional crowd flags.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int = -1
    size: Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))
    orig_size: Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))
    area: Tensor | None = None
    iscrowd: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BoxTargets:
        changes = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)

    def pin_memory(self) -> BoxTargets:
        """Page-locked copy (``DataLoader(pin_memory=True)`` calls this)."""
        changes = {f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **changes)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class QueryInputs:
    """Externally supplied decoder queries (the decoder's single extension point).

    Any field left ``None`` falls back to the detector's learned default.

    Attributes:
        position: ``[B, Q, D]`` positional query (DETR's ``query_pos``); replaces the learned
            ``query_embed`` positions. ``Q`` may differ from the configured number of queries.
        content: ``[B, Q, D]`` content query (DETR's ``tgt``); zeros for vanilla/conditional,
            the learned ``tgt`` half of ``query_embed`` for deformable when ``None``.
        self_attn_mask: ``[Q, Q]`` bool, True = query i may NOT attend to query j
            (UP-DETR's group mask).
    """

    position: Tensor | None = None
    content: Tensor | None = None
    self_attn_mask: Tensor | None = None


@dataclass
class Encoded:
    """Output of ``Detector.encode``: encoder memory plus what decoding and pretext tasks need.

    Attributes:
        memory: ``[B, S, D]`` encoder output, all levels flattened and concatenated.
        mask: ``[B, S]`` bool padding mask of ``memory``.
        pos: ``[B, S, D]`` positional encoding of ``memory`` (level embedding included for
            deformable).
        spatial_shapes: ``[L, 2]`` int64 ``(h, w)`` of each level.
        level_start_index: ``[L]`` int64 offset of each level in ``S``.
        valid_ratios: ``[B, L, 2]`` fraction of each level that is not padding (w, h order as in
            Deformable DETR).
        features: raw backbone feature maps ``[B, C_l, h_l, w_l]`` of the levels taken from the
            backbone (before ``input_proj``), for RoIAlign by pretext tasks.
        strides: stride in pixels of each entry of ``features``.
        level_shapes: ``spatial_shapes`` as host ints (known without reading the device);
            empty when the producer did not fill it.
    """

    memory: Tensor
    mask: Tensor
    pos: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    features: list[Tensor]
    strides: list[int]
    level_shapes: list[tuple[int, int]] = field(default_factory=list)

    def shapes(self) -> list[tuple[int, int]]:
        """``(h, w)`` of each level, from ``level_shapes`` (else one host read)."""
        if self.level_shapes:
            return list(self.level_shapes)
        return [(int(h), int(w)) for h, w in self.spatial_shapes.tolist()]

    def level_maps(self) -> list[Tensor]:
        """Memory reshaped per level to ``[B, D, h, w]``."""
        out = []
        B, _, D = self.memory.shape
        start = 0
        for h, w in self.shapes():
            out.append(self.memory[:, start : start + h * w].transpose(1, 2).reshape(B, D, h, w))
            start += h * w
        return out


@dataclass
class DetectorOutput:
    """Predictions of every decoder layer (last layer = index -1).

    Attributes:
        logits: ``[L, B, Q, C]`` class logits (``C = num_classes + 1`` for softmax CE with a
            trailing no-object class, ``C = num_classes`` for sigmoid focal loss).
        boxes: ``[L, B, Q, 4]`` normalised cxcywh boxes in [0, 1].
        hidden: ``[L, B, Q, D]`` decoder states (after the decoder's final norm), for extra
            heads of pretext tasks.
    """

    logits: Tensor
    boxes: Tensor
    hidden: Tensor

    @property
    def num_layers(self) -> int:
        return int(self.logits.shape[0])


class LossOutput:
    """What a criterion or pretext task returns.

    The loss terms for logging come either as host floats (``terms``) or, without a host
    read, as one device vector: ``raw[i]`` is the unweighted value of ``names[i]`` and
    ``weights[i]`` its weight. The training loop sums ``raw`` on the device and reads it
    once per ``log_every`` steps; :attr:`terms` reads it (one host read) when asked.

    Attributes:
        total: scalar tensor to back-propagate (already weighted).
        terms: for each canonical loss name, ``(weighted, raw)`` floats.
    """

    def __init__(self, total: Tensor, terms: dict[str, tuple[float, float]] | None = None, *,
                 names: Sequence[str] = (), weights: Sequence[float] = (),
                 raw: Tensor | None = None) -> None:
        if raw is not None and not (len(names) == len(weights) == raw.numel()):
            raise ValueError(f"{len(names)} names, {len(weights)} weights, {raw.numel()} values")
        self.total = total
        self.names = tuple(names)
        self.weights = tuple(float(w) for w in weights)
        self.raw = None if raw is None else raw.detach().reshape(-1)
        self._terms = dict(terms) if terms is not None else None

    @property
    def terms(self) -> dict[str, tuple[float, float]]:
        if self._terms is None:
            values = self.raw.tolist() if self.raw is not None else []
            self._terms = {n: (w * v, v) for n, w, v in zip(self.names, self.weights, values)}
        return self._terms

    @property
    def host_terms(self) -> dict[str, tuple[float, float]]:
        """The terms given as host floats (empty when they live on the device)."""
        return self._terms if self._terms is not None and self.raw is None else {}

    def log_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"loss": float(self.total.detach())}
        for name, (weighted, raw) in self.terms.items():
            out[name] = weighted
            out[name + "_unscaled"] = raw
        return out
