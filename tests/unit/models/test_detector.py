"""Detector: shapes, encode/decode split, padding invariance, external queries, freezing,
upstream parameter names, head parametrisation and initialisation, for every variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from siamese_detr.config import BackboneConfig, ConfigError, ModelConfig
from siamese_detr.models.detector import Detector, build_detector
from siamese_detr.models.heads import inverse_sigmoid
from siamese_detr.structures import Encoded, ImageBatch, QueryInputs

D, Q, L, NUM_CLASSES = 32, 6, 2, 5
CASES = {
    "vanilla": {"variant": "vanilla"},
    "conditional": {"variant": "conditional"},
    "deformable": {"variant": "deformable"},
    "deformable-ms-refine": {"variant": "deformable", "num_feature_levels": 4,
                             "box_refine": True},
}


def _cfg(case: str, freeze: str = "stem+layer1", weights: str = "", **over) -> ModelConfig:
    if CASES[case]["variant"] == "deformable":
        pytest.importorskip("siamese_detr.models.transformer.deformable")
    kw = dict(hidden_dim=D, nheads=4, enc_layers=1, dec_layers=L, dim_feedforward=64,
              dropout=0.0, num_queries=Q, num_classes=NUM_CLASSES)
    kw.update(CASES[case])
    kw.update(over)
    return ModelConfig(backbone=BackboneConfig(depth=18, freeze=freeze, weights=weights), **kw)


def _build(case: str, num_logits: int = NUM_CLASSES + 1, **kw) -> Detector:
    torch.manual_seed(0)
    return build_detector(_cfg(case, **kw), num_logits).eval()


def _batch(*sizes: tuple[int, int], canvas: tuple[int, int] | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    H = canvas[0] if canvas else max(s[0] for s in sizes)
    W = canvas[1] if canvas else max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, H, W)
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return ImageBatch(images, mask, torch.tensor(sizes))


@pytest.mark.parametrize("case", list(CASES))
def test_shapes_and_encode_decode_is_forward(case) -> None:
    det = _build(case)
    batch = _batch((64, 96), (64, 64))
    out = det(batch)
    assert out.num_layers == L
    assert out.logits.shape == (L, 2, Q, NUM_CLASSES + 1)
    assert out.boxes.shape == (L, 2, Q, 4) and out.hidden.shape == (L, 2, Q, D)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    enc = det.encode(batch)
    assert isinstance(enc, Encoded) and enc.memory.shape[::2] == (2, D)
    assert enc.strides == det.backbone.strides
    assert [f.shape[1] for f in enc.features] == det.backbone.num_channels
    n_levels = det.num_feature_levels if det.variant == "deformable" else 1
    assert enc.spatial_shapes.shape == (n_levels, 2)
    assert enc.memory.shape[1] == int(enc.spatial_shapes.prod(1).sum())
    again = det.decode(enc)
    for a, b in [(again.logits, out.logits), (again.boxes, out.boxes),
                 (again.hidden, out.hidden)]:
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_heads_follow_upstream_parametrisation(case) -> None:
    det = _build(case, num_logits=NUM_CLASSES)  # focal: prior bias
    heads_c = det.class_embed if det.variant == "deformable" else [det.class_embed] * L
    for head in heads_c:
        torch.testing.assert_close(head.bias, torch.full((NUM_CLASSES,), -math.log(99.0)))
    batch = _batch((64, 96))
    out = det(batch)
    for layer in range(L):
        torch.testing.assert_close(out.logits[layer], heads_c[layer](out.hidden[layer]))
    query_pos = det.query_embed.weight[None, :, :D]
    match det.variant:
        case "vanilla":
            torch.testing.assert_close(out.boxes, det.bbox_embed(out.hidden).sigmoid())
        case "conditional":  # last bbox layer zero: boxes = (ref point, 0.5, 0.5)
            ref = det.transformer.decoder.ref_point_head(query_pos).sigmoid()
            torch.testing.assert_close(out.boxes[..., :2], ref.expand(L, 1, Q, 2))
            torch.testing.assert_close(out.boxes[..., 2:], torch.full((L, 1, Q, 2), 0.5))
        case "deformable":  # (ref point, sigmoid(-2), sigmoid(-2)) at layer 0
            ref = det.transformer.reference_points(query_pos).sigmoid()
            torch.testing.assert_close(out.boxes[0, ..., :2], ref)
            wh = torch.full((1, Q, 2), 1 / (1 + math.exp(2.0)))
            torch.testing.assert_close(out.boxes[0, ..., 2:], wh)
    ce = _build(case, num_logits=NUM_CLASSES + 1)
    first = ce.class_embed[0] if ce.variant == "deformable" else ce.class_embed
    assert not torch.allclose(first.bias, torch.full_like(first.bias, -math.log(99.0)))


class PoolBackbone(nn.Module):
    """Stand-in backbone whose features inside the image do not see the padding (average
    pooling with kernel = stride, then 1x1 convs): ResNet's 3x3 convolutions see the padding,
    as in DETR, so exact invariance can only hold from the features on."""

    def __init__(self, strides: list[int], channels: list[int]) -> None:
        super().__init__()
        self.strides, self.num_channels = strides, channels
        self.proj = nn.ModuleList(nn.Conv2d(3, c, 1) for c in channels)

    @property
    def fully_frozen(self) -> bool:
        return False

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [p(F.avg_pool2d(images, s, s)) for s, p in zip(self.strides, self.proj)]


@pytest.mark.parametrize(("case", "levels"), [("vanilla", 1), ("conditional", 1),
                                              ("deformable", 1), ("deformable", 3)])
def test_padding_invariance(case, levels) -> None:
    det = _build(case, num_feature_levels=levels)
    det.backbone = PoolBackbone(det.backbone.strides, det.backbone.num_channels)
    if det.variant == "deformable":
        # GroupNorm in input_proj pools statistics over the padding too (as upstream)
        for proj in det.input_proj:
            proj[1] = nn.Identity()
    alone = det(_batch((64, 96), seed=3))
    padded = _batch((64, 96), (128, 128), seed=3)  # same image 0, padded to 128 x 128
    assert padded.mask[0].any()
    both = det(padded)
    for a, b in [(alone.logits, both.logits), (alone.boxes, both.boxes),
                 (alone.hidden, both.hidden)]:
        torch.testing.assert_close(b[:, :1], a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_external_queries_and_group_mask(case) -> None:
    det = _build(case)
    enc = det.encode(_batch((64, 96), (64, 64)))
    g = torch.Generator().manual_seed(1)
    n = 4  # != num_queries
    pos = torch.randn(2, n, D, generator=g)
    content = torch.randn(2, n, D, generator=g)
    block = torch.ones(n, n, dtype=torch.bool)
    block[:2, :2] = False
    block[2:, 2:] = False
    out = det.decode(enc, QueryInputs(position=pos, content=content, self_attn_mask=block))
    assert out.boxes.shape == (L, 2, n, 4) and out.logits.shape == (L, 2, n, NUM_CLASSES + 1)
    free = det.decode(enc, QueryInputs(position=pos, content=content))
    assert not torch.allclose(free.hidden, out.hidden, atol=1e-4)  # the mask matters
    pos2, content2 = pos.clone(), content.clone()
    pos2[:, 2:] = torch.randn(2, 2, D, generator=g)
    content2[:, 2:] = torch.randn(2, 2, D, generator=g)
    other = det.decode(enc, QueryInputs(position=pos2, content=content2, self_attn_mask=block))
    torch.testing.assert_close(other.hidden[:, :, :2], out.hidden[:, :, :2])
    torch.testing.assert_close(other.boxes[:, :, :2], out.boxes[:, :, :2])
    assert not torch.allclose(other.hidden[:, :, 2:], out.hidden[:, :, 2:])
    with pytest.raises(ValueError, match="self_attn_mask"):
        det.decode(enc, QueryInputs(position=pos, content=content, self_attn_mask=block[:3]))


def test_deformable_needs_content_for_other_query_counts() -> None:
    det = _build("deformable")
    enc = det.encode(_batch((64, 64)))
    with pytest.raises(ValueError, match="content"):
        det.decode(enc, QueryInputs(position=torch.randn(1, Q + 1, D)))
    # default content is the learned second half of query_embed
    out = det.decode(enc, QueryInputs(position=det.query_embed.weight[None, :, :D]))
    torch.testing.assert_close(out.hidden, det.decode(enc).hidden)


@pytest.mark.parametrize("case", ["conditional", "deformable-ms-refine"])
def test_frozen_backbone_gets_no_gradient(case) -> None:
    det = _build(case, freeze="all").train()
    out = det(_batch((128, 128), (96, 128)))  # extra stride-64 level: 2 x 2 for GroupNorm
    (out.boxes.sum() + out.logits.sum() + out.hidden.sum()).backward()
    assert all(p.grad is None for p in det.backbone.parameters())
    assert det.input_proj.parameters().__next__().grad is not None
    assert det.query_embed.weight.grad is not None
    det = _build(case, freeze="stem+layer1").train()
    enc = det.encode(_batch((128, 128)))
    assert enc.features[-1].requires_grad
    det.decode(enc).boxes.sum().backward()
    assert det.backbone.body.conv1.weight.grad is None
    assert det.backbone.body.layer1[0].conv1.weight.grad is None
    assert det.backbone.body.layer4[0].conv1.weight.grad is not None


NAMES = {
    "vanilla": ["input_proj.weight", "class_embed.weight", "bbox_embed.layers.2.weight",
                "transformer.encoder.layers.0.self_attn.in_proj_weight",
                "transformer.encoder.layers.0.linear1.weight",
                "transformer.encoder.layers.0.norm2.weight",
                "transformer.decoder.layers.1.multihead_attn.out_proj.weight",
                "transformer.decoder.layers.0.norm3.bias", "transformer.decoder.norm.weight"],
    "conditional": ["input_proj.weight", "class_embed.weight", "bbox_embed.layers.2.weight",
                    "transformer.decoder.layers.0.ca_qpos_sine_proj.weight",
                    "transformer.decoder.layers.0.ca_qpos_proj.weight",
                    "transformer.decoder.layers.1.sa_kpos_proj.bias",
                    "transformer.decoder.layers.1.cross_attn.out_proj.weight",
                    "transformer.decoder.layers.1.self_attn.out_proj.weight",
                    "transformer.decoder.query_scale.layers.1.weight",
                    "transformer.decoder.ref_point_head.layers.1.weight",
                    "transformer.decoder.norm.weight"],
    "deformable": ["input_proj.0.0.weight", "input_proj.0.1.weight", "class_embed.0.weight",
                   "class_embed.1.bias", "bbox_embed.1.layers.2.weight"],
    "deformable-ms-refine": ["input_proj.2.0.weight", "input_proj.3.0.weight",
                             "input_proj.3.1.bias", "class_embed.1.weight",
                             "bbox_embed.1.layers.2.weight",
                             "transformer.decoder.bbox_embed.1.layers.2.weight"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_upstream_parameter_names(case) -> None:
    det = _build(case)
    keys = set(det.state_dict())
    common = ["query_embed.weight", "backbone.body.conv1.weight",
              "backbone.body.layer1.0.bn1.running_var", "backbone.body.layer4.1.conv2.weight"]
    missing = [k for k in common + NAMES[case] if k not in keys]
    assert not missing
    assert not any(k.startswith("backbone.body.fc") for k in keys)
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in keys
    qdim = 2 * D if det.variant == "deformable" else D
    assert tuple(det.query_embed.weight.shape) == (Q, qdim)
    if case == "deformable":
        assert det.class_embed[0] is det.class_embed[1]  # shared like upstream
    if case == "deformable-ms-refine":
        assert det.class_embed[0] is not det.class_embed[1]
        assert tuple(det.input_proj[3][0].weight.shape) == (D, 512, 3, 3)  # from C5
        assert det.backbone.strides == [8, 16, 32]


def test_build_detector_loads_backbone_weights(tmp_path) -> None:
    torch.manual_seed(2)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    det = build_detector(_cfg("conditional", weights=str(path)), NUM_CLASSES + 1)
    torch.testing.assert_close(det.backbone.body.layer3[0].conv1.weight,
                               state["layer3.0.conv1.weight"], rtol=0, atol=0)
    torch.save({k: v for k, v in state.items() if "layer2" not in k}, path)
    with pytest.raises(ConfigError, match="allow_missing_keys"):
        build_detector(_cfg("conditional", weights=str(path)), NUM_CLASSES + 1)


def test_inverse_sigmoid_used_for_offsets() -> None:
    # the detector adds logit(ref) to the first ref.shape[-1] coordinates
    delta = torch.zeros(1, 4)
    ref2 = torch.tensor([[0.2, 0.7]])
    out2 = Detector._offset(delta, ref2).sigmoid()
    torch.testing.assert_close(out2, torch.tensor([[0.2, 0.7, 0.5, 0.5]]))
    ref4 = torch.tensor([[0.2, 0.7, 0.1, 0.3]])
    torch.testing.assert_close(Detector._offset(delta, ref4).sigmoid(), ref4)
    torch.testing.assert_close(inverse_sigmoid(ref4).sigmoid(), ref4)
