"""UP-DETR pretext task: group mask, patch queries, losses, gradients, checkpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from siamese_detr.config import (
    BackboneConfig,
    ConfigError,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    UPDETROptions,
)
from siamese_detr.methods.updetr.data import UPDETRBatch
from siamese_detr.methods.updetr.task import build_updetr_task, group_attention_mask
from siamese_detr.structures import BoxTargets, DetectorOutput, ImageBatch

M, Q = 4, 8
SIZES = ((64, 80), (48, 64))


def make_cfg(variant: str = "conditional", levels: int = 1, **opts) -> RunConfig:
    model = ModelConfig(
        variant=variant, backbone=BackboneConfig(depth=18, freeze="all"), hidden_dim=32,
        nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=Q,
        num_feature_levels=levels, enc_n_points=2, dec_n_points=2,
    )
    updetr = UPDETROptions(**{"num_patches": M, "patch_size": 32, **opts})
    return RunConfig(task="pretrain", model=model,
                     pretrain=PretrainConfig(method="updetr", updetr=updetr))


def make_task(variant: str = "conditional", levels: int = 1, seed: int = 0, **opts):
    torch.manual_seed(seed)
    return build_updetr_task(make_cfg(variant, levels, **opts))


def make_batch(seed: int = 0, sizes=SIZES) -> UPDETRBatch:
    """Two images; image 1 is smaller (padded); boxes inside each image (side >= 8 px)."""
    g = torch.Generator().manual_seed(seed)
    H, W, B = max(s[0] for s in sizes), max(s[1] for s in sizes), len(sizes)
    images = torch.zeros(B, 3, H, W)
    mask = torch.ones(B, H, W, dtype=torch.bool)
    boxes = []
    for b, (h, w) in enumerate(sizes):
        images[b, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[b, :h, :w] = False
        x0 = torch.rand(M, generator=g) * (w - 10)
        y0 = torch.rand(M, generator=g) * (h - 10)
        x1 = x0 + 8 + torch.rand(M, generator=g) * (w - 8 - x0)
        y1 = y0 + 8 + torch.rand(M, generator=g) * (h - 8 - y0)
        boxes.append(torch.stack([x0, y0, x1, y1], -1))
    return UPDETRBatch(
        images=ImageBatch(images=images, mask=mask, sizes=torch.tensor(sizes)),
        boxes=torch.stack(boxes), patches=torch.randn(B, M, 3, 32, 32, generator=g),
        image_ids=[str(i) for i in range(B)],
    )


# --------------------------------------------------------------------------- mask and queries


@pytest.mark.parametrize("n,groups", [(8, 4), (100, 10), (300, 10), (20, 10)])
def test_group_mask_is_block_diagonal(n: int, groups: int) -> None:
    mask = group_attention_mask(n, groups)
    per = n // groups
    assert mask.dtype == torch.bool and mask.shape == (n, n)
    for i in (0, per - 1, per, n - 1):
        allowed = (~mask[i]).nonzero().flatten().tolist()
        assert allowed == list(range(i // per * per, (i // per + 1) * per))
    assert int((~mask).sum()) == groups * per * per  # (20, 10): upstream covers 2 of 10 groups
    with pytest.raises(ValueError):
        group_attention_mask(10, 4)


@pytest.mark.parametrize("variant,levels", [("vanilla", 1), ("conditional", 1),
                                            ("deformable", 1), ("deformable", 4)])
def test_mask_keeps_query_groups_apart(variant: str, levels: int) -> None:
    """Changing patch 1 changes only group 1's decoder states; without the mask it leaks."""
    task = make_task(variant, levels).eval()
    batch = make_batch()
    other = replace(batch, patches=batch.patches.clone())
    other.patches[:, 1] = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    per = Q // M
    group1 = torch.zeros(Q, dtype=torch.bool)
    group1[per : 2 * per] = True

    def hidden(b: UPDETRBatch, masked: bool = True) -> torch.Tensor:
        enc = task.detector.encode(b.images)
        queries = task.patch_queries(task.patch_features(b.patches))
        if not masked:
            queries = replace(queries, self_attn_mask=None)
        return task.detector.decode(enc, queries).hidden  # [L, B, Q, D]

    with torch.no_grad():
        a, b = hidden(batch), hidden(other)
        torch.testing.assert_close(a[:, :, ~group1], b[:, :, ~group1], atol=1e-5, rtol=0)
        assert (a[:, :, group1] - b[:, :, group1]).abs().max() > 1e-3
        leak = (hidden(batch, False)[:, :, ~group1] - hidden(other, False)[:, :, ~group1])
        assert leak.abs().max() > 1e-3


def test_patch_queries_repeat_per_group_and_mask_in_training() -> None:
    task = make_task(mask_ratio=0.5)
    feats = torch.randn(2, M, task.patch2query.in_features)
    pos = task.detector.query_embed.weight[:, : task.detector.hidden_dim]
    z = task.patch2query(feats).repeat_interleave(Q // M, dim=1)
    task.eval()
    q = task.patch_queries(feats)
    torch.testing.assert_close(q.position, z + pos[None])
    assert q.content is None and torch.equal(q.self_attn_mask, group_attention_mask(Q, M))
    task.train()
    torch.manual_seed(3)
    q = task.patch_queries(torch.randn(64, M, feats.shape[-1]))
    dropped = (q.position - pos[None]).abs().sum(-1) == 0  # the patch term was zeroed
    assert 0.3 < dropped.float().mean() < 0.7
    # fewer patches than configured: the first M' groups of queries and of the mask
    task.eval()
    q = task.patch_queries(feats[:, :2])
    assert q.position.shape == (2, 4, 32) and q.self_attn_mask.shape == (4, 4)


def test_query_shuffle_permutes_positional_embedding_rows() -> None:
    task = make_task(query_shuffle=True, mask_ratio=0.0).train()
    feats = torch.zeros(1, M, task.patch2query.in_features)
    with torch.no_grad():
        task.patch2query.bias.zero_()
    torch.manual_seed(0)
    pos = task.patch_queries(feats).position[0]
    weight = task.detector.query_embed.weight.detach()
    rows = [int((weight - p.detach()).abs().sum(-1).argmin()) for p in pos]
    assert sorted(rows) == list(range(Q)) and rows != list(range(Q))


def test_deformable_uses_positional_half_and_learned_content() -> None:
    task = make_task("deformable").eval()
    feats = torch.randn(2, 2, task.patch2query.in_features)  # 2 of 4 patches -> 4 queries
    q = task.patch_queries(feats)
    weight = task.detector.query_embed.weight
    assert weight.shape == (Q, 64) and q.position.shape == (2, 4, 32)
    torch.testing.assert_close(q.content, weight[:4, 32:][None].expand(2, -1, -1))


# --------------------------------------------------------------------------- losses


def _perfect_output(task, targets: list[BoxTargets]) -> DetectorOutput:
    """Output whose first M queries predict the targets exactly (class 'patch' with a large
    margin) and the rest no-object, in both decoder layers; random decoder states."""
    L, B, D = 2, len(targets), task.detector.hidden_dim
    logits = torch.zeros(L, B, Q, 2)
    logits[..., 1] = 30.0
    boxes = torch.full((L, B, Q, 4), 0.5)
    boxes[..., 2:] = 0.1
    for b, t in enumerate(targets):
        logits[:, b, :M, 0], logits[:, b, :M, 1] = 30.0, 0.0
        boxes[:, b, :M] = t.boxes
    hidden = torch.randn(L, B, Q, D)
    return DetectorOutput(logits=logits, boxes=boxes, hidden=hidden)


def test_each_loss_is_minimal_at_a_perfect_prediction() -> None:
    from siamese_detr.losses.discrimination import region_discrimination_loss
    from siamese_detr.methods.updetr.task import patch_targets

    task = make_task().eval()
    batch = make_batch()
    targets = patch_targets(batch.boxes, batch.images.sizes)
    feats = task.patch_features(batch.patches)
    out = _perfect_output(task, targets)
    # detection terms: ~0 at the perfect output, larger after any perturbation
    det = task.criterion(out, targets)[0]
    assert det.total.item() < 1e-6
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        noisy = replace(out, boxes=(out.boxes + 0.02 * torch.randn(out.boxes.shape, generator=g)
                                    ).clamp(0.01, 0.99),
                        logits=out.logits + torch.randn(out.logits.shape, generator=g))
        assert task.criterion(noisy, targets)[0].total.item() > det.total.item()
    # reconstruction: minimal (0) when each prediction is parallel to its patch feature
    target = feats.flatten(0, 1)
    assert region_discrimination_loss(3.0 * target, target, 2 * M).item() < 1e-10
    other = 3.0 * target + 0.1 * torch.randn(target.shape, generator=g)
    assert region_discrimination_loss(other, target, 2 * M).item() > 1e-4


def test_reconstruction_pairs_matched_queries_with_their_own_patch() -> None:
    """With feature_align = identity, decoder states equal to the matched patch features give
    L_rec = 0 in every layer; swapping two queries' states gives L_rec > 0."""
    from siamese_detr.methods.updetr.task import patch_targets

    task = make_task().eval()
    batch = make_batch()
    targets = patch_targets(batch.boxes, batch.images.sizes)
    feats = torch.randn(2, M, 32)  # feature width = D = 32 for this check
    task.feature_align = torch.nn.Identity()  # type: ignore[assignment]
    out = _perfect_output(task, targets)
    out.hidden[:, :, :M] = feats[None]
    loss = task.losses(out, targets, feats)
    assert loss.terms["loss_feature"][1] < 1e-10
    out.hidden[:, :, [0, 1]] = out.hidden[:, :, [1, 0]]
    assert task.losses(out, targets, feats).terms["loss_feature"][1] > 1e-3


def test_loss_terms_and_weights_add_up() -> None:
    task = make_task(weight_recon=2.5).train()
    torch.manual_seed(0)
    out = task(make_batch())
    terms = out.terms
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_feature", "loss_ce_0"} <= terms.keys()
    expected = sum(terms[n][0] for n in ("loss_ce", "loss_bbox", "loss_giou", "loss_feature"))
    assert abs(out.total.item() - expected) < 1e-4
    assert terms["loss_feature"][0] == pytest.approx(2.5 * terms["loss_feature"][1])
    assert terms["loss_bbox"][0] == pytest.approx(5 * terms["loss_bbox"][1])
    no_rec = make_task(feature_recon=False)
    assert no_rec.feature_align is None
    assert "loss_feature" not in no_rec(make_batch()).terms


def test_gradients_reach_trainable_parts_only() -> None:
    task = make_task().train()
    task(make_batch()).total.backward()
    backbone = list(task.detector.backbone.parameters())
    assert backbone and all(p.grad is None for p in backbone)
    for name in ("patch2query", "feature_align", "detector.transformer", "detector.query_embed",
                 "detector.bbox_embed", "detector.class_embed", "detector.input_proj"):
        grads = [p.grad for n, p in task.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("variant,levels", [("vanilla", 1), ("conditional", 1),
                                            ("deformable", 1), ("deformable", 4)])
def test_few_cpu_iterations_give_finite_decreasing_loss(variant: str, levels: int) -> None:
    task = make_task(variant, levels, mask_ratio=0.0).train()
    batch = make_batch(sizes=((64, 64), (64, 64)))
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=5e-4)
    losses = []
    for _ in range(6):
        out = task(batch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


# --------------------------------------------------------------------------- config, checkpoints


@pytest.mark.parametrize("change", [
    {"num_patches": 3}, {"mask_ratio": 1.0}, {"min_patch": 0}, {"weight_recon": -1.0},
])
def test_bad_options_are_config_errors(change: dict) -> None:
    with pytest.raises(ConfigError, match="pretrain.updetr"):
        build_updetr_task(make_cfg(**change))


def test_backbone_must_be_frozen() -> None:
    cfg = make_cfg()
    cfg = replace(cfg, task="finetune",
                  model=replace(cfg.model, backbone=BackboneConfig(depth=18)))
    with pytest.raises(ConfigError, match="freeze=all"):
        build_updetr_task(cfg)


@pytest.mark.parametrize("variant,levels", [("vanilla", 1), ("deformable", 4)])
def test_checkpoint_converts_and_inits_like_siamese(variant: str, levels: int, tmp_path) -> None:
    from siamese_detr.configio import to_dict
    from siamese_detr.convert import convert_checkpoint, to_internal
    from siamese_detr.eval.loading import init_from_checkpoint
    from siamese_detr.models.detector import build_detector

    task = make_task(variant, levels)
    cfg = make_cfg(variant, levels)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"model": task.state_dict(), "config": to_dict(cfg), "kind": "pretrain", "step": 1}
    target = {"vanilla": "detr", "deformable": "deformable-detr"}[variant]
    state, report = convert_checkpoint(ckpt, target)
    assert report.ok and report.unmapped == []
    dropped = {k for k, _ in report.dropped}
    assert {"patch2query.weight", "feature_align.layers.1.weight"} <= dropped
    det = build_detector(cfg.model, 2)
    missing, unexpected = det.load_state_dict(to_internal(state), strict=False)
    assert unexpected == [] and all(k.startswith("class_embed") for k in missing)
    # --init of a downstream detector with 5 classes: everything but the class head
    path = tmp_path / "pre.pt"
    torch.save(ckpt, path)
    ft = build_detector(replace(cfg.model, backbone=BackboneConfig(depth=18)), 6)
    report_init = init_from_checkpoint(ft, path, variant)
    assert report_init.unexpected == [] and all(
        k.startswith("class_embed") for k in report_init.missing)
    for k, v in task.detector_state_dict().items():
        if not k.startswith("class_embed"):
            assert torch.equal(ft.state_dict()[k], v), k


def test_official_vanilla_preset_values() -> None:
    """updetr/detr/in1k carries dddzg/up-detr's recipe (docs/method.md, UP-DETR table)."""
    from siamese_detr.presets import get_preset

    cfg = get_preset("updetr/detr/in1k")
    u, o, m = cfg.pretrain.updetr, cfg.optim, cfg.model
    assert (cfg.task, cfg.pretrain.method, m.variant) == ("pretrain", "updetr", "vanilla")
    assert (u.num_patches, u.feature_recon, u.query_shuffle, u.mask_ratio) == (10, True, False,
                                                                              0.1)
    assert (u.patch_size, u.min_patch, u.weight_recon, u.base_max_size) == (128, 8, 1.0, 600)
    assert u.base_scales == (320, 336, 352, 368, 400, 416, 432, 448, 464, 480)
    assert (m.num_queries, m.enc_layers, m.dec_layers, m.hidden_dim, m.nheads) == (
        100, 6, 6, 256, 8)
    assert (m.dim_feedforward, m.dropout, m.aux_loss, m.backbone.freeze) == (
        2048, 0.1, True, "all")
    assert (o.lr, o.lr_backbone, o.weight_decay, o.clip_max_norm) == (1e-4, 0.0, 1e-4, 0.1)
    assert (o.unit, o.length, o.lr_drops, o.gamma) == ("epoch", 60, (40,), 0.1)
    assert (cfg.pretrain.batch_size, cfg.seed) == (32, 42)
    for name in ("updetr/conditional-100q/in1k", "updetr/deformable-ms-300q/in1k"):
        c = get_preset(name)
        assert (c.optim.unit, c.optim.length, c.optim.lr_drops) == ("iter", 300_000, (200_000,))
        assert c.model.num_queries % c.pretrain.updetr.num_patches == 0
