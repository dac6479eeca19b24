"""The detector shared by pretraining and fine-tuning: backbone, input projection, one of
three transformers (DETR, Conditional DETR, Deformable DETR) and class/box heads.

Parameter names follow the upstream repositories (``backbone.body.*``, ``input_proj.*``,
``query_embed.weight``, ``transformer.*``, ``class_embed.*``, ``bbox_embed.*``). The backbone's
parameters are exactly those whose name starts with ``backbone.`` (the lr_backbone group).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import assert_never

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese_detr.config import HeadActivation, ModelConfig, RunConfig, Variant
from siamese_detr.models.backbone import RANDOM_WEIGHTS, Backbone, load_backbone_weights
from siamese_detr.models.heads import MLP, inverse_sigmoid
from siamese_detr.models.position import sine_position_encoding
from siamese_detr.models.transformer.conditional import ConditionalTransformer
from siamese_detr.models.transformer.vanilla import Transformer
from siamese_detr.structures import DetectorOutput, Encoded, ImageBatch, QueryInputs

__all__ = ["Detector", "build_detector"]

log = logging.getLogger(__name__)


def _mask_like(mask: Tensor, feat: Tensor) -> Tensor:
    """Nearest-resize the image mask ``[B, H, W]`` to ``feat``'s ``[h, w]`` (True = pad)."""
    return F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]


class Detector(nn.Module):
    """DETR-family detector with a split ``encode`` / ``decode`` (see docs/internals.md).

    Args:
        variant: "vanilla", "conditional" or "deformable".
        backbone: the ResNet feature extractor (levels it returns feed ``input_proj``).
        transformer: an object following the Transformer protocol, ``d_model = hidden_dim``.
        num_queries: default number of queries ``Q``.
        hidden_dim: ``D``.
        num_logits: classifier width ``C``.
        num_feature_levels: deformable only; extra stride-2 levels are added when it exceeds
            the number of backbone levels.
        box_refine: deformable only; independent per-layer heads and iterative refinement.
        focal_prior: initialise the class bias to ``-log((1 - 0.01) / 0.01)``.
        head_activation: what the class head's logits mean, read by postprocessing
            (:attr:`head_activation`): ``"softmax"`` (last column = no-object) or
            ``"sigmoid"`` (one independent score per class).
    """

    def __init__(
        self,
        *,
        variant: Variant,
        backbone: Backbone,
        transformer: nn.Module,
        num_queries: int,
        hidden_dim: int,
        num_logits: int,
        num_feature_levels: int = 1,
        box_refine: bool = False,
        focal_prior: bool = False,
        head_activation: HeadActivation = "softmax",
    ) -> None:
        super().__init__()
        D = hidden_dim
        self.variant: Variant = variant
        if head_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"head_activation must be 'softmax' or 'sigmoid', "
                             f"got {head_activation!r}")
        #: ``"softmax"`` (C = K + 1 logits, last = no-object) or ``"sigmoid"`` (C = K)
        self.head_activation: HeadActivation = head_activation
        self.num_queries = num_queries
        self.hidden_dim = D
        self.num_feature_levels = num_feature_levels
        self.backbone = backbone
        self.transformer = transformer
        self.pos_offset = -0.5 if variant == "deformable" else 0.0
        num_layers = int(transformer.num_decoder_layers)
        class_embed = nn.Linear(D, num_logits)
        bbox_embed = MLP(D, D, 4, 3)
        if focal_prior:
            nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if variant != "vanilla":
            nn.init.zeros_(bbox_embed.layers[-1].weight)
            nn.init.zeros_(bbox_embed.layers[-1].bias)
        match variant:
            case "vanilla" | "conditional":
                self.input_proj: nn.Module = nn.Conv2d(backbone.num_channels[-1], D, 1)
                self.query_embed = nn.Embedding(num_queries, D)
                self.class_embed: nn.Module = class_embed
                self.bbox_embed: nn.Module = bbox_embed
            case "deformable":
                self.input_proj = self._deformable_input_proj(backbone, D, num_feature_levels)
                self.query_embed = nn.Embedding(num_queries, 2 * D)
                nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
                if box_refine:
                    self.class_embed = nn.ModuleList(
                        copy.deepcopy(class_embed) for _ in range(num_layers)
                    )
                    self.bbox_embed = nn.ModuleList(
                        copy.deepcopy(bbox_embed) for _ in range(num_layers)
                    )
                    # upstream sets -2 on the first copy only, after cloning
                    for m in list(self.bbox_embed)[1:]:
                        nn.init.zeros_(m.layers[-1].bias)
                    transformer.decoder.bbox_embed = self.bbox_embed
                else:
                    self.class_embed = nn.ModuleList([class_embed] * num_layers)
                    self.bbox_embed = nn.ModuleList([bbox_embed] * num_layers)
            case _:
                assert_never(variant)

    @staticmethod
    def _deformable_input_proj(backbone: Backbone, D: int, num_levels: int) -> nn.ModuleList:
        projs: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(c, D, 1), nn.GroupNorm(32, D)) for c in backbone.num_channels
        ]
        in_ch = backbone.num_channels[-1]
        for _ in range(num_levels - len(projs)):
            projs.append(nn.Sequential(nn.Conv2d(in_ch, D, 3, 2, 1), nn.GroupNorm(32, D)))
            in_ch = D
        for proj in projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        return nn.ModuleList(projs)

    def _pos(self, mask: Tensor, like: Tensor) -> Tensor:
        enc = sine_position_encoding(mask, self.hidden_dim // 2, offset=self.pos_offset)
        return enc.to(like.dtype)

    def encode(self, batch: ImageBatch) -> Encoded:
        """Backbone + input projection + encoder.

        ``batch.images [B, 3, H, W]`` with ``batch.mask [B, H, W]`` -> :class:`Encoded`
        (memory ``[B, S, D]``; ``features`` are the raw backbone maps before ``input_proj``).
        A completely frozen backbone runs under ``no_grad``. uint8 images (as the loaders hand
        them over) are normalised here first (:meth:`ImageBatch.normalised`).
        """
        batch = batch.normalised()
        if self.backbone.fully_frozen:
            with torch.no_grad():
                feats = [f.detach() for f in self.backbone(batch.images)]
        else:
            feats = self.backbone(batch.images)
        srcs: list[Tensor] = []
        masks: list[Tensor] = []
        match self.variant:
            case "vanilla" | "conditional":
                srcs.append(self.input_proj(feats[-1]))
                masks.append(_mask_like(batch.mask, feats[-1]))
            case "deformable":
                projs = list(self.input_proj)
                for feat, proj in zip(feats, projs):
                    srcs.append(proj(feat))
                    masks.append(_mask_like(batch.mask, feat))
                for i, proj in enumerate(projs[len(feats) :]):
                    srcs.append(proj(feats[-1] if i == 0 else srcs[-1]))
                    masks.append(_mask_like(batch.mask, srcs[-1]))
            case _:
                assert_never(self.variant)
        pos = [self._pos(m, s) for m, s in zip(masks, srcs)]
        memory, mask, pos_flat, shapes, starts, ratios = self.transformer.encode(srcs, masks, pos)
        return Encoded(
            memory=memory,
            mask=mask,
            pos=pos_flat,
            spatial_shapes=shapes,
            level_start_index=starts,
            valid_ratios=ratios,
            features=feats,
            strides=list(self.backbone.strides),
            level_shapes=[(int(s.shape[-2]), int(s.shape[-1])) for s in srcs],
        )

    def _queries(self, enc: Encoded, queries: QueryInputs) -> tuple[Tensor, Tensor | None]:
        B, D = enc.memory.shape[0], self.hidden_dim
        weight = self.query_embed.weight
        query_pos = queries.position
        if query_pos is None:
            query_pos = weight[:, :D].unsqueeze(0).expand(B, -1, -1)
        tgt = queries.content
        if tgt is None and self.variant == "deformable":
            if query_pos.shape[1] != self.num_queries:
                raise ValueError(
                    f"QueryInputs.position has {query_pos.shape[1]} queries; the deformable "
                    f"detector's learned content covers {self.num_queries}: pass content too"
                )
            tgt = weight[:, D:].unsqueeze(0).expand(B, -1, -1)
        if query_pos.shape[0] != B or query_pos.shape[-1] != D:
            raise ValueError(f"query position must be [B={B}, Q, D={D}], got {query_pos.shape}")
        if tgt is not None and tgt.shape != query_pos.shape:
            raise ValueError(f"query content {tuple(tgt.shape)} != position {query_pos.shape}")
        return query_pos, tgt

    def decode(self, enc: Encoded, queries: QueryInputs | None = None) -> DetectorOutput:
        """Decode queries against ``enc`` (possibly another image's encoding).

        Returns :class:`DetectorOutput` with ``logits [L, B, Q, C]``, ``boxes [L, B, Q, 4]``
        (normalised cxcywh) and ``hidden [L, B, Q, D]``.
        """
        queries = queries or QueryInputs()
        query_pos, tgt = self._queries(enc, queries)
        attn_mask = queries.self_attn_mask
        if attn_mask is not None:
            Q = query_pos.shape[1]
            if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (Q, Q):
                raise ValueError(f"self_attn_mask must be bool [{Q}, {Q}], got "
                                 f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        hidden, refs = self.transformer.decode(
            enc.memory, enc.mask, enc.pos, enc.spatial_shapes, enc.level_start_index,
            enc.valid_ratios, query_pos, tgt, attn_mask,
        )
        match self.variant:
            case "vanilla":
                logits = self.class_embed(hidden)
                boxes = self.bbox_embed(hidden).sigmoid()
            case "conditional":
                assert refs is not None
                logits = self.class_embed(hidden)
                boxes = self._offset(self.bbox_embed(hidden), refs).sigmoid()
            case "deformable":
                assert refs is not None
                heads = list(self.class_embed), list(self.bbox_embed)
                if all(h is heads[0][0] for h in heads[0]) and all(
                        h is heads[1][0] for h in heads[1]):  # shared heads: one batched call
                    logits = heads[0][0](hidden)
                    boxes = self._offset(heads[1][0](hidden), refs).sigmoid()
                else:
                    logits = torch.stack([head(h) for head, h in zip(heads[0], hidden)])
                    boxes = torch.stack(
                        [self._offset(head(h), r) for head, h, r in zip(heads[1], hidden, refs)]
                    ).sigmoid()
            case _:
                assert_never(self.variant)
        return DetectorOutput(logits=logits, boxes=boxes, hidden=hidden)

    @staticmethod
    def _offset(delta: Tensor, ref: Tensor) -> Tensor:
        """``delta [..., 4] + logit(ref)`` on the first 2 (``ref [..., 2]``) or all 4 coords."""
        ref = inverse_sigmoid(ref).to(delta.dtype)
        if ref.shape[-1] == 4:
            return delta + ref
        return torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)

    def forward(self, batch: ImageBatch) -> DetectorOutput:
        """``decode(encode(batch))`` with the learned queries."""
        return self.decode(self.encode(batch))


def _backbone_levels(cfg: ModelConfig) -> tuple[int, ...]:
    if cfg.variant != "deformable" or cfg.num_feature_levels == 1:
        return (5,)
    return (4, 5) if cfg.num_feature_levels == 2 else (3, 4, 5)


def build_detector(cfg: ModelConfig, num_logits: int,
                   head_activation: HeadActivation | None = None) -> Detector:
    """Build the detector of ``cfg``; ``num_logits`` is ``num_classes + 1`` (softmax CE, last =
    no-object) or ``num_classes`` (sigmoid focal: the class bias gets the focal prior).
    ``head_activation`` defaults to ``"sigmoid"`` when ``num_logits == num_classes``, else
    ``"softmax"``; library code passes it (``config.head_activation``). To build from a whole
    :class:`~siamese_detr.config.RunConfig`, use :func:`build_detector_from_config`.

    Loads ``cfg.backbone.weights`` when set (see :func:`load_backbone_weights`).
    """
    b = cfg.backbone
    backbone = Backbone(b.depth, _backbone_levels(cfg), frozen_bn=b.frozen_bn, freeze=b.freeze,
                        fold_bn=b.fold_frozen_bn)
    if b.channels_last:
        backbone.use_channels_last()
    if b.fused_conv_relu:
        backbone.use_fused_conv_relu()
    if b.weights and b.weights != RANDOM_WEIGHTS:
        report = load_backbone_weights(backbone, b.weights, b.weights_format,
                                       allow_missing=b.allow_missing_keys)
        log.info("backbone weights %s: %d loaded, %d missing, %d unexpected, %d dropped",
                 b.weights, len(report.loaded), len(report.missing), len(report.unexpected),
                 len(report.dropped))
    args = (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward,
            cfg.dropout)
    transformer: nn.Module
    match cfg.variant:
        case "vanilla":
            transformer = Transformer(*args)
        case "conditional":
            transformer = ConditionalTransformer(*args)
        case "deformable":
            from siamese_detr.models.transformer.deformable import DeformableTransformer

            transformer = DeformableTransformer(
                *args, cfg.num_feature_levels, cfg.enc_n_points, cfg.dec_n_points,
                cfg.box_refine,
            )
        case _:
            assert_never(cfg.variant)
    return Detector(
        variant=cfg.variant,
        backbone=backbone,
        transformer=transformer,
        num_queries=cfg.num_queries,
        hidden_dim=cfg.hidden_dim,
        num_logits=num_logits,
        num_feature_levels=cfg.num_feature_levels,
        box_refine=cfg.box_refine,
        focal_prior=num_logits == cfg.num_classes,
        head_activation=head_activation or (
            "sigmoid" if num_logits == cfg.num_classes else "softmax"),
    )


def build_detector_from_config(cfg: RunConfig) -> Detector:
    """The detector a run of ``cfg`` trains: the 2-way softmax pretext head for
    ``task=pretrain`` (DETReg: one class-agnostic class with the head ``cfg.loss`` picks,
    sigmoid for focal), the fine-tuning head chosen by ``cfg.loss`` otherwise."""
    from dataclasses import replace

    from siamese_detr.config import head_activation
    from siamese_detr.losses.set_criterion import num_logits

    if cfg.task == "pretrain" and cfg.pretrain.method == "detreg":
        one = replace(cfg.model, num_classes=1)
        return build_detector(one, num_logits(one, cfg.loss), head_activation(one, cfg.loss))
    if cfg.task == "pretrain":
        return build_detector(cfg.model, 2, "softmax")
    return build_detector(cfg.model, num_logits(cfg.model, cfg.loss),
                          head_activation(cfg.model, cfg.loss))
