"""Siamese DETR pretext task: region queries, losses, gradients, training signal."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.ops import roi_align

from siamese_detr.config import (
    BackboneConfig,
    ConfigError,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    SiameseOptions,
)
from siamese_detr.methods.base import roi_pool_features
from siamese_detr.methods.siamese.heads import FeatureAlign, build_predictor, build_projector
from siamese_detr.structures import ImageBatch

M, Q = 4, 8


def make_cfg(variant: str = "conditional", levels: int = 1, **opts) -> RunConfig:
    model = ModelConfig(
        variant=variant, backbone=BackboneConfig(depth=18, freeze="all"), hidden_dim=32,
        nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=Q,
        num_feature_levels=levels, enc_n_points=2, dec_n_points=2,
    )
    siamese = SiameseOptions(**{"num_regions": M, "crop_size": 32, "box_jitter": 0.0,
                                "weight_region": 3.0, "weight_global": 10.0, **opts})
    return RunConfig(task="pretrain", model=model, pretrain=PretrainConfig(siamese=siamese))


def make_task(variant: str = "conditional", levels: int = 1, seed: int = 0, **opts):
    from siamese_detr.methods.siamese.task import build_siamese_task

    torch.manual_seed(seed)
    return build_siamese_task(make_cfg(variant, levels, **opts))


def _boxes(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """``[M, 4]`` random xyxy boxes inside an ``h x w`` view (side >= 16 px)."""
    x1 = torch.rand(M, generator=g) * (w - 20)
    y1 = torch.rand(M, generator=g) * (h - 20)
    x2 = x1 + 16 + torch.rand(M, generator=g) * (w - 16 - x1)
    y2 = y1 + 16 + torch.rand(M, generator=g) * (h - 16 - y1)
    return torch.stack([x1, y1, x2, y2], -1)


def make_batch(seed: int = 0, crops: bool = True, sizes=((64, 80), (48, 64))):
    """Two samples; sample 1 is smaller (padded), both views of a sample share its size."""
    from siamese_detr.methods.siamese.data import SiameseBatch

    g = torch.Generator().manual_seed(seed)
    H, W = max(s[0] for s in sizes), max(s[1] for s in sizes)
    B = len(sizes)
    views, boxes = [], []
    for _ in range(2):
        images = torch.zeros(B, 3, H, W)
        mask = torch.ones(B, H, W, dtype=torch.bool)
        for b, (h, w) in enumerate(sizes):
            images[b, :, :h, :w] = torch.randn(3, h, w, generator=g)
            mask[b, :h, :w] = False
        views.append(ImageBatch(images=images, mask=mask, sizes=torch.tensor(sizes)))
        boxes.append(torch.stack([_boxes(g, h, w) for h, w in sizes]))
    c1 = torch.randn(B, M, 3, 32, 32, generator=g) if crops else None
    c2 = torch.randn(B, M, 3, 32, 32, generator=g) if crops else None
    return SiameseBatch(view1=views[0], view2=views[1], boxes1=boxes[0], boxes2=boxes[1],
                        crops1=c1, crops2=c2, image_ids=[str(i) for i in range(B)], skipped=0)


# --------------------------------------------------------------------------- pure pieces
def test_roi_pool_features_equals_roi_align_per_level() -> None:
    torch.manual_seed(0)
    feats = [torch.randn(2, 3, 12, 16), torch.randn(2, 5, 6, 8)]
    boxes = torch.tensor([[[4.0, 8.0, 60.0, 40.0], [0.0, 0.0, 30.0, 30.0]],
                          [[10.0, 10.0, 90.0, 70.0], [20.0, 4.0, 50.0, 44.0]]])
    out = roi_pool_features(feats, [8, 16], boxes)
    assert out.shape == (2, 2, 8)
    roi = torch.tensor([[1.0, 20.0, 4.0, 50.0, 44.0]])  # image 1, region 1
    for feat, stride, sl in ((feats[0], 8, slice(0, 3)), (feats[1], 16, slice(3, 8))):
        ref = roi_align(feat, roi, 7, 1.0 / stride, -1, False).mean((-2, -1))[0]
        torch.testing.assert_close(out[1, 1, sl], ref)
    # a different image's map gives a different feature for the same box
    other = roi_pool_features([f.flip(0) for f in feats], [8, 16], boxes)
    assert not torch.allclose(other[1, 1], out[1, 1])


def test_heads_shapes_and_layers() -> None:
    fa = FeatureAlign(32, 512)
    assert fa(torch.randn(3, 5, 32)).shape == (3, 5, 512)
    assert len(fa.layers) == 2
    proj, pred = build_projector(96), build_predictor()
    z = proj(torch.randn(4, 96))
    assert z.shape == (4, 256) and pred(z).shape == (4, 256)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                     "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


# --------------------------------------------------------------------------- queries
def test_region_queries_come_from_own_view_and_repeat_consecutively() -> None:
    task = make_task().eval()
    batch = make_batch()
    with torch.no_grad():
        enc1, enc2 = task.detector.encode(batch.view1), task.detector.encode(batch.view2)
        q = task.region_queries(enc1, batch.boxes1, batch.view1.sizes).position
        pos = task.detector.query_embed.weight[:, :32]
        feats1 = roi_pool_features(enc1.features, enc1.strides, batch.boxes1)
        expected = task.patch2query(feats1).repeat_interleave(Q // M, 1) + pos
        other = task.patch2query(roi_pool_features(enc2.features, enc2.strides, batch.boxes1))
    assert q.shape == (2, Q, 32)
    torch.testing.assert_close(q, expected)
    assert not torch.allclose(q, other.repeat_interleave(Q // M, 1) + pos)
    content = q - pos
    torch.testing.assert_close(content[:, 0], content[:, 1])  # region 0 -> slots 0, 1
    assert not torch.allclose(content[:, 1], content[:, 2])


def test_jitter_moves_roi_boxes_but_not_targets() -> None:
    task = make_task(box_jitter=0.1).eval()
    batch = make_batch()
    with torch.no_grad():
        enc1 = task.detector.encode(batch.view1)
        torch.manual_seed(1)
        qa = task.region_queries(enc1, batch.boxes1, batch.view1.sizes).position
        torch.manual_seed(2)
        qb = task.region_queries(enc1, batch.boxes1, batch.view1.sizes).position
    assert not torch.allclose(qa, qb)
    t = task.region_targets(batch.boxes2, batch.view2.sizes)
    h, w = batch.view2.sizes[1].tolist()
    b = batch.boxes2[1, 0]
    ref = torch.tensor([(b[0] + b[2]) / 2 / w, (b[1] + b[3]) / 2 / h, (b[2] - b[0]) / w,
                        (b[3] - b[1]) / h])
    torch.testing.assert_close(t[1].boxes[0], ref)
    assert t[1].labels.tolist() == [0] * M


def test_per_sample_queries_false_copies_sample_zero() -> None:
    task = make_task("deformable", per_sample_queries=False).eval()
    batch = make_batch()
    with torch.no_grad():
        enc = task.detector.encode(batch.view1)
        q = task.region_queries(enc, batch.boxes1, batch.view1.sizes).position
        task.opts = replace(task.opts, per_sample_queries=True)
        q_own = task.region_queries(enc, batch.boxes1, batch.view1.sizes).position
    torch.testing.assert_close(q[1], q[0])
    torch.testing.assert_close(q[0], q_own[0])
    assert not torch.allclose(q_own[1], q_own[0])


def test_deformable_uses_positional_half_of_query_embed() -> None:
    task = make_task("deformable")
    assert task.detector.query_embed.weight.shape == (Q, 64)
    torch.testing.assert_close(task._query_pos(), task.detector.query_embed.weight[:, :32])


# --------------------------------------------------------------------------- losses
def test_loss_terms_and_weights_add_up() -> None:
    task = make_task()
    out = task(make_batch())
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_region", "loss_global"):
        assert name in out.terms
    weighted = sum(out.terms[n][0] for n in ("loss_ce", "loss_bbox", "loss_giou",
                                             "loss_region", "loss_global"))
    assert out.total.item() == pytest.approx(weighted, rel=1e-4)
    w, raw = out.terms["loss_region"]
    assert w == pytest.approx(3.0 * raw, rel=1e-5)
    w, raw = out.terms["loss_global"]
    assert w == pytest.approx(10.0 * raw, rel=1e-5) and 0.0 <= raw <= 4.0


def test_switches_remove_terms() -> None:
    task = make_task(region_discrimination=False, global_discrimination=False)
    assert task.feature_align is None and task.projector is None
    out = task(make_batch())
    assert "loss_region" not in out.terms and "loss_global" not in out.terms
    # no crops in the batch: no region term even when enabled
    out = make_task()(make_batch(crops=False))
    assert "loss_region" not in out.terms and "loss_global" in out.terms


def test_direction_pairs_view_a_crops_with_view_b_memory() -> None:
    task = make_task().eval()
    batch = make_batch()
    calls = []
    orig_decode, orig_crops = task.detector.decode, task.crop_embeddings
    task.detector.decode = lambda enc, q: calls.append(("dec", enc.memory)) or orig_decode(enc, q)
    task.crop_embeddings = lambda c: calls.append(("crop", c)) or orig_crops(c)
    with torch.no_grad():
        task.forward_per_direction(batch)
        mem2 = task.detector.encode(batch.view2).memory
    assert [c[0] for c in calls] == ["dec", "crop", "dec", "crop"]
    torch.testing.assert_close(calls[0][1], mem2)  # queries of view 1 read view 2
    assert calls[1][1] is batch.crops1 and calls[3][1] is batch.crops2


def test_joint_step_is_one_call_per_stage_with_rows_paired_across_views() -> None:
    """The ``2B`` path: one encode, one decode, one crop pass; row ``b < B`` holds view 2's
    queries on view 1's memory, row ``B + b`` view 1's queries on view 2's memory."""
    task = make_task().eval()
    batch = make_batch()
    B = batch.view1.images.shape[0]
    calls = []
    orig_encode, orig_decode = task.detector.encode, task.detector.decode
    orig_crops, orig_region = task.crop_embeddings, task.region_loss
    task.detector.encode = lambda v: calls.append(("enc", v)) or orig_encode(v)
    task.detector.decode = lambda enc, q: calls.append(("dec", enc, q)) or orig_decode(enc, q)
    task.crop_embeddings = lambda c: calls.append(("crop", c)) or orig_crops(c)
    task.region_loss = lambda o, m, t: calls.append(("reg", t)) or orig_region(o, m, t)
    with torch.no_grad():
        task(batch)
        task.detector.encode, task.crop_embeddings = orig_encode, orig_crops
        enc1, enc2 = task.detector.encode(batch.view1), task.detector.encode(batch.view2)
        q1 = task.region_queries(enc1, batch.boxes1, batch.view1.sizes).position
        q2 = task.region_queries(enc2, batch.boxes2, batch.view2.sizes).position
        emb1, emb2 = task.crop_embeddings(batch.crops1), task.crop_embeddings(batch.crops2)
    assert [c[0] for c in calls] == ["enc", "dec", "crop", "reg"]
    _, enc, q = calls[1]
    torch.testing.assert_close(enc.memory, torch.cat([enc1.memory, enc2.memory]))
    torch.testing.assert_close(q.position, torch.cat([q2, q1]))
    torch.testing.assert_close(calls[2][1], torch.cat([batch.crops1, batch.crops2]))
    torch.testing.assert_close(calls[3][1], torch.cat([emb2, emb1]))  # each row: its query view
    assert calls[3][1].shape[0] == 2 * B


@pytest.mark.parametrize("variant,levels,opts", [
    ("vanilla", 1, {}), ("conditional", 1, {}), ("deformable", 1, {}),
    ("deformable", 4, {"per_sample_queries": False}),
    ("conditional", 1, {"region_discrimination": False})])
def test_joint_step_equals_per_direction_losses_and_gradients(variant, levels, opts) -> None:
    """Batching both views and directions changes no number beyond float rounding: every
    logged loss term and every gradient matches the per-view, per-direction reference."""
    task = make_task(variant, levels, **opts).train()  # dropout 0, BatchNorm in train mode
    batch = make_batch()
    results = []
    for fn in (task.forward, task.forward_per_direction):
        task.zero_grad()
        out = fn(batch)
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
        results.append((out.total.detach(), out.terms, grads))
    (t_joint, terms_joint, g_joint), (t_ref, terms_ref, g_ref) = results
    torch.testing.assert_close(t_joint, t_ref, rtol=1e-5, atol=1e-6)
    assert terms_joint.keys() == terms_ref.keys()
    for name, (w, raw) in terms_ref.items():
        assert terms_joint[name][1] == pytest.approx(raw, rel=1e-5, abs=1e-6), name
        assert terms_joint[name][0] == pytest.approx(w, rel=1e-5, abs=1e-6), name
    assert g_joint.keys() == g_ref.keys() and len(g_ref) > 10
    # float32 sums of large terms that cancel (LayerNorm biases: terms ~1e3, sum ~1) round
    # differently in a 2B batch, so gradients are compared as vectors: a wrong pairing of rows,
    # targets or crops gives relative errors of order 1. Gradients that are zero up to
    # rounding (some query biases: a shift that softmax cancels, |g| ~ 1e-9) are left out.
    flat = torch.cat([g.flatten() for g in g_ref.values()])
    for name, g in g_ref.items():
        if g.norm() > 1e-6 * flat.norm():
            err = (g_joint[name] - g).norm() / g.norm()
            assert err < 1e-3, (name, float(err))
    diff = torch.cat([(g_joint[n] - g).flatten() for n, g in g_ref.items()])
    assert diff.norm() / flat.norm() < 1e-5


def test_views_of_different_padded_sizes_take_the_per_direction_path() -> None:
    task = make_task().eval()
    batch = make_batch()
    small = ImageBatch(batch.view2.images[..., :56], batch.view2.mask[..., :56],
                       batch.view2.sizes.clamp(max=56))
    batch = replace(batch, view2=small, boxes2=batch.boxes2.clamp(max=55))
    with torch.no_grad():
        torch.testing.assert_close(task(batch).total, task.forward_per_direction(batch).total)


def test_pooled_memory_ignores_padding_unless_asked() -> None:
    task = make_task().eval()
    batch = make_batch(sizes=((96, 96), (32, 32)))
    with torch.no_grad():
        enc = task.detector.encode(batch.view1)
        assert enc.mask[1].any() and not enc.mask[0].any()
        pooled = task.pooled_memory(enc)
        enc.memory[enc.mask] = 1e3  # garbage in padded tokens
        torch.testing.assert_close(task.pooled_memory(enc), pooled)
        task.pool_padding = True
        assert not torch.allclose(task.pooled_memory(enc)[1], pooled[1])


def test_gradients_reach_trainable_parts_only() -> None:
    task = make_task().train()
    task(make_batch()).total.backward()
    backbone = list(task.detector.backbone.parameters())
    assert backbone and all(p.grad is None for p in backbone)
    for name in ("patch2query", "detector.transformer", "detector.query_embed",
                 "detector.bbox_embed", "detector.class_embed", "feature_align", "projector",
                 "predictor", "detector.input_proj"):
        grads = [p.grad for n, p in task.named_parameters() if n.startswith(name)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_num_queries_must_be_multiple_of_regions() -> None:
    with pytest.raises(ConfigError):
        make_task(num_regions=3)


def test_backbone_must_be_frozen() -> None:
    from siamese_detr.methods.siamese.task import build_siamese_task

    cfg = make_cfg()
    cfg = replace(cfg, task="finetune",
                  model=replace(cfg.model, backbone=BackboneConfig(depth=18)))
    with pytest.raises(ConfigError):
        build_siamese_task(cfg)


def test_detector_state_dict_has_upstream_names() -> None:
    task = make_task()
    keys = task.detector_state_dict().keys()
    assert any(k.startswith("backbone.body.") for k in keys)
    assert "query_embed.weight" in keys and not any(k.startswith("patch2query") for k in keys)
    assert set(f"detector.{k}" for k in keys) <= set(task.state_dict().keys())


@pytest.mark.parametrize("variant,levels", [("vanilla", 1), ("conditional", 1),
                                            ("deformable", 1), ("deformable", 4)])
def test_few_iterations_decrease_loss(variant: str, levels: int) -> None:
    task = make_task(variant, levels).train()
    batch = make_batch(sizes=((64, 64), (64, 64)))
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-4)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)
        out = task(batch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("preset", ["siamese/detr/in1k", "siamese/conditional-100q/in1k",
                                    "siamese/deformable-ms-300q/in1k",
                                    "siamese/conditional-100q/coco", "tiny/vanilla/siamese",
                                    "tiny/deformable/siamese"])
def test_pretext_criterion_reads_cfg_loss_and_presets_keep_the_old_numbers(preset: str) -> None:
    """Before issue 15 these numbers were hard-coded in build_siamese_task (costs 1/5/2, weights
    1/5/2, eos 0.1, softmax CE, aux on); the presets must give exactly them through cfg.loss."""
    from siamese_detr.methods.siamese.task import build_pretext_criterion
    from siamese_detr.presets import get_preset

    c = build_pretext_criterion(get_preset(preset))
    m = c.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.cls_loss) == (1.0, 5.0, 2.0, "ce")
    assert (c.num_classes, c.cls_loss, c.eos_coef, c.aux_loss) == (1, "ce", 0.1, True)
    assert c.weights == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert torch.equal(c.empty_weight, torch.tensor([1.0, 0.1]))


def test_pretext_criterion_follows_a_changed_cfg_loss() -> None:
    from siamese_detr.config import LossConfig
    from siamese_detr.methods.siamese.task import build_pretext_criterion

    cfg = make_cfg()
    cfg = replace(cfg, loss=LossConfig(cls_loss="ce", bbox_weight=7.0, cost_giou=3.0,
                                       eos_coef=0.2))
    c = build_pretext_criterion(cfg)
    assert (c.weights["loss_bbox"], c.matcher.cost_giou, c.eos_coef) == (7.0, 3.0, 0.2)
    with pytest.raises(ConfigError, match="loss.cls_loss"):
        build_pretext_criterion(replace(cfg, loss=LossConfig(cls_loss="focal")))
