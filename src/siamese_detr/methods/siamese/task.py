"""Siamese DETR pretext task (Chen et al., CVPR 2023; method.md sections 3-6).

One training step on a :class:`~siamese_detr.methods.siamese.data.SiameseBatch`:

1. Encode both views with the shared detector (frozen backbone, trainable transformer).
2. Region queries of view ``a``: RoIAlign + GAP of view ``a``'s raw backbone maps at its
   (jittered) region boxes -> ``patch2query`` -> each region repeated ``N/M`` times
   consecutively -> + learned positional query embedding -> decoder positional query.
3. Decode view ``a``'s queries against view ``b``'s memory (both directions, shared weights).
4. ``L_loc``: DETR set loss against the region boxes in view ``b`` (normalised cxcywh by view
   ``b``'s unpadded size), one "region" class + no-object, per decoder layer (aux).
5. ``L_r``: ``feature_align`` of matched decoder states regresses the (normalised) frozen
   backbone embedding of view ``a``'s region crops, per decoder layer.
6. ``L_g``: SimSiam on the pooled encoder memories of the two views.

``total = 0.5 * (L_{1->2} + L_{2->1}) + weight_global * L_g`` with
``L_{a->b} = sum_l [ce + 5 L1 + 2 GIoU + weight_region * L_r]`` (weights in :meth:`_combine`,
the box/class weights inside the criterion).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from siamese_detr.config import ConfigError, RunConfig, SiameseOptions
from siamese_detr.data.collate import pad_to_multiple
from siamese_detr.engine.graphs import GraphableTask
from siamese_detr.losses.discrimination import region_discrimination_loss, simsiam_loss
from siamese_detr.losses.set_criterion import num_boxes_of
from siamese_detr.matcher import Matching, MatchJob, match_all
from siamese_detr.methods.base import (
    PretextTaskBase,
    global_pool_features,
    pixel_box_targets,
    pixel_boxes_normalised,
    roi_pool_features,
)
from siamese_detr.methods.siamese.data import finish_augmentation
from siamese_detr.methods.siamese.heads import FeatureAlign, build_predictor, build_projector
from siamese_detr.ops.boxes import jitter_xyxy
from siamese_detr.structures import (
    BoxTargets,
    DetectorOutput,
    Encoded,
    ImageBatch,
    LossOutput,
    QueryInputs,
)

if TYPE_CHECKING:
    from siamese_detr.engine.setup import Prepared
    from siamese_detr.losses.set_criterion import SetCriterion
    from siamese_detr.methods.siamese.data import SiameseBatch
    from siamese_detr.models.detector import Detector

__all__ = ["SiameseDETR", "SiameseTask", "build_pretext_criterion", "build_siamese_task",
           "check_regions"]


class SiameseDETR(GraphableTask, nn.Module):
    """The pretext task: ``forward(batch) -> LossOutput``.

    Args:
        detector: a :class:`Detector` with ``num_logits == 2`` (region, no-object) and a
            frozen backbone.
        opts: ``cfg.pretrain.siamese``.
        criterion: a ``SetCriterion`` (one class, softmax CE, aux loss on).
        pool_padding: ``False`` (default) pools the encoder memory for ``L_g`` over valid
            (non-padded) positions only; ``True`` reproduces the official mean over the whole
            padded map.
        head_dim: hidden/output width of the global projector and predictor (256 in the paper).
    """

    graph_name = "siamese"
    # after the matching, the step's eager rest is a few hundred small ops that bound it by
    # the host on a GPU (docs/benchmarks.md): the losses are a second graphed part
    losses_graph_name = "siamese losses"

    def __init__(
        self, detector: Detector, opts: SiameseOptions, criterion: nn.Module,
        pool_padding: bool = False, head_dim: int = 256,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.opts = opts
        self.criterion = criterion
        self.pool_padding = pool_padding
        D = detector.hidden_dim
        feat_dim = int(sum(detector.backbone.num_channels))
        self.patch2query = nn.Linear(feat_dim, D)
        self.feature_align = FeatureAlign(D, feat_dim) if opts.region_discrimination else None
        if opts.global_discrimination:
            n_levels = min(3, self._num_memory_levels())
            self.projector: nn.Sequential | None = build_projector(D * n_levels, head_dim, head_dim)
            self.predictor: nn.Sequential | None = build_predictor(head_dim, head_dim)
        else:
            self.projector = self.predictor = None
        check_regions(detector.num_queries, opts.num_regions)
        # the backbone never trains during pretraining (method.md 3.1)
        detector.backbone.freeze_all()

    # ----------------------------------------------------------------- public API
    def detector_state_dict(self) -> dict[str, Tensor]:
        """The detector's state dict (upstream key names), what fine-tuning loads."""
        return self.detector.state_dict()

    def forward(self, batch: SiameseBatch) -> LossOutput:
        """Loss of one batch (``B >= 1``); see the module docstring.

        Both views share one padded size (the collate pads them together, as the official
        code does), so they go through the detector as ONE batch of ``2B``: one encoder call,
        one decoder call for both directions (view 2's queries on view 1's memory in rows
        ``:B``, view 1's queries on view 2's memory in rows ``B:``), one set-criterion call
        and one backbone call for all crops. Views of different padded sizes fall back to
        :meth:`forward_per_direction`, the same losses computed per view and direction."""
        v1, v2 = batch.view1, batch.view2
        if v1.images.shape[-2:] != v2.images.shape[-2:]:
            return self.forward_per_direction(batch)
        B = int(v1.images.shape[0])
        want_crops = self.feature_align is not None
        if batch.deferred is not None:
            # augment_on=device: the views joined as uint8 (rendered first where the device
            # renders them); cutting and colouring the crops, colouring and normalising the
            # views happen inside the dense part, so a CUDA graph replays them too
            views, boxes, view_colour, crop_colour, crop_size = batch.joint_raw(want_crops)
            if crop_size != self.opts.crop_size:
                raise ValueError(f"the batch's crops are {crop_size} px, the task's "
                                 f"pretrain.siamese.crop_size is {self.opts.crop_size}")
            extra: tuple[Tensor | None, ...] = (None, view_colour, crop_colour)
            has_crops = crop_colour is not None
        else:
            # joined first, then normalised once (uint8 from the loader -> float, on the
            # device)
            views, crops = batch.joint_inputs(crops=want_crops)
            boxes = torch.cat([batch.boxes1, batch.boxes2])  # [2B, M, 4], view 1, view 2
            extra = (crops,)
            has_crops = crops is not None
        views = pad_to_multiple(views, self.pad_multiple)  # engine.pad_to_multiple
        logits, pred_boxes, hidden, *rest = self.run_dense(views.images, views.mask,
                                                           views.sizes, boxes, *extra)
        cost = rest.pop()  # every supervised layer's matching cost, computed by the dense part
        emb = rest.pop(0) if has_crops else None
        pooled = rest.pop(0) if self.projector is not None else None
        # the step's one host read: the cost to the host, Hungarian, the pairs back
        matching = self.match_regions(logits, pred_boxes, cost)
        # each row's targets are its memory's view (its region boxes); a second graph
        total, raw = self.run_losses(logits, pred_boxes, hidden, emb, pooled, boxes,
                                     views.sizes, matching.batch_idx, matching.pred_idx,
                                     matching.tgt_idx)
        names, weights = self.loss_names(int(logits.shape[0]), emb is not None,
                                         pooled is not None and self._global_runs(B))
        return LossOutput(total=total, names=names, weights=weights, raw=raw)

    def match_regions(self, logits: Tensor, pred_boxes: Tensor, cost: Tensor) -> Matching:
        """The Hungarian matching of the joint batch from the dense part's ``cost [L', 2B, Q,
        M]``: one device-to-host copy, one host-to-device copy of the pairs."""
        rows, m = int(cost.shape[1]), int(cost.shape[-1])
        sup = self.criterion.supervised
        job = MatchJob(self.criterion.matcher, sup(logits), sup(pred_boxes), [], cost=cost,
                       counts=[m] * rows)
        return match_all([job])[0][0]

    def losses(self, logits: Tensor, pred_boxes: Tensor, hidden: Tensor, emb: Tensor | None,
               pooled: Tensor | None, boxes: Tensor, sizes: Tensor, batch_idx: Tensor,
               pred_idx: Tensor, tgt_idx: Tensor) -> tuple[Tensor, Tensor]:
        """The joint batch's loss from the dense part's outputs and the matching's pairs
        (``[L', N]`` each), tensors only (what a second CUDA graph captures: every image has
        ``M`` regions, so the shapes are fixed): ``(total, raw)``, ``raw`` in
        :meth:`loss_names` order. The criterion and the region loss are normalised over both
        directions' ``2BM`` regions, i.e. the mean of the directions (the class loss too: both
        directions match all ``BM`` regions, so their no-object weights sum alike)."""
        rows, m = int(boxes.shape[0]), int(boxes.shape[1])
        B = rows // 2
        matching = Matching([], batch_idx, pred_idx, tgt_idx)
        sup = self.criterion.supervised
        norm = pixel_boxes_normalised(boxes, sizes).flatten(0, 1)  # [2BM, 4]
        labels = torch.zeros(rows * m, dtype=torch.int64, device=boxes.device)
        num_boxes = num_boxes_of(float(rows * m), boxes.device)
        total, loc_raw = self.criterion.loss_terms(sup(logits), sup(pred_boxes), labels, norm,
                                                   matching, num_boxes)
        out = DetectorOutput(logits=logits, boxes=pred_boxes, hidden=hidden)
        # the crops of each row's query view; normalised by 2BM = the mean of directions
        reg = self.region_loss(out, matching, emb.roll(B, dims=0)) if emb is not None else None
        glob = None
        if pooled is not None:
            glob = self._global_from_pooled(pooled[:B], pooled[B:])
        return self._add_extra(total, [loc_raw], reg, glob)

    def loss_names(self, num_layers: int, region: bool, global_: bool
                   ) -> tuple[list[str], list[float]]:
        """Names and weights of :meth:`losses`' ``raw`` terms: the criterion's, then
        ``loss_region`` and ``loss_global`` where they are computed."""
        names, weights = self.criterion.term_names(num_layers)
        for name, weight in self._extra_terms(region, global_):
            names.append(name)
            weights.append(weight)
        return names, weights

    def _extra_terms(self, region: bool, global_: bool) -> list[tuple[str, float]]:
        """``(name, weight)`` of ``L_r`` and ``L_g`` where they are computed, in ``raw``
        order."""
        return [(name, weight) for on, name, weight in (
            (region, "loss_region", self.opts.weight_region),
            (global_, "loss_global", self.opts.weight_global)) if on]

    def dense(self, images: Tensor, mask: Tensor, sizes: Tensor, boxes: Tensor,
              crops: Tensor | None, view_colour: Tensor | None = None,
              crop_colour: Tensor | None = None) -> tuple[Tensor, ...]:
        """The part of :meth:`forward` before the matching, from tensors only (what a CUDA
        graph captures): the ``2B`` views (view 1 then view 2) encoded once, each view's region
        queries decoded against the other view's memory.

        With ``view_colour`` (``augment_on=device``), ``images`` are the un-coloured uint8
        views and the device augmentation is finished here first
        (:func:`~siamese_detr.methods.siamese.data.finish_augmentation`: crops cut at
        ``boxes`` and coloured with ``crop_colour``, views coloured and normalised).

        Returns ``(logits, boxes, hidden)`` of the decoder, then the crop embeddings
        ``[2B, M, C]`` when there are crops, then the pooled memories ``[2B, D']`` when the
        global discrimination is on, then the matching cost ``[L', 2B, Q, M]`` of the
        supervised layers (no gradient; :meth:`match_regions`)."""
        B = int(images.shape[0]) // 2
        if view_colour is not None:
            done, crops = finish_augmentation(ImageBatch(images, mask, sizes), boxes,
                                              view_colour, crop_colour, self.opts.crop_size)
            images = done.images
        views = ImageBatch(images, mask, sizes)
        enc = self.detector.encode(views)
        queries = self.region_queries(enc, boxes, sizes, groups=2)
        # memory rows [view 1; view 2] meet query rows [view 2; view 1]: no memory copy
        swapped = queries.position.roll(B, dims=0)
        out = self.detector.decode(enc, QueryInputs(position=swapped))
        result = [out.logits, out.boxes, out.hidden]
        if crops is not None:
            result.append(self.crop_embeddings(crops))
        if self.projector is not None:
            result.append(self.pooled_memory(enc))
        # each row's targets are its memory's view: the region boxes of that view
        sup = self.criterion.supervised
        norm = pixel_boxes_normalised(boxes, sizes)
        labels = torch.zeros(norm.shape[:2], dtype=torch.int64, device=norm.device)
        result.append(self.criterion.matcher.padded_cost(sup(out.logits), sup(out.boxes),
                                                         labels, norm))
        return tuple(result)

    def forward_per_direction(self, batch: SiameseBatch) -> LossOutput:
        """:meth:`forward` with each view encoded and each direction decoded and scored on
        its own (views of different padded sizes; the reference of the parity tests)."""
        batch = batch.normalised()
        enc1 = self.detector.encode(batch.view1)
        enc2 = self.detector.encode(batch.view2)
        q1 = self.region_queries(enc1, batch.boxes1, batch.view1.sizes)
        q2 = self.region_queries(enc2, batch.boxes2, batch.view2.sizes)
        use_crops = (self.feature_align is not None and batch.crops1 is not None
                     and batch.crops2 is not None)
        # direction a -> b: view a's region queries decode view b's memory, and are paired
        # with view a's crops
        out12 = self.detector.decode(enc2, q1)
        emb1 = self.crop_embeddings(batch.crops1) if use_crops else None
        out21 = self.detector.decode(enc1, q2)
        emb2 = self.crop_embeddings(batch.crops2) if use_crops else None
        t2 = self.region_targets(batch.boxes2, batch.view2.sizes)
        t1 = self.region_targets(batch.boxes1, batch.view1.sizes)
        # both directions' matching (every decoder layer) in one device-to-host transfer
        (loc12, m12), (loc21, m21) = self.criterion.forward_many([(out12, t2), (out21, t1)])
        reg12 = reg21 = None
        if emb1 is not None and emb2 is not None:
            reg12 = self.region_loss(out12, m12, emb1)
            reg21 = self.region_loss(out21, m21, emb2)
        glob = self.global_loss(enc1, enc2) if self.projector is not None else None
        return self._combine((loc12, reg12), (loc21, reg21), glob)

    # ----------------------------------------------------------------- queries
    def region_queries(self, enc: Encoded, boxes: Tensor, sizes: Tensor, groups: int = 1
                       ) -> QueryInputs:
        """Positional region queries of one view (or of ``groups`` views stacked in the batch).

        Args:
            enc: the view's ``Encoded`` (its raw backbone ``features``).
            boxes: ``[B, M, 4]`` absolute xyxy region boxes in the unpadded view.
            sizes: ``[B, 2]`` unpadded ``(h, w)`` of the view.
            groups: the batch is ``groups`` views of ``B / groups`` images each, stacked; only
                matters without ``per_sample_queries`` (each group then takes its first
                sample's queries).

        Returns:
            ``QueryInputs(position=[B, N, D])`` (content left to the detector's default).
        """
        B, M = int(boxes.shape[0]), int(boxes.shape[1])
        N = self.detector.num_queries
        if M == 0:
            raise ConfigError("a batch without regions: pretrain.siamese.num_regions must be >= 1")
        check_regions(N, M)
        jittered = self._clamp_to_view(jitter_xyxy(boxes, self.opts.box_jitter), sizes)
        with torch.no_grad():
            feats = roi_pool_features(enc.features, enc.strides, jittered.detach())
        z = self.patch2query(feats)  # [B, M, D]
        queries = z.repeat_interleave(N // M, dim=1) + self._query_pos()[None]
        if not self.opts.per_sample_queries:  # official deformable quirk: sample 0 for all
            g = queries.unflatten(0, (groups, B // groups))
            queries = g[:, :1].expand_as(g).flatten(0, 1)
        return QueryInputs(position=queries)

    def _query_pos(self) -> Tensor:
        """``[N, D]`` learned positional query embedding (deformable: first half of [N, 2D])."""
        weight = self.detector.query_embed.weight
        return weight[:, : self.detector.hidden_dim]

    def _num_memory_levels(self) -> int:
        """Number of encoder memory levels (deformable may add levels beyond the backbone's)."""
        backbone_levels = len(self.detector.backbone.num_channels)
        return max(int(self.detector.num_feature_levels), backbone_levels)

    @staticmethod
    def _clamp_to_view(boxes: Tensor, sizes: Tensor) -> Tensor:
        """Clamp ``[B, M, 4]`` xyxy to ``[0, w] x [0, h]`` of each image (``sizes`` [B, 2])."""
        h, w = sizes[:, 0].to(boxes), sizes[:, 1].to(boxes)
        upper = torch.stack([w, h, w, h], dim=-1)[:, None, :]
        return torch.minimum(boxes.clamp(min=0), upper)

    # ----------------------------------------------------------------- losses
    @staticmethod
    def region_targets(boxes: Tensor, sizes: Tensor) -> list[BoxTargets]:
        """Region boxes ``[B, M, 4]`` (pixel xyxy of view b) -> normalised cxcywh targets with
        label 0 (the single "region" class); no host read."""
        return pixel_box_targets(boxes, sizes)

    def crop_embeddings(self, crops: Tensor) -> Tensor:
        """``[B, M, 3, c, c]`` crops -> ``[B, M, sum C_l]`` GAP of the frozen backbone levels
        (the same levels as RoI pooling), without gradient."""
        B, M = int(crops.shape[0]), int(crops.shape[1])
        with torch.no_grad():
            feats = self.detector.backbone(crops.flatten(0, 1))
            return global_pool_features(feats).reshape(B, M, -1).detach()

    def region_loss(self, out: DetectorOutput, matching: Matching, target: Tensor) -> Tensor:
        """``sum_l L_r^l``: matched decoder states of every supervised layer ->
        ``feature_align`` vs the crop embedding of the matched region; normalised by ``B * M``
        (local).

        ``matching[i]`` is the matching of decoder layer ``criterion.supervised_layers(L)[i]``
        (all layers with aux loss, else the last one only): each matching is paired with the
        hidden states of the layer it was computed on, not with layer ``i``."""
        assert self.feature_align is not None
        B, M = int(target.shape[0]), int(target.shape[1])
        layers = self.criterion.supervised_layers(int(out.hidden.shape[0]))
        if len(layers) != int(matching.batch_idx.shape[0]):
            raise ValueError(f"{int(matching.batch_idx.shape[0])} matchings for supervised "
                             f"layers {layers}")
        L = len(layers)
        hidden = self.criterion.supervised(out.hidden)  # a view (no index list to upload)
        layer = torch.arange(L, device=hidden.device)[:, None].expand_as(matching.batch_idx)
        states = hidden[layer, matching.batch_idx, matching.pred_idx]  # [L, N, D]
        # every image has M targets, so a target's index in the batch is b * M + j
        crops = target.reshape(B * M, -1)[matching.tgt_idx]  # [L, N, C]
        pred = self.feature_align(states.flatten(0, 1))
        # the per-layer sums over matched pairs, added over layers
        return region_discrimination_loss(pred, crops.flatten(0, 1), B * M)

    def pooled_memory(self, enc: Encoded) -> Tensor:
        """``[B, D * min(3, L)]``: encoder memory averaged per level over the first three
        levels (valid positions only unless ``pool_padding``)."""
        pooled = []
        start = 0
        for h, w in enc.shapes()[:3]:
            mem = enc.memory[:, start : start + h * w]  # [B, hw, D]
            if self.pool_padding:
                pooled.append(mem.mean(dim=1))
            else:
                valid = (~enc.mask[:, start : start + h * w]).to(mem.dtype)[..., None]
                pooled.append((mem * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0))
            start += h * w
        return torch.cat(pooled, dim=-1)

    def global_loss(self, enc1: Encoded, enc2: Encoded) -> Tensor | None:
        """SimSiam ``L_g`` on the pooled memories; None when BatchNorm cannot run (B=1 while
        training in a single process)."""
        return self._global_from_pooled(self.pooled_memory(enc1), self.pooled_memory(enc2))

    def _global_runs(self, batch: int) -> bool:
        """Whether ``L_g`` is computed for ``batch`` images: BatchNorm cannot train on one
        sample in a single process."""
        return not (self.training and batch < 2 and not _is_sync_bn(self.projector))

    def _global_from_pooled(self, g1: Tensor, g2: Tensor) -> Tensor | None:
        """SimSiam ``L_g`` of the two views' pooled memories ``[B, D']`` (projector and
        predictor run per view: their BatchNorm statistics are per view, as in SimSiam)."""
        assert self.projector is not None and self.predictor is not None
        if not self._global_runs(int(g1.shape[0])):
            return None
        z1, z2 = self.projector(g1), self.projector(g2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return simsiam_loss(p1, z2, p2, z1)

    def _combine(
        self, d12: tuple[LossOutput, Tensor | None], d21: tuple[LossOutput, Tensor | None],
        glob: Tensor | None,
    ) -> LossOutput:
        """All loss weights in one place: ``0.5 * (L_12 + L_21) + weight_global * L_g``.

        Logged terms stay on the device: the two directions' raw terms averaged, then
        ``loss_region`` and ``loss_global``."""
        (loc12, reg12), (loc21, reg21) = d12, d21
        if loc12.names != loc21.names or loc12.raw is None or loc21.raw is None:
            raise ValueError("both directions must report the same device loss terms")
        reg = 0.5 * (reg12 + reg21) if reg12 is not None and reg21 is not None else None
        return self._with_extra(0.5 * (loc12.total + loc21.total), list(loc12.names),
                                list(loc12.weights), [0.5 * (loc12.raw + loc21.raw)], reg, glob)

    def _with_extra(self, total: Tensor, names: list[str], weights: list[float],
                    raw: list[Tensor], reg: Tensor | None, glob: Tensor | None) -> LossOutput:
        """Add ``weight_region * L_r`` and ``weight_global * L_g`` to the localisation loss;
        logged as ``loss_region`` and ``loss_global``."""
        total, raw_all = self._add_extra(total, raw, reg, glob)
        for name, weight in self._extra_terms(reg is not None, glob is not None):
            names.append(name)
            weights.append(weight)
        return LossOutput(total=total, names=names, weights=weights, raw=raw_all)

    def _add_extra(self, total: Tensor, raw: list[Tensor], reg: Tensor | None,
                   glob: Tensor | None) -> tuple[Tensor, Tensor]:
        """The tensors of :meth:`_with_extra`: ``total`` plus the weighted ``L_r`` and ``L_g``,
        and the raw terms with ``L_r`` and ``L_g`` appended (where computed)."""
        extra = [(self.opts.weight_region, reg), (self.opts.weight_global, glob)]
        values = []
        for weight, value in extra:
            if value is not None:
                total = total + weight * value
                values.append(value.detach().float())
        if values:
            raw = [*raw, torch.stack(values)]
        return total, torch.cat(raw)


def _is_sync_bn(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())


def build_siamese_task(cfg: RunConfig) -> SiameseDETR:
    """Build the task from ``cfg`` (``cfg.pretrain.siamese`` options, ``cfg.model`` detector).

    Raises:
        ConfigError: backbone not fully frozen, or ``num_queries`` not a multiple of
            ``num_regions``.
    """
    from siamese_detr.models.detector import build_detector

    opts = cfg.pretrain.siamese
    if cfg.model.backbone.freeze != "all":
        raise ConfigError("Siamese DETR pretraining needs model.backbone.freeze=all")
    check_regions(cfg.model.num_queries, opts.num_regions)
    # build_detector loads cfg.model.backbone.weights (models.backbone.load_backbone_weights)
    detector = build_detector(cfg.model, num_logits=2, head_activation="softmax")
    if opts.official_init:
        from siamese_detr.methods.siamese.official import apply_official_pretraining_init

        apply_official_pretraining_init(detector)
    return SiameseDETR(detector, opts, build_pretext_criterion(cfg),
                       pool_padding=opts.pool_padding)


def build_pretext_criterion(cfg: RunConfig) -> SetCriterion:
    """The region-detection criterion: one class (region) + no-object, softmax CE, every
    decoder layer (as in all official configs); matcher costs and loss weights come from
    ``cfg.loss`` (the paper presets: costs 1 / 5 / 2, weights 1 / 5 / 2, ``eos_coef`` 0.1)."""
    from siamese_detr.losses.set_criterion import build_set_criterion

    if cfg.loss.cls_loss == "focal":
        raise ConfigError("loss.cls_loss=focal: the pretext head is a 2-way softmax (region / "
                          "no-object); set loss.cls_loss=ce (or auto) for pretraining")
    return build_set_criterion(cfg.loss, num_classes=1, cls_loss="ce", aux_loss=True)


def check_regions(num_queries: int, num_regions: int) -> None:
    """The one ``num_queries % num_regions`` check (queries are split evenly over regions)."""
    if num_queries % num_regions != 0:
        raise ConfigError(
            f"model.num_queries={num_queries} must be a multiple of "
            f"pretrain.siamese.num_regions={num_regions}"
        )


class SiameseTask(PretextTaskBase):
    """Siamese DETR pretraining as a :class:`~siamese_detr.methods.base.PretextTask`: the
    two-view data set over ``cfg.pretrain.images`` (+ offline proposals) and
    :class:`SiameseDETR`; ``run`` returns the last logged losses."""

    sync_bn = True  # SyncBN in the global projector

    def __init__(self, cfg: RunConfig) -> None:
        from siamese_detr.methods.siamese.data import collate_siamese

        super().__init__(cfg)
        self.collate = collate_siamese

    def build_dataset(self) -> Any:
        from siamese_detr.methods.siamese.data import build_pretrain_dataset

        return build_pretrain_dataset(self.cfg)

    def build_module(self) -> nn.Module:
        return build_siamese_task(self.cfg)

    def describe(self, num_images: int, prepared: Prepared) -> str:
        return (f"pretraining {self.cfg.pretrain.method}/{self.cfg.model.variant}: {num_images} "
                f"images, {self.schedule_text(prepared)}")
