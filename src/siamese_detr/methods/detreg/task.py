"""DETReg pretext task (Bar et al., CVPR 2022), wrapping the shared :class:`Detector`.

One training step on a :class:`~siamese_detr.methods.detreg.data.DETRegBatch`:

1. ``out = detector(images)`` with the learned queries (frozen backbone, trainable rest).
2. Box regression + objectness: the set criterion against the top-k proposals (one
   class-agnostic "object" class; softmax CE with no-object for vanilla DETR, sigmoid focal
   for Conditional / Deformable DETR), Hungarian matching, every decoder layer (aux loss).
3. Embedding distillation: ``feature_embed`` (2-layer MLP) maps the **last** decoder layer's
   matched states to the frozen backbone's embedding of the matched proposal; L1, mean over
   elements (official ``loss_object_embedding``). The target is either the GAP of the
   backbone's C3 map on the proposal's augmented crop (``embedding_source="crops"``, the
   official "intermediate" head) or RoIAlign + GAP on the detector's own frozen feature maps
   (``"roi"``, no extra backbone pass).

``total = cls_w * L_cls + 5 L1 + 2 GIoU (summed over layers) + weight_embedding * L_emb``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from siamese_detr.config import DETRegOptions, RunConfig
from siamese_detr.data.collate import pad_to_multiple
from siamese_detr.engine.graphs import GraphableTask
from siamese_detr.errors import ConfigError
from siamese_detr.methods.base import PretextTaskBase
from siamese_detr.methods.siamese.colour import colour_normalise
from siamese_detr.models.heads import MLP
from siamese_detr.ops.boxes import box_cxcywh_to_xyxy
from siamese_detr.structures import BoxTargets, DetectorOutput, ImageBatch, LossOutput

if TYPE_CHECKING:
    from siamese_detr.engine.setup import Prepared
    from siamese_detr.methods.detreg.data import DETRegBatch
    from siamese_detr.models.detector import Detector

__all__ = ["DETReg", "DETRegTask", "build_detreg_task", "crop_embedding_dim"]

_C3_CHANNELS = {18: 128, 34: 128, 50: 512}


def crop_embedding_dim(depth: int) -> int:
    """Channels of the ResNet C3 map (``layer2``): the official 'intermediate' embedding."""
    return _C3_CHANNELS[depth]


class DETReg(GraphableTask, nn.Module):
    """The pretext task: ``forward(batch) -> LossOutput``.

    Args:
        detector: a :class:`Detector` with one class-agnostic class and a frozen backbone.
        opts: ``cfg.pretrain.detreg``.
        criterion: a ``SetCriterion`` with ``num_classes=1`` (aux loss on).
    """

    graph_name = "detreg"

    def __init__(self, detector: Detector, opts: DETRegOptions, criterion: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.opts = opts
        self.criterion = criterion
        self.feature_embed: MLP | None = None
        if opts.object_embedding_loss:
            D = detector.hidden_dim
            self.feature_embed = MLP(D, D, self.embedding_dim(), 2)
        # the backbone never trains during pretraining (lr_backbone 0 in every config)
        detector.backbone.freeze_all()

    def embedding_dim(self) -> int:
        if self.opts.embedding_source == "crops":
            return crop_embedding_dim(self.detector.backbone.depth)
        return int(sum(self.detector.backbone.num_channels))

    # ----------------------------------------------------------------- public API
    def detector_state_dict(self) -> dict[str, Tensor]:
        """The detector's state dict (upstream key names), what fine-tuning loads."""
        return self.detector.state_dict()

    def forward(self, batch: DETRegBatch) -> LossOutput:
        images = pad_to_multiple(batch.images, self.pad_multiple)  # engine.pad_to_multiple
        # uint8 from the loader: normalised in the detector
        logits, boxes, hidden, *features = self.run_dense(images.images, images.mask,
                                                          images.sizes)
        out = DetectorOutput(logits=logits, boxes=boxes, hidden=hidden)
        det, indices = self.criterion(out, batch.targets)
        if self.feature_embed is None:
            return det
        if self.opts.embedding_source == "crops":
            if batch.crops is None:
                raise ConfigError("pretrain.detreg.embedding_source=crops but the batch has no "
                                  "crops")
            targets = self.crop_embeddings(batch.crops, batch.crop_colour)
        else:
            targets = self.roi_embeddings(features, batch.targets)
        emb = self.embedding_loss(out, indices[-1], targets)
        w = self.opts.weight_embedding
        # the logged terms stay on the device (the set criterion reports them so): no host
        # read in the step
        assert det.raw is not None
        return LossOutput(total=det.total + w * emb, names=[*det.names, "loss_embedding"],
                          weights=[*det.weights, w],
                          raw=torch.cat([det.raw, emb.detach().float().reshape(1)]))

    def dense(self, images: Tensor, mask: Tensor, sizes: Tensor) -> tuple[Tensor, ...]:
        """The part of :meth:`forward` before the matching, from tensors only (what a CUDA
        graph captures): the detector's ``(logits, boxes, hidden)``, then the frozen backbone
        maps when the embeddings are pooled from them (``embedding_source=roi``)."""
        enc = self.detector.encode(ImageBatch(images, mask, sizes))
        out = self.detector.decode(enc)
        result = [out.logits, out.boxes, out.hidden]
        if self.feature_embed is not None and self.opts.embedding_source != "crops":
            result.extend(enc.features)
        return tuple(result)

    # ----------------------------------------------------------------- embeddings
    def crop_embeddings(self, crops: list[Tensor], colour: list[Tensor] | None = None
                        ) -> list[Tensor]:
        """Per image ``[K_i, C3]``: GAP of the frozen backbone's C3 (``layer2``) map of each
        crop, without gradient (official ``build_swav_backbone_old``: output '0', mean).
        ``colour``: the crops are uint8 and un-coloured (``augment_on=device``); their colour
        pipeline and normalisation run here first, on all crops of the batch at once."""
        sizes = [int(c.shape[0]) for c in crops]
        with torch.no_grad():
            x = torch.cat(crops)
            if colour is not None:
                x = colour_normalise(x, torch.cat(colour))
            for name, module in self.detector.backbone.body.named_children():
                x = module(x)
                if name == "layer2":
                    break
            return list(x.mean(dim=(-2, -1)).detach().split(sizes))

    def roi_embeddings(self, features: list[Tensor], targets: list[BoxTargets]
                       ) -> list[Tensor]:
        """Per image ``[K_i, sum C_l]``: RoIAlign (7x7) + GAP of each frozen backbone level
        (``features``: ``Encoded.features``) at the target boxes (pixels of the unpadded
        image), concatenated over levels."""
        strides = self.detector.backbone.strides
        boxes = []
        for t in targets:
            h, w = (float(v) for v in t.size.tolist())
            scale = t.boxes.new_tensor([w, h, w, h])
            boxes.append(box_cxcywh_to_xyxy(t.boxes.float()) * scale)
        sizes = [len(b) for b in boxes]
        with torch.no_grad():
            pooled = []
            for feat, stride in zip(features, strides):
                rois = [b.to(feat.dtype) for b in boxes]
                out = roi_align(feat, rois, output_size=7, spatial_scale=1.0 / stride,
                                sampling_ratio=-1, aligned=False)
                pooled.append(out.mean(dim=(-2, -1)))
            return list(torch.cat(pooled, dim=-1).detach().split(sizes))

    def embedding_loss(self, out: DetectorOutput, indices: list[tuple[Tensor, Tensor]],
                       targets: list[Tensor]) -> Tensor:
        """L1 (mean over matched queries and channels) between ``feature_embed`` of the last
        decoder layer's matched states and the embeddings of their matched proposals."""
        assert self.feature_embed is not None
        hidden = out.hidden[-1]
        hs, ts = [], []
        for b, (src, tgt) in enumerate(indices):
            hs.append(hidden[b, src.to(hidden.device)])
            ts.append(targets[b][tgt.to(targets[b].device)])
        pred = self.feature_embed(torch.cat(hs))
        if pred.shape[0] == 0:
            return pred.sum() * 0.0
        return F.l1_loss(pred.float(), torch.cat(ts).float())


def build_detreg_task(cfg: RunConfig) -> DETReg:
    """Build the task from ``cfg`` (``cfg.pretrain.detreg`` options, ``cfg.model`` detector,
    ``cfg.loss`` weights and matching costs with one class).

    Raises:
        ConfigError: backbone not frozen, or fewer queries than proposals.
    """
    from dataclasses import replace

    from siamese_detr.losses.set_criterion import build_criterion
    from siamese_detr.models.detector import build_detector_from_config

    opts = cfg.pretrain.detreg
    if cfg.model.backbone.freeze != "all":
        raise ConfigError("DETReg pretraining needs model.backbone.freeze=all")
    if cfg.model.num_queries < opts.max_proposals:
        raise ConfigError(f"model.num_queries={cfg.model.num_queries} is below "
                          f"pretrain.detreg.max_proposals={opts.max_proposals}: every proposal "
                          "needs a query; raise num_queries or lower max_proposals")
    model = replace(cfg.model, num_classes=1)  # class-agnostic: object vs no-object
    detector = build_detector_from_config(cfg)  # loads cfg.model.backbone.weights
    return DETReg(detector, opts, build_criterion(model, cfg.loss))


class DETRegTask(PretextTaskBase):
    """DETReg pretraining as a pretext task for the runner: the proposal-target data set over
    ``cfg.pretrain.images`` and :class:`DETReg`; the run returns the last logged losses."""

    sync_bn = False  # no BatchNorm outside the frozen backbone

    def __init__(self, cfg: RunConfig) -> None:
        from siamese_detr.methods.detreg.data import collate_detreg

        super().__init__(cfg)
        self.collate = collate_detreg

    def build_dataset(self) -> Any:
        from siamese_detr.methods.detreg.data import build_detreg_dataset

        return build_detreg_dataset(self.cfg)

    def build_module(self) -> nn.Module:
        return build_detreg_task(self.cfg)

    def describe(self, num_images: int, prepared: Prepared) -> str:
        return (f"pretraining detreg/{self.cfg.model.variant}: {num_images} images, top "
                f"{self.cfg.pretrain.detreg.max_proposals} proposals as targets, "
                f"{self.schedule_text(prepared)}")
