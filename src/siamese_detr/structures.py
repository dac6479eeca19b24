"""Typed containers passed between data, models, losses and evaluation.

Conventions used everywhere in the package:

* Tensors are **batch-first**.
* ``BoxTargets.boxes`` and every predicted box are **normalised cxcywh** in [0, 1],
  relative to the *unpadded* image size (``ImageBatch.sizes``), as in DETR.
* Pixel boxes (proposals, region boxes of views) are **absolute xyxy** in pixels.
* Masks are boolean with ``True`` = padding (ignore), as in DETR.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageBatch:
    """A padded batch of images.

    Attributes:
        images: ``[B, 3, H, W]`` float, normalised; zero in the padding.
        mask: ``[B, H, W]`` bool, True on padding pixels.
        sizes: ``[B, 2]`` int64, the unpadded ``(h, w)`` of each image.
    """

    images: Tensor
    mask: Tensor
    sizes: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(
            images=self.images.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            sizes=self.sizes.to(device, non_blocking=non_blocking),
        )

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

    def to(self, device: torch.device | str) -> BoxTargets:
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
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
    """

    memory: Tensor
    mask: Tensor
    pos: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    features: list[Tensor]
    strides: list[int]

    def level_maps(self) -> list[Tensor]:
        """Memory reshaped per level to ``[B, D, h, w]``."""
        out = []
        B, _, D = self.memory.shape
        for (h, w), start in zip(self.spatial_shapes.tolist(), self.level_start_index.tolist()):
            out.append(self.memory[:, start : start + h * w].transpose(1, 2).reshape(B, D, h, w))
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


@dataclass
class LossOutput:
    """What a criterion or pretext task returns.

    Attributes:
        total: scalar tensor to back-propagate (already weighted).
        terms: for each canonical loss name, ``(weighted, raw)`` detached scalars for logging.
    """

    total: Tensor
    terms: dict[str, tuple[float, float]] = field(default_factory=dict)

    def log_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"loss": float(self.total.detach())}
        for name, (weighted, raw) in self.terms.items():
            out[name] = weighted
            out[name + "_unscaled"] = raw
        return out
