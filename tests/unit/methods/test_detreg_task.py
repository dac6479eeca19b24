"""DETReg pretext task: losses at a perfect prediction, embedding targets, gradients, every
detector variant."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.ops import roi_align

from siamese_detr.config import (
    BackboneConfig,
    ConfigError,
    DETRegOptions,
    LossConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
)
from siamese_detr.methods.detreg.data import DETRegBatch
from siamese_detr.methods.detreg.task import DETReg, build_detreg_task
from siamese_detr.structures import BoxTargets, DetectorOutput, ImageBatch

Q, K = 8, 3


def make_cfg(variant: str = "deformable", levels: int = 1, **opts) -> RunConfig:
    model = ModelConfig(
        variant=variant, backbone=BackboneConfig(depth=18, freeze="all"), hidden_dim=32,
        nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=Q,
        num_feature_levels=levels, enc_n_points=2, dec_n_points=2,
    )
    detreg = DETRegOptions(**{"max_proposals": K, "crop_size": 32, **opts})
    loss = LossConfig(cls_loss="ce", cls_weight=1.0, cost_class=1.0) if variant == "vanilla" \
        else LossConfig()
    return RunConfig(task="pretrain", model=model, loss=loss,
                     pretrain=PretrainConfig(method="detreg", detreg=detreg))


def make_task(variant: str = "deformable", levels: int = 1, seed: int = 0, **opts) -> DETReg:
    torch.manual_seed(seed)
    return build_detreg_task(make_cfg(variant, levels, **opts))


def make_batch(seed: int = 0, crops: bool = True, sizes=((64, 80), (48, 64))) -> DETRegBatch:
    g = torch.Generator().manual_seed(seed)
    H, W = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, H, W)
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    targets, crop_list = [], []
    for b, (h, w) in enumerate(sizes):
        images[b, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[b, :h, :w] = False
        k = K - b  # a different number of boxes per image
        cxcy = 0.3 + 0.4 * torch.rand(k, 2, generator=g)
        wh = 0.2 + 0.3 * torch.rand(k, 2, generator=g)
        targets.append(BoxTargets(boxes=torch.cat([cxcy, wh], 1),
                                  labels=torch.zeros(k, dtype=torch.int64),
                                  size=torch.tensor([h, w])))
        crop_list.append(torch.randn(k, 3, 32, 32, generator=g))
    batch = ImageBatch(images=images, mask=mask, sizes=torch.tensor(sizes))
    return DETRegBatch(batch, targets, crop_list if crops else None, ["a", "b"], 0)


# --------------------------------------------------------------------------- construction
def test_one_class_agnostic_logit_per_loss_kind() -> None:
    assert make_task("deformable").detector.class_embed[0].out_features == 1  # focal
    assert make_task("conditional").detector.class_embed.out_features == 1  # focal
    assert make_task("vanilla").detector.class_embed.out_features == 2  # object + no-object


def test_embedding_head_width_follows_the_source() -> None:
    crops = make_task(embedding_source="crops")
    assert crops.feature_embed is not None
    assert crops.feature_embed.layers[-1].out_features == 128  # ResNet-18 C3
    assert len(crops.feature_embed.layers) == 2
    roi = make_task("deformable", 2, embedding_source="roi")
    assert roi.feature_embed is not None
    assert roi.feature_embed.layers[-1].out_features == 256 + 512  # C4 + C5 of ResNet-18
    assert make_task(object_embedding_loss=False).feature_embed is None


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_proposals"):
        build_detreg_task(replace(make_cfg(), pretrain=PretrainConfig(
            method="detreg", detreg=DETRegOptions(max_proposals=Q + 1))))
    cfg = make_cfg()
    cfg = replace(cfg, task="finetune", model=replace(cfg.model, backbone=BackboneConfig(
        depth=18)))
    with pytest.raises(ConfigError, match="freeze=all"):
        build_detreg_task(cfg)


# --------------------------------------------------------------------------- embeddings
def test_roi_embeddings_equal_roi_align_per_level() -> None:
    task = make_task("deformable", 2, embedding_source="roi").eval()
    batch = make_batch()
    with torch.no_grad():
        enc = task.detector.encode(batch.images)
        emb = task.roi_embeddings(enc.features, batch.targets)
    assert [e.shape for e in emb] == [(3, 768), (2, 768)]
    t = batch.targets[1]
    h, w = t.size.tolist()
    cx, cy, bw, bh = t.boxes[1].tolist()
    roi = torch.tensor([[0.0, (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                         (cy + bh / 2) * h]])
    ref = torch.cat([roi_align(f[1:2], roi, 7, 1.0 / s, -1, False).mean((-2, -1))[0]
                     for f, s in zip(enc.features, enc.strides)])
    torch.testing.assert_close(emb[1][1], ref)


def test_crop_embeddings_are_c3_global_average() -> None:
    task = make_task().eval()
    batch = make_batch()
    assert batch.crops is not None
    emb = task.crop_embeddings(batch.crops)
    body = task.detector.backbone.body
    with torch.no_grad():
        x = batch.crops[1]
        for m in (body.conv1, body.bn1, body.relu, body.maxpool, body.layer1, body.layer2):
            x = m(x)
    torch.testing.assert_close(emb[1], x.mean((-2, -1)))
    assert not emb[0].requires_grad


# --------------------------------------------------------------------------- losses
def _perfect(task: DETReg, batch: DETRegBatch, focal: bool) -> DetectorOutput:
    """Layer outputs that put target j of image b on query j, confident object there and
    confident background elsewhere."""
    L, B = 2, len(batch)
    C = 1 if focal else 2
    boxes = torch.full((L, B, Q, 4), 0.5)
    boxes[..., 2:] = 0.05
    logits = torch.zeros(L, B, Q, C)
    for b, t in enumerate(batch.targets):
        k = len(t)
        boxes[:, b, :k] = t.boxes
        if focal:
            logits[:, b] = -30.0
            logits[:, b, :k] = 30.0
        else:
            logits[:, b, :, 1] = 30.0  # no-object
            logits[:, b, :k, 1] = 0.0
            logits[:, b, :k, 0] = 30.0
    hidden = torch.randn(L, B, Q, task.detector.hidden_dim)
    return DetectorOutput(logits=logits, boxes=boxes, hidden=hidden)


@pytest.mark.parametrize("variant", ["vanilla", "deformable"])
def test_set_losses_vanish_at_a_perfect_prediction(variant: str) -> None:
    task = make_task(variant)
    batch = make_batch()
    out = _perfect(task, batch, focal=variant != "vanilla")
    loss, indices = task.criterion(out, batch.targets)
    for b, (src, tgt) in enumerate(indices[-1]):
        assert src.tolist() == tgt.tolist() == list(range(len(batch.targets[b])))
    assert loss.terms["loss_bbox"][1] == pytest.approx(0.0, abs=1e-6)
    assert loss.terms["loss_giou"][1] == pytest.approx(0.0, abs=1e-6)
    assert loss.terms["loss_ce"][1] == pytest.approx(0.0, abs=1e-6)
    worse = replace(out, boxes=out.boxes + 0.02)
    assert task.criterion(worse, batch.targets)[0].total > loss.total + 0.1
    flipped = replace(out, logits=-out.logits)
    assert task.criterion(flipped, batch.targets)[0].terms["loss_ce"][1] > 1.0


def test_embedding_loss_zero_iff_prediction_equals_target() -> None:
    task = make_task()
    assert task.feature_embed is not None
    batch = make_batch()
    out = _perfect(task, batch, focal=True)
    indices = [(torch.arange(len(t)), torch.arange(len(t)).flip(0)) for t in batch.targets]
    with torch.no_grad():
        pred = [task.feature_embed(out.hidden[-1, b, : len(t)]) for b, t in
                enumerate(batch.targets)]
    targets = [p.flip(0) for p in pred]  # query i is matched to target K-1-i
    assert task.embedding_loss(out, indices, targets).item() == pytest.approx(0.0, abs=1e-7)
    shifted = [t + 0.5 for t in targets]
    assert task.embedding_loss(out, indices, shifted).item() == pytest.approx(0.5, abs=1e-5)


def test_total_is_weighted_sum_and_embedding_uses_last_layer() -> None:
    task = make_task(weight_embedding=3.0)
    out = task(make_batch())
    names = ("loss_ce", "loss_bbox", "loss_giou", "loss_embedding")
    assert out.total.item() == pytest.approx(sum(out.terms[n][0] for n in names), rel=1e-5)
    w, raw = out.terms["loss_embedding"]
    assert w == pytest.approx(3.0 * raw)
    assert "loss_embedding_0" not in out.terms  # official: last decoder layer only
    assert "loss_embedding" not in make_task(object_embedding_loss=False)(make_batch()).terms


def test_crops_source_needs_crops() -> None:
    with pytest.raises(ConfigError, match="crops"):
        make_task()(make_batch(crops=False))


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("source", ["crops", "roi"])
def test_gradients_reach_trainable_parts_only(source: str) -> None:
    task = make_task("deformable", 2, embedding_source=source).train()
    task(make_batch()).total.backward()
    backbone = list(task.detector.backbone.parameters())
    assert backbone and all(p.grad is None for p in backbone)
    for name in ("feature_embed", "detector.transformer", "detector.query_embed",
                 "detector.bbox_embed", "detector.class_embed", "detector.input_proj"):
        grads = [p.grad for n, p in task.named_parameters() if n.startswith(name)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_detector_state_dict_has_upstream_names() -> None:
    task = make_task()
    keys = task.detector_state_dict().keys()
    assert "query_embed.weight" in keys and not any(k.startswith("feature_embed") for k in keys)
    assert {f"detector.{k}" for k in keys} <= set(task.state_dict())


# --------------------------------------------------------------------------- every detector
@pytest.mark.parametrize("variant,levels,source", [
    ("vanilla", 1, "crops"), ("conditional", 1, "crops"), ("deformable", 1, "roi"),
    ("deformable", 2, "crops")])
def test_few_iterations_finite_and_decreasing(variant: str, levels: int, source: str) -> None:
    task = make_task(variant, levels, embedding_source=source).train()
    batch = make_batch(sizes=((48, 48), (48, 48)))
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=5e-4)
    losses = []
    for _ in range(6):
        out = task(batch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses
