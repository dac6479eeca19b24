"""UP-DETR pretext task: random query patch detection (Dai et al., CVPR 2021, arXiv 2011.09094).

One training step on an :class:`~siamese_detr.methods.updetr.data.UPDETRBatch` (see
docs/method.md, UP-DETR section, for the official code each step follows):

1. Encode the image with the shared detector (frozen backbone, trainable transformer).
2. Patch features: the frozen backbone on the ``M`` patch crops, global average pooled per
   level and concatenated (C5 only for single-scale detectors) -> ``[B, M, C]``.
3. Queries: ``patch2query`` of each patch feature, repeated for its group of ``N / M``
   consecutive queries; while training each query's patch term is zeroed with probability
   ``mask_ratio``; + the learned positional query embedding (optionally shuffled) -> the
   decoder's positional query. Deformable DETR keeps its learned content half.
4. Decoder self-attention is masked block-diagonally: a query attends only to the queries of
   its own patch group, so the groups are independent detection problems.
5. ``L_det``: DETR set loss of every decoder layer against the patch boxes (normalised cxcywh),
   one "patch" class + no-object (softmax CE, no-object weight 0.1, weights 1 / 5 / 2).
6. ``L_rec`` (``feature_recon``): ``feature_align`` of each matched decoder state regresses the
   L2-normalised patch feature (MSE of unit vectors, summed / number of patches), every layer.

``total = L_det + weight_recon * L_rec``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from siamese_detr.config import RunConfig, UPDETROptions
from siamese_detr.data.collate import pad_to_multiple
from siamese_detr.engine.graphs import GraphableTask
from siamese_detr.errors import ConfigError
from siamese_detr.losses.discrimination import region_discrimination_loss
from siamese_detr.methods.base import PretextTaskBase, global_pool_features, pixel_box_targets
from siamese_detr.methods.siamese.colour import colour_normalise
from siamese_detr.models.heads import MLP
from siamese_detr.structures import (
    BoxTargets,
    DetectorOutput,
    ImageBatch,
    LossOutput,
    QueryInputs,
)

if TYPE_CHECKING:
    from siamese_detr.engine.setup import Prepared
    from siamese_detr.methods.updetr.data import UPDETRBatch
    from siamese_detr.models.detector import Detector

__all__ = ["UPDETR", "UPDETRTask", "build_updetr_task", "group_attention_mask", "patch_targets"]


def group_attention_mask(num_queries: int, num_groups: int) -> Tensor:
    """``[N, N]`` bool decoder self-attention mask, True = blocked: query ``i`` may attend to
    query ``j`` only when both lie in the same block of ``N / num_groups`` consecutive queries.

    (Upstream builds its float mask with a loop over ``range(N // num_groups)`` instead of
    ``range(num_groups)``; that only equals this mask when ``N // num_groups >= num_groups``.)
    """
    if num_groups < 1 or num_queries % num_groups != 0:
        raise ValueError(f"{num_queries} queries cannot form {num_groups} equal groups")
    group = torch.arange(num_queries) // (num_queries // num_groups)
    return group[:, None] != group[None, :]


def patch_targets(boxes: Tensor, sizes: Tensor) -> list[BoxTargets]:
    """Patch boxes ``[B, M, 4]`` (pixel xyxy) -> normalised cxcywh targets relative to each
    image's unpadded ``sizes [B, 2]`` (h, w), label 0 (the single "patch" class); no host
    read."""
    return pixel_box_targets(boxes, sizes)


class UPDETR(GraphableTask, nn.Module):
    """The pretext task: ``forward(batch) -> LossOutput``.

    Args:
        detector: a :class:`Detector` with ``num_logits == 2`` (patch, no-object); its backbone
            is frozen here.
        opts: ``cfg.pretrain.updetr``.
        criterion: a ``SetCriterion`` (one class, softmax CE, aux loss on).

    Extra (pretext-only) parameters: ``patch2query`` (``Linear(C, D)``) and, with
    ``feature_recon``, ``feature_align`` (``MLP(D, D, C, 2)``), named as upstream; checkpoint
    conversion drops both.
    """

    graph_name = "updetr"

    attn_mask: Tensor

    def __init__(self, detector: Detector, opts: UPDETROptions, criterion: nn.Module) -> None:
        super().__init__()
        if detector.num_queries % opts.num_patches != 0:
            raise ConfigError(
                f"model.num_queries={detector.num_queries} must be a multiple of "
                f"pretrain.updetr.num_patches={opts.num_patches}"
            )
        self.detector = detector
        self.opts = opts
        self.criterion = criterion
        D = detector.hidden_dim
        feat_dim = int(sum(detector.backbone.num_channels))
        self.patch2query = nn.Linear(feat_dim, D)
        self.feature_align = MLP(D, D, feat_dim, 2) if opts.feature_recon else None
        self.queries_per_patch = detector.num_queries // opts.num_patches
        self.register_buffer(
            "attn_mask", group_attention_mask(detector.num_queries, opts.num_patches),
            persistent=False,
        )
        detector.backbone.freeze_all()  # UP-DETR freezes the CNN (--fre_cnn)

    # ----------------------------------------------------------------- public API
    def detector_state_dict(self) -> dict[str, Tensor]:
        """The detector's state dict (upstream key names), what fine-tuning loads."""
        return self.detector.state_dict()

    def forward(self, batch: UPDETRBatch) -> LossOutput:
        """Loss of one batch (``B >= 1``); see the module docstring."""
        images = pad_to_multiple(batch.images, self.pad_multiple)  # engine.pad_to_multiple
        patches = batch.patches
        if batch.patch_colour is not None:  # augment_on=device: colour and normalise here
            patches = colour_normalise(patches, batch.patch_colour)
        logits, boxes, hidden, feats = self.run_dense(images.images, images.mask, images.sizes,
                                                      patches)
        out = DetectorOutput(logits=logits, boxes=boxes, hidden=hidden)
        return self.losses(out, patch_targets(batch.boxes, batch.images.sizes), feats)

    def dense(self, images: Tensor, mask: Tensor, sizes: Tensor, patches: Tensor
              ) -> tuple[Tensor, ...]:
        """The part of :meth:`forward` before the matching, from tensors only (what a CUDA
        graph captures): ``(logits, boxes, hidden)`` of the patch queries decoded against the
        image (uint8 images normalised in the detector), then the patch features."""
        enc = self.detector.encode(ImageBatch(images, mask, sizes))
        feats = self.patch_features(patches)
        out = self.detector.decode(enc, self.patch_queries(feats))
        return out.logits, out.boxes, out.hidden, feats

    # ----------------------------------------------------------------- queries
    def patch_features(self, patches: Tensor) -> Tensor:
        """``[B, M, 3, c, c]`` crops -> ``[B, M, C]`` pooled frozen-backbone features (no
        gradient; the same levels the detector takes from the backbone)."""
        B, M = int(patches.shape[0]), int(patches.shape[1])
        with torch.no_grad():
            feats = self.detector.backbone(patches.flatten(0, 1))
            return global_pool_features(feats).reshape(B, M, -1).detach()

    def patch_queries(self, feats: Tensor) -> QueryInputs:
        """Decoder queries of ``M <= num_patches`` patches: ``QueryInputs`` with ``position
        [B, M * N/num_patches, D]`` and the block self-attention mask."""
        B, M = int(feats.shape[0]), int(feats.shape[1])
        if not 1 <= M <= self.opts.num_patches:
            raise ValueError(f"got {M} patches; this task was built for at most "
                             f"{self.opts.num_patches} (pretrain.updetr.num_patches)")
        D, Q = self.detector.hidden_dim, M * self.queries_per_patch
        z = self.patch2query(feats).repeat_interleave(self.queries_per_patch, dim=1)  # [B,Q,D]
        if self.training and self.opts.mask_ratio > 0:
            keep = torch.rand(B, Q, 1, device=z.device) > self.opts.mask_ratio
            z = z * keep.to(z.dtype)
        weight = self.detector.query_embed.weight
        if self.training and self.opts.query_shuffle:
            idx = torch.randperm(self.detector.num_queries, device=weight.device)[:Q]
        else:
            idx = torch.arange(Q, device=weight.device)
        position = z + weight[idx, :D][None]
        content = None
        if self.detector.variant == "deformable" and self.detector.num_queries != Q:
            content = weight[:Q, D:][None].expand(B, -1, -1)
        return QueryInputs(position=position, content=content,
                           self_attn_mask=self.attn_mask[:Q, :Q])

    # ----------------------------------------------------------------- losses
    def reconstruction_loss(
        self, out: DetectorOutput, indices: list[list[tuple[Tensor, Tensor]]], target: Tensor
    ) -> Tensor:
        """``sum_l L_rec^l``: per supervised layer, ``feature_align`` of the matched decoder
        states vs the matched patch features ``target [B, M, C]``; each layer normalised by
        ``B * M`` (the number of patches; upstream's ``num_boxes``)."""
        assert self.feature_align is not None
        B, M = int(target.shape[0]), int(target.shape[1])
        L = out.num_layers
        layers = list(range(L)) if len(indices) == L else [L - 1]
        total = out.hidden.new_zeros(())
        for layer, layer_idx in zip(layers, indices):
            hs, ts = [], []
            for b, (src, tgt) in enumerate(layer_idx):
                hs.append(out.hidden[layer, b, src.to(out.hidden.device)])
                ts.append(target[b, tgt.to(target.device)])
            pred = self.feature_align(torch.cat(hs))
            total = total + region_discrimination_loss(pred, torch.cat(ts), B * M)
        return total

    def losses(self, out: DetectorOutput, targets: list[BoxTargets], feats: Tensor) -> LossOutput:
        """All loss weights in one place: ``L_det + weight_recon * L_rec``."""
        det, indices = self.criterion(out, targets)
        total = det.total
        # logged terms stay on the device (the training loop reads them at log time)
        names, weights, raw = list(det.names), list(det.weights), [det.raw]
        if self.feature_align is not None:
            rec = self.reconstruction_loss(out, indices, feats)
            total = total + self.opts.weight_recon * rec
            names.append("loss_feature")
            weights.append(self.opts.weight_recon)
            raw.append(rec.detach().float().reshape(1))
        return LossOutput(total=total, names=names, weights=weights, raw=torch.cat(raw))


def build_updetr_task(cfg: RunConfig) -> UPDETR:
    """Build the task from ``cfg`` (``cfg.pretrain.updetr`` options, ``cfg.model`` detector).

    Raises:
        ConfigError: backbone not fully frozen, ``num_queries`` not a multiple of
            ``num_patches``, or an option out of range.
    """
    from siamese_detr.methods.siamese.task import build_pretext_criterion
    from siamese_detr.models.detector import build_detector

    opts = cfg.pretrain.updetr
    key = "pretrain.updetr"
    if cfg.model.backbone.freeze != "all":
        raise ConfigError("UP-DETR pretraining needs model.backbone.freeze=all")
    if opts.num_patches < 1:
        raise ConfigError(f"{key}.num_patches={opts.num_patches} must be >= 1")
    if cfg.model.num_queries % opts.num_patches != 0:
        raise ConfigError(f"model.num_queries={cfg.model.num_queries} must be a multiple of "
                          f"{key}.num_patches={opts.num_patches}")
    if not 0.0 <= opts.mask_ratio < 1.0:
        raise ConfigError(f"{key}.mask_ratio={opts.mask_ratio} must be in [0, 1)")
    if opts.min_patch < 1 or opts.patch_size < 1:
        raise ConfigError(f"{key}.min_patch and {key}.patch_size must be >= 1")
    if opts.weight_recon < 0:
        raise ConfigError(f"{key}.weight_recon={opts.weight_recon} must be >= 0")
    # build_detector loads cfg.model.backbone.weights (models.backbone.load_backbone_weights)
    detector = build_detector(cfg.model, num_logits=2)
    # one "patch" class + no-object, softmax CE, every decoder layer; costs and weights from
    # cfg.loss (the presets: 1 / 5 / 2 and eos_coef 0.1, as up-detr), shared with Siamese DETR
    criterion = build_pretext_criterion(cfg)
    return UPDETR(detector, opts, criterion)


class UPDETRTask(PretextTaskBase):
    """UP-DETR pretraining as a pretext task for the runner: the patch data set over
    ``cfg.pretrain.images`` (no proposals) and :class:`UPDETR`; returns the last logged
    losses."""

    sync_bn = False  # no BatchNorm in the UP-DETR heads

    def __init__(self, cfg: RunConfig) -> None:
        from siamese_detr.methods.updetr.data import collate_updetr

        super().__init__(cfg)
        self.collate = collate_updetr

    def build_dataset(self) -> Any:
        from siamese_detr.methods.updetr.data import build_updetr_dataset

        return build_updetr_dataset(self.cfg)

    def build_module(self) -> nn.Module:
        return build_updetr_task(self.cfg)

    def describe(self, num_images: int, prepared: Prepared) -> str:
        return (f"pretraining updetr/{self.cfg.model.variant}: {num_images} images, "
                f"{self.cfg.pretrain.updetr.num_patches} patches each, "
                f"{self.schedule_text(prepared)}")
