"""The DETR transformer (post-norm encoder/decoder), behind the Transformer protocol.

Parameter names follow facebookresearch/detr: ``encoder.layers.N.{self_attn,linear1,linear2,
norm1,norm2}``, ``decoder.layers.N.{self_attn,multihead_attn,linear1,linear2,norm1,norm2,
norm3}`` and ``decoder.norm``. Tensors are batch-first at the interface (and inside).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese_detr.models.attention import MultiheadAttention
from siamese_detr.ops.deform_attn import shapes_tensor

__all__ = ["Transformer", "TransformerEncoder", "TransformerEncoderLayer", "flatten_levels"]

Flat = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def flatten_levels(srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor]) -> Flat:
    """Flatten per-level maps into one sequence.

    Args:
        srcs: per level ``[B, D, h_l, w_l]``; masks: ``[B, h_l, w_l]`` bool (True = pad);
            pos: ``[B, D, h_l, w_l]``.

    Returns:
        ``(src [B, S, D], mask [B, S], pos [B, S, D], spatial_shapes [L, 2] int64 (h, w),
        level_start_index [L] int64, valid_ratios [B, L, 2] float (w, h))``.
    """
    shapes = shapes_tensor([tuple(s.shape[-2:]) for s in srcs], srcs[0].device)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    ratios = []
    for m in masks:
        h, w = m.shape[-2:]
        valid_h = (~m[:, :, 0]).sum(1).float() / h
        valid_w = (~m[:, 0, :]).sum(1).float() / w
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return (
        torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
        torch.cat([m.flatten(1) for m in masks], 1),
        torch.cat([p.flatten(2).transpose(1, 2) for p in pos], 1),
        shapes,
        starts,
        torch.stack(ratios, 1),
    )


def encode_single_level(owner: nn.Module, encoder: nn.Module, srcs: list[Tensor],
                        masks: list[Tensor], pos: list[Tensor]) -> Flat:
    """The protocol's ``encode`` for the single-scale transformers (DETR, Conditional DETR):
    flatten the one level and run DETR's encoder on it."""
    if len(srcs) != 1:
        raise ValueError(f"{type(owner).__name__} takes one feature level, got {len(srcs)}")
    src, mask, pos_flat, shapes, starts, ratios = flatten_levels(srcs, masks, pos)
    return encoder(src, mask, pos_flat), mask, pos_flat, shapes, starts, ratios


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer; positions are added to queries and keys only."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        """``src [B, S, D]``, ``mask [B, S]`` (True = pad), ``pos [B, S, D]`` -> ``[B, S, D]``."""
        q = k = src + pos
        src2 = self.self_attn(q, k, src, key_padding_mask=mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    """A stack of post-norm encoder layers without a final norm (DETR post-norm)."""

    def __init__(self, layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src


class TransformerDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention, cross-attention, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        mask: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        self_attn_mask: Tensor | None,
    ) -> Tensor:
        """``tgt, query_pos [B, Q, D]``; ``memory, pos [B, S, D]``; ``mask [B, S]``;
        ``self_attn_mask [Q, Q]`` bool (True = blocked) -> ``[B, Q, D]``."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.multihead_attn(
            tgt + query_pos, memory + pos, memory, key_padding_mask=mask, need_weights=False
        )[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class TransformerDecoder(nn.Module):
    """Decoder stack returning every layer's output, each passed through the final ``norm``."""

    def __init__(self, layer: nn.Module, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        mask: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        self_attn_mask: Tensor | None,
    ) -> Tensor:
        """Returns ``[L, B, Q, D]``."""
        out = []
        for layer in self.layers:
            tgt = layer(tgt, memory, mask, pos, query_pos, self_attn_mask)
            out.append(tgt)
        return self.norm(torch.stack(out))  # one norm over all layers' outputs


class SingleLevelTransformer(nn.Module):
    """DETR's encoder over one feature level, and a decoder a subclass makes
    (:meth:`make_decoder`): the part DETR and Conditional DETR share. Parameters are made
    encoder first, then decoder, and every matrix is then Xavier-initialised, as upstream.

    Args:
        d_model: hidden width D; nhead: attention heads; dropout: everywhere (attention too).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_decoder_layers = num_decoder_layers
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers
        )
        self.decoder = self.make_decoder(d_model, nhead, dim_feedforward, dropout,
                                         num_decoder_layers)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def make_decoder(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                     num_layers: int) -> nn.Module:
        raise NotImplementedError

    def encode(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor]) -> Flat:
        """See the Transformer protocol in docs/internals.md; exactly one level."""
        return encode_single_level(self, self.encoder, srcs, masks, pos)


class Transformer(SingleLevelTransformer):
    """DETR's encoder-decoder transformer (single feature level); arguments as
    :class:`SingleLevelTransformer`."""

    def make_decoder(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                     num_layers: int) -> nn.Module:
        return TransformerDecoder(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout), num_layers,
            d_model)

    def decode(
        self,
        memory: Tensor,
        mask: Tensor,
        pos: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_pos: Tensor,
        tgt: Tensor | None,
        self_attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``query_pos [B, Q, D]``, ``tgt [B, Q, D] | None`` -> (``hidden [L, B, Q, D]``, None)."""
        if tgt is None:
            tgt = torch.zeros_like(query_pos)
        hidden = self.decoder(tgt, memory, mask, pos, query_pos, self_attn_mask)
        return hidden, None
