"""Sine positional encoding of 2-d feature maps (DETR's ``PositionEmbeddingSine``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "sine_position_encoding"]


def sine_position_encoding(
    mask: Tensor,
    num_pos_feats: int,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    offset: float = 0.0,
    eps: float = 1e-6,
) -> Tensor:
    """Sine encoding computed from a padding mask, always in float32.

    The row/column coordinate of a pixel is the cumulative count of non-padding pixels above
    it / left of it (1-based). With ``normalize`` it becomes
    ``(count + offset) / (count of the last row/column + eps) * scale``. ``offset`` is 0 in DETR
    and Conditional DETR, -0.5 in Deformable DETR. Channel ``2i`` of an axis is
    ``sin(c / T^(2i/F))``, channel ``2i+1`` is ``cos(c / T^(2i/F))`` with ``F = num_pos_feats``.

    Args:
        mask: ``[B, H, W]`` bool, True on padding.
        num_pos_feats: channels per axis ``F`` (the detector uses ``hidden_dim // 2``).

    Returns:
        ``[B, 2F, H, W]`` float32: the ``F`` y-channels first, then the ``F`` x-channels.
    """
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
        x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingSine(nn.Module):
    """Module wrapper of :func:`sine_position_encoding` (no parameters).

    Args:
        num_pos_feats: channels per axis (``hidden_dim // 2``).
        offset: 0.0 (DETR, Conditional DETR) or -0.5 (Deformable DETR).
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """``mask [B, H, W]`` bool (True = pad) -> ``[B, 2F, H, W]`` float32."""
        return sine_position_encoding(
            mask, self.num_pos_feats, self.temperature, self.normalize, self.scale, self.offset
        )
