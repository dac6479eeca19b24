"""Batching of variable-size images (DETR's ``nested_tensor_from_tensor_list``, typed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor

from siamese_detr.structures import BoxTargets, ImageBatch

__all__ = ["pad_images", "collate_detection", "pad_to_multiple", "padded_size", "padding_mask",
           "stack_batch"]


def pad_images(images: Sequence[Tensor]) -> ImageBatch:
    """Pad ``[3, h_i, w_i]`` images at the bottom/right with zeros to a common ``[H, W]``
    (the per-batch maxima).

    Returns:
        ``ImageBatch(images [B, 3, H, W], mask [B, H, W] (True on padding),
        sizes [B, 2] int64 (h_i, w_i))``.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    channels = images[0].shape[0]
    for img in images:
        if img.dim() != 3 or img.shape[0] != channels:
            raise ValueError(
                f"pad_images expects [C, h, w] images with the same C, got {tuple(img.shape)}"
            )
    sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.int64)
    H, W = (int(v) for v in sizes.max(dim=0).values)
    ref = images[0]
    shape = (len(images), channels, H, W)
    if ref.device.type == "cpu" and torch.utils.data.get_worker_info() is not None:
        batch, mask = _shared_empty(shape, ref.dtype), _shared_empty(shape[:1] + shape[2:],
                                                                     torch.bool)
    else:
        batch = torch.empty(shape, dtype=ref.dtype, device=ref.device)
        mask = torch.empty(shape[:1] + shape[2:], dtype=torch.bool, device=ref.device)
    for i, img in enumerate(images):  # every element written: the buffers start uninitialised
        h, w = img.shape[1], img.shape[2]
        batch[i, :, :h, :w].copy_(img)
        batch[i, :, h:].zero_()
        batch[i, :, :h, w:].zero_()
        mask[i].fill_(True)
        mask[i, :h, :w] = False
    return ImageBatch(images=batch, mask=mask, sizes=sizes.to(ref.device))


def padding_mask(sizes: Tensor, hw: tuple[int, int]) -> Tensor:
    """``[B, H, W]`` bool, True on padding: outside each image's unpadded ``sizes [B, 2]``
    ``(h, w)`` in a batch padded to ``hw`` (the mask :func:`pad_images` makes), on ``sizes``'
    device, with no host read."""
    H, W = hw
    rows = torch.arange(H, device=sizes.device).view(1, H, 1) >= sizes[:, 0].view(-1, 1, 1)
    cols = torch.arange(W, device=sizes.device).view(1, 1, W) >= sizes[:, 1].view(-1, 1, 1)
    return rows | cols


def stack_batch(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack`` of a collate function: torch's ``default_collate``, which in a
    DataLoader worker stacks into shared memory, so that sending the batch copies nothing
    more (see :func:`pad_images`)."""
    return torch.utils.data.default_collate(list(tensors))


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor in shared memory. In a DataLoader worker a batch is handed
    to the main process through shared memory; built there directly (as torch's
    ``default_collate`` builds its stacked tensors), it is not copied into it again when the
    worker sends it (about 1.3 MB per Siamese sample at the paper's options). The worker
    check is ``torch.utils.data.get_worker_info``, the one ``default_collate`` reads."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.tensor([], dtype=dtype).set_(storage).view(shape)


def padded_size(h: int, w: int, multiple: int) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of ``multiple`` (``multiple <= 1``: unchanged)."""
    if multiple <= 1:
        return h, w
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def pad_to_multiple(batch: ImageBatch, multiple: int) -> ImageBatch:
    """Pad a batch at the bottom/right (zeros; mask True) up to ``multiple``; ``sizes`` (the
    unpadded image sizes) unchanged; the same batch when nothing is to pad. Works on uint8
    and float batches (zero padding is what :meth:`ImageBatch.normalised` gives padding)."""
    H, W = int(batch.images.shape[-2]), int(batch.images.shape[-1])
    Hp, Wp = padded_size(H, W, multiple)
    if (Hp, Wp) == (H, W):
        return batch
    pad = (0, Wp - W, 0, Hp - H)
    return ImageBatch(F.pad(batch.images, pad, value=0), F.pad(batch.mask, pad, value=True),
                      batch.sizes)


class DetectionBatch(tuple):
    """``(ImageBatch, [BoxTargets, ...])`` that also says how many samples were dropped
    (unreadable images: ``None`` samples) in ``skipped``."""

    skipped: int = 0

    @property
    def skip_reasons(self) -> dict[str, int]:
        return {"unreadable image": self.skipped} if self.skipped else {}


def collate_detection(
    samples: Sequence[tuple[Tensor, BoxTargets] | None],
) -> tuple[ImageBatch, list[BoxTargets]]:
    """``[(image [3, h, w], BoxTargets), ...]`` -> ``(ImageBatch, [BoxTargets, ...])``;
    ``None`` samples are dropped and counted (``.skipped``); all ``None`` -> zero images."""
    if len(samples) == 0:
        raise ValueError("collate_detection got an empty batch")
    kept = [s for s in samples if s is not None]
    if kept:
        images = pad_images([s[0] for s in kept])
    else:
        images = ImageBatch(images=torch.zeros(0, 3, 0, 0), mask=torch.zeros(0, 0, 0,
                            dtype=torch.bool), sizes=torch.zeros(0, 2, dtype=torch.int64))
    batch = DetectionBatch((images, [s[1] for s in kept]))
    batch.skipped = len(samples) - len(kept)
    return batch
