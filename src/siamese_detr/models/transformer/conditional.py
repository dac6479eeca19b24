"""The Conditional DETR transformer (Meng et al. 2021) behind the Transformer protocol.

Parameter names follow Atten4Vis/ConditionalDETR: the encoder is DETR's; decoder layers hold
``sa_{qcontent,qpos,kcontent,kpos,v}_proj``, ``self_attn.out_proj``,
``ca_{qcontent,qpos,kcontent,kpos,v,qpos_sine}_proj``, ``cross_attn.out_proj``, ``linear1/2``,
``norm1/2/3``; ``ca_qpos_proj`` exists in the first layer only (upstream sets it to None in
later layers), so a converted upstream state dict loads strictly. The decoder holds
``query_scale`` (MLP d-d-d, 2 layers), ``ref_point_head`` (MLP d-d-2, 2 layers) and ``norm``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese_detr.models.attention import attend, sdpa_mask
from siamese_detr.models.heads import MLP
from siamese_detr.models.transformer.vanilla import SingleLevelTransformer

__all__ = ["ConditionalTransformer", "ProjectionFreeAttention", "gen_sineembed_for_position"]


def gen_sineembed_for_position(points: Tensor, d_model: int) -> Tensor:
    """Sine embedding of normalised points (Conditional DETR).

    Args:
        points: ``[..., 2]`` (x, y) in [0, 1].

    Returns:
        ``[..., d_model]``: ``d_model/2`` y-channels then ``d_model/2`` x-channels; channel
        ``2i`` is ``sin(2*pi*c / 10000^(2i/F))``, ``2i+1`` the cosine (``F = d_model/2``).
    """
    half = d_model // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=points.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    x = points[..., 0:1].float() * (2 * math.pi) / dim_t
    y = points[..., 1:2].float() * (2 * math.pi) / dim_t
    x = torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
    y = torch.stack((y[..., 0::2].sin(), y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((y, x), dim=-1).to(points.dtype)


class ProjectionFreeAttention(nn.Module):
    """Multi-head attention on already projected q/k/v; only ``out_proj`` (vdim -> vdim).

    Conditional DETR's modified ``MultiheadAttention``: the query/key width ``embed_dim`` may
    differ from the value width ``vdim`` (cross-attention: 2d vs d). Each of the ``num_heads``
    heads takes a contiguous slice of ``embed_dim/num_heads`` q/k channels and
    ``vdim/num_heads`` value channels; scores are scaled by ``(embed_dim/num_heads)**-0.5``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, vdim: int) -> None:
        super().__init__()
        if embed_dim % num_heads or vdim % num_heads:
            raise ValueError("embed_dim and vdim must be divisible by num_heads")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.vdim, self.dropout = vdim, dropout
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``q [B, Q, E]``, ``k [B, S, E]``, ``v [B, S, V]``; ``attn_mask [Q, S]`` bool and
        ``key_padding_mask [B, S]`` bool (True = blocked) -> ``[B, Q, V]``."""
        B, Q, E = q.shape
        S, h = k.shape[1], self.num_heads
        out = attend(q.view(B, Q, h, E // h), k.view(B, S, h, E // h),
                     v.view(B, S, h, self.vdim // h), sdpa_mask(attn_mask, key_padding_mask),
                     self.dropout if self.training else 0.0)
        return self.out_proj(out)


class ConditionalDecoderLayer(nn.Module):
    """Post-norm decoder layer with conditional (content ++ spatial) cross-attention."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, is_first: bool
    ) -> None:
        super().__init__()
        d = d_model
        self.nhead = nhead
        self.sa_qcontent_proj = nn.Linear(d, d)
        self.sa_qpos_proj = nn.Linear(d, d)
        self.sa_kcontent_proj = nn.Linear(d, d)
        self.sa_kpos_proj = nn.Linear(d, d)
        self.sa_v_proj = nn.Linear(d, d)
        self.self_attn = ProjectionFreeAttention(d, nhead, dropout, vdim=d)
        self.ca_qcontent_proj = nn.Linear(d, d)
        self.ca_qpos_proj = nn.Linear(d, d) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d, d)
        self.ca_kpos_proj = nn.Linear(d, d)
        self.ca_v_proj = nn.Linear(d, d)
        self.ca_qpos_sine_proj = nn.Linear(d, d)
        self.cross_attn = ProjectionFreeAttention(2 * d, nhead, dropout, vdim=d)
        self.linear1 = nn.Linear(d, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def _heads_concat(self, a: Tensor, b: Tensor) -> Tensor:
        """``[B, N, d]`` x2 -> ``[B, N, 2d]`` with per head ``[a_head, b_head]``."""
        B, N, d = a.shape
        h = self.nhead
        return torch.cat([a.view(B, N, h, d // h), b.view(B, N, h, d // h)], 3).view(B, N, 2 * d)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        mask: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        query_sine_embed: Tensor,
        self_attn_mask: Tensor | None,
    ) -> Tensor:
        """``tgt, query_pos, query_sine_embed [B, Q, d]``; ``memory, pos [B, S, d]``;
        ``mask [B, S]`` -> ``[B, Q, d]``."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt2 = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=self_attn_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:  # first layer: DETR-style positional query too
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = self._heads_concat(q, self.ca_qpos_sine_proj(query_sine_embed))
        k = self._heads_concat(k, k_pos)
        tgt2 = self.cross_attn(q, k, v, key_padding_mask=mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class ConditionalDecoder(nn.Module):
    """Decoder with reference points from the positional queries; returns all layers."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int
    ) -> None:
        super().__init__()
        first = ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=True)
        later = ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=False)
        self.layers = nn.ModuleList(
            [first] + [copy.deepcopy(later) for _ in range(num_layers - 1)]
        )
        self.num_layers = num_layers
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        mask: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        self_attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (``hidden [L, B, Q, d]`` after ``norm``, ``references [B, Q, 2]``)."""
        reference = self.ref_point_head(query_pos).sigmoid()
        sine = gen_sineembed_for_position(reference, self.d_model)
        out = []
        for i, layer in enumerate(self.layers):
            scaled = sine if i == 0 else sine * self.query_scale(tgt)
            tgt = layer(tgt, memory, mask, pos, query_pos, scaled, self_attn_mask)
            out.append(tgt)
        return self.norm(torch.stack(out)), reference


class ConditionalTransformer(SingleLevelTransformer):
    """DETR's encoder plus the conditional decoder (single feature level, post-norm);
    arguments as :class:`SingleLevelTransformer`."""

    def __init__(self, d_model: int = 256, *args: Any, **kwargs: Any) -> None:
        if d_model % 2 or (d_model // 2) % 2:
            raise ValueError("d_model must be a multiple of 4 for the sine embedding")
        super().__init__(d_model, *args, **kwargs)

    def make_decoder(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                     num_layers: int) -> nn.Module:
        return ConditionalDecoder(d_model, nhead, dim_feedforward, dropout, num_layers)

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
        """``query_pos [B, Q, d]`` -> (``hidden [L, B, Q, d]``, ``references [L, B, Q, 2]``,
        the same sigmoid-space point for every layer)."""
        if tgt is None:
            tgt = torch.zeros_like(query_pos)
        hidden, ref = self.decoder(tgt, memory, mask, pos, query_pos, self_attn_mask)
        return hidden, ref.unsqueeze(0).expand(hidden.shape[0], *ref.shape)
