"""Deformable DETR encoder/decoder (Zhu et al. 2021) behind the Transformer protocol.

Single- or multi-scale (``num_feature_levels`` = number of maps passed to :meth:`encode`),
optional iterative box refinement. Parameter names follow fundamentalvision/Deformable-DETR
(``level_embed``, ``encoder.layers.N.self_attn.*``, ``decoder.layers.N.cross_attn.*``,
``reference_points``), post-norm layers with ReLU.

Returned ``references`` of :meth:`DeformableTransformer.decode` (the reference *input* of
each decoder layer, sigmoid space, not scaled by valid ratios):

* no refinement (``decoder.bbox_embed is None``): ``[L, B, Q, 2]``, the same point
  ``sigmoid(reference_points(query_pos))`` for every layer. Box of layer ``l``:
  ``sigmoid(bbox_embed[l](h[l]) + [logit(ref[l]), 0, 0])``.
* refinement (``decoder.bbox_embed`` set by the detector): ``[L, B, Q, 4]``. Entry 0 is the
  initial 2-d point padded with ``w = h = 0.5`` (``logit(0.5) = 0``); entry ``l >= 1`` is the
  detached box refined by layer ``l - 1``. Box of layer ``l``:
  ``sigmoid(bbox_embed[l](h[l]) + logit(ref[l]))`` on all 4 coordinates, which for ``l = 0``
  equals upstream's ``[logit(ref_xy), 0, 0]``.

So a detector can always add ``logit(ref)`` to the first ``ref.shape[-1]`` coordinates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese_detr.models.attention import MultiheadAttention
from siamese_detr.models.heads import inverse_sigmoid
from siamese_detr.ops.deform_attn import MSDeformAttn, level_sizes, shapes_tensor

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerDecoder",
    "inverse_sigmoid",
]


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, post-norm."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                padding_mask: Tensor | None) -> Tensor:
        """src, pos: ``[B, S, D]``; reference_points: ``[B, S, L, 2]``; -> ``[B, S, D]``."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layers: list[DeformableTransformerEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Grid-cell centres of every level, normalised by the valid (unpadded) size and then
        projected into every level (upstream).

        Args:
            spatial_shapes: ``[L, 2]`` int64 ``(h, w)``.
            valid_ratios: ``[B, L, 2]`` ``(w, h)`` ratios.

        Returns:
            ``[B, S, L, 2]`` normalised ``(x, y)``.
        """
        refs = []
        device, dtype = valid_ratios.device, valid_ratios.dtype
        for lvl, (h, w) in enumerate(level_sizes(spatial_shapes)):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))  # [B, h*w, 2]
        ref = torch.cat(refs, 1)
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """src, pos: ``[B, S, D]``; padding_mask: ``[B, S]``; -> memory ``[B, S, D]``."""
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask)
        return out


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention (SDPA multi-head) + deformable cross-attention + FFN, post-norm."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout,
                                               batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                src_padding_mask: Tensor | None, self_attn_mask: Tensor | None) -> Tensor:
        """tgt, query_pos: ``[B, Q, D]``; reference_points: ``[B, Q, L, 2 | 4]`` (scaled by
        valid ratios); src: ``[B, S, D]``; self_attn_mask: ``[Q, Q]`` bool, True = blocked.
        Returns ``[B, Q, D]``."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, src, spatial_shapes,
                               level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """Decoder stack; ``bbox_embed`` (a ModuleList of per-layer box heads) is assigned by the
    detector for iterative box refinement, as upstream."""

    def __init__(self, layers: list[DeformableTransformerDecoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.bbox_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, src: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                query_pos: Tensor, src_padding_mask: Tensor | None,
                self_attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """tgt, query_pos: ``[B, Q, D]``; reference_points: ``[B, Q, 2]`` sigmoid space.

        Returns hidden ``[L, B, Q, D]`` and references ``[L, B, Q, 2 | 4]`` as described in
        the module docstring.
        """
        out = tgt
        ref = reference_points
        hidden, refs = [], []
        fixed_in = None  # without refinement every layer samples around the same points
        if self.bbox_embed is None:
            fixed_in = ref[:, :, None] * valid_ratios[:, None]
        for lid, layer in enumerate(self.layers):
            refs.append(ref)
            if fixed_in is not None:
                ref_in = fixed_in
            elif ref.shape[-1] == 4:
                ref_in = ref[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_in = ref[:, :, None] * valid_ratios[:, None]
            out = layer(out, query_pos, ref_in, src, spatial_shapes, level_start_index,
                        src_padding_mask, self_attn_mask)
            hidden.append(out)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](out)
                if ref.shape[-1] == 4:
                    new_ref = delta + inverse_sigmoid(ref)
                else:
                    new_ref = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]],
                                        -1)
                ref = new_ref.sigmoid().detach()
        if self.bbox_embed is None:  # the same point for every layer: a broadcast view
            return torch.stack(hidden), ref.expand(len(self.layers), *ref.shape)
        # the first layer's 2-d point, padded with w = h = 0.5 (logit 0)
        refs[0] = torch.cat([refs[0], torch.full_like(refs[0], 0.5)], -1)
        return torch.stack(hidden), torch.stack(refs)


class DeformableTransformer(nn.Module):
    """Deformable DETR transformer implementing the ``Transformer`` protocol
    (see docs/internals.md): :meth:`encode` then :meth:`decode`.

    Args:
        d_model: channels ``D``.
        nhead: attention heads.
        num_encoder_layers, num_decoder_layers: depths.
        dim_feedforward: FFN width.
        dropout: dropout of residual branches and decoder self-attention.
        num_feature_levels: number of maps passed to :meth:`encode`.
        enc_n_points, dec_n_points: sampling points per head and level.
        box_refine: iterative box refinement; the detector must then set
            ``transformer.decoder.bbox_embed`` to its per-layer box heads before decoding.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 box_refine: bool = False):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.num_decoder_layers = num_decoder_layers
        self.box_refine = box_refine
        self.encoder = DeformableTransformerEncoder([
            DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout,
                                              num_feature_levels, nhead, enc_n_points)
            for _ in range(num_encoder_layers)
        ])
        self.decoder = DeformableTransformerDecoder([
            DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout,
                                              num_feature_levels, nhead, dec_n_points)
            for _ in range(num_decoder_layers)
        ])
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """mask ``[B, h, w]`` bool (True = pad) -> ``[B, 2]`` valid ``(w, h)`` fractions."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def encode(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            srcs: per level ``[B, D, h_l, w_l]``; masks: ``[B, h_l, w_l]`` bool (True = pad);
            pos: ``[B, D, h_l, w_l]`` positional encodings.

        Returns:
            memory ``[B, S, D]``, mask ``[B, S]``, pos ``[B, S, D]`` (level embedding added),
            spatial_shapes ``[L, 2]`` int64, level_start_index ``[L]`` int64,
            valid_ratios ``[B, L, 2]`` float ``(w, h)``.
        """
        if not (len(srcs) == len(masks) == len(pos) == self.num_feature_levels):
            raise ValueError(
                f"expected {self.num_feature_levels} levels, got srcs={len(srcs)}, "
                f"masks={len(masks)}, pos={len(pos)}"
            )
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, p) in enumerate(zip(srcs, masks, pos)):
            _, _, h, w = src.shape
            shapes.append((h, w))
            src_flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        memory_in = torch.cat(src_flat, 1)
        mask_cat = torch.cat(mask_flat, 1)
        pos_cat = torch.cat(pos_flat, 1)
        spatial_shapes = shapes_tensor(shapes, memory_in.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        memory = self.encoder(memory_in, spatial_shapes, level_start_index, valid_ratios,
                              pos_cat, mask_cat)
        return memory, mask_cat, pos_cat, spatial_shapes, level_start_index, valid_ratios

    def decode(self, memory: Tensor, mask: Tensor, pos: Tensor, spatial_shapes: Tensor,
               level_start_index: Tensor, valid_ratios: Tensor, query_pos: Tensor,
               tgt: Tensor | None, self_attn_mask: Tensor | None
               ) -> tuple[Tensor, Tensor | None]:
        """
        Args:
            memory, mask, pos, spatial_shapes, level_start_index, valid_ratios: from
                :meth:`encode` (``pos`` is unused: deformable cross-attention takes no keys).
            query_pos: ``[B, Q, D]``; tgt: ``[B, Q, D]`` content queries (None -> zeros).
            self_attn_mask: ``[Q, Q]`` bool, True = query i may NOT attend to query j.

        Returns:
            hidden ``[L, B, Q, D]`` (no final norm) and references ``[L, B, Q, 2]``, or
            ``[L, B, Q, 4]`` with box refinement (see the module docstring).
        """
        del pos
        if self.box_refine and self.decoder.bbox_embed is None:
            raise RuntimeError("box_refine=True needs transformer.decoder.bbox_embed to be set "
                               "to the detector's per-layer box heads")
        if tgt is None:
            tgt = torch.zeros_like(query_pos)
        reference_points = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]
        if self_attn_mask is not None and self_attn_mask.dtype != torch.bool:
            raise TypeError("self_attn_mask must be a bool tensor (True = blocked)")
        return self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                            valid_ratios.to(reference_points.dtype), query_pos, mask,
                            self_attn_mask)
