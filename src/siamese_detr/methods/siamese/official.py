"""The official Siamese DETR pretraining initialisation (``pretrain.siamese.official_init``).

Our detector is initialised as the upstream *fine-tuning* repositories do it (Conditional /
Deformable DETR: last box layer zero, Deformable box bias ``h, w = -2``; Deformable position
encoding ``(count - 0.5) / total``). The official pretraining code (Zx55/SiameseDETR) builds
its own box head and position encoding instead: the box MLP keeps PyTorch's default
``nn.Linear`` initialisation (``openselfsup/models/heads/siamdetr_head.py``: ``MLP(hidden_dim,
hidden_dim, 4, 3)`` with no re-initialisation) and one sine encoding without the offset serves
all three transformers (``openselfsup/models/utils/position_encoding.py``, used by
``openselfsup/models/siamese_detr.py``). See docs/method.md, "faithful vs improved".
"""

from __future__ import annotations

from torch import nn

from siamese_detr.models.heads import MLP

__all__ = ["apply_official_pretraining_init"]


def _box_heads(detector: nn.Module) -> list[MLP]:
    heads = detector.bbox_embed
    unique: dict[int, MLP] = {}
    for head in (heads if isinstance(heads, nn.ModuleList) else [heads]):
        unique.setdefault(id(head), head)  # deformable without refinement shares one head
    return list(unique.values())


def apply_official_pretraining_init(detector: nn.Module) -> None:
    """Re-initialise ``detector`` in place as the official pretraining code does: every
    layer of the box head(s) gets PyTorch's default ``nn.Linear`` initialisation (undoing the
    zero weight / ``-2`` bias of the fine-tuning init), and the sine position encoding loses
    Deformable DETR's ``-0.5`` offset (``pos_offset = 0``)."""
    for head in _box_heads(detector):
        for layer in head.layers:
            layer.reset_parameters()
    detector.pos_offset = 0.0
