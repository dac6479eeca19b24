"""Issue 12 items 7-8: each matching is paired with its own decoder layer in L_r, and the
official pretraining initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from siamese_detr.config import (
    BackboneConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    SiameseOptions,
)
from siamese_detr.losses.discrimination import region_discrimination_loss
from siamese_detr.models.position import sine_position_encoding
from siamese_detr.structures import DetectorOutput

M, Q, L = 2, 4, 3


def _task(variant: str = "conditional", **opts):
    from siamese_detr.methods.siamese.task import build_siamese_task

    model = ModelConfig(variant=variant, backbone=BackboneConfig(depth=18, freeze="all"),
                        hidden_dim=32, nheads=4, enc_layers=1, dec_layers=L,
                        dim_feedforward=32, num_queries=Q, enc_n_points=1, dec_n_points=1)
    siamese = SiameseOptions(num_regions=M, **opts)
    torch.manual_seed(0)
    return build_siamese_task(RunConfig(task="pretrain", model=model,
                                        pretrain=PretrainConfig(siamese=siamese)))


def _output(B: int = 2) -> DetectorOutput:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(L, B, Q, 32, generator=g)
    return DetectorOutput(logits=torch.randn(L, B, Q, 2, generator=g),
                          boxes=torch.rand(L, B, Q, 4, generator=g), hidden=hidden)


def _by_hand(task, out, pairs, target) -> torch.Tensor:
    """sum over (layer, matching) of L_r, computed directly."""
    B = target.shape[0]
    total = torch.zeros(())
    for layer, matching in pairs:
        pred = torch.cat([out.hidden[layer, b, src] for b, (src, _) in enumerate(matching)])
        tgt = torch.cat([target[b, t] for b, (_, t) in enumerate(matching)])
        total = total + region_discrimination_loss(task.feature_align(pred), tgt, B * M)
    return total


def _matching(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(Q, generator=g)[:M], torch.randperm(M, generator=g))
            for _ in range(2)]


def test_supervised_layers_follow_aux_loss() -> None:
    task = _task()
    assert task.criterion.supervised_layers(L) == [0, 1, 2]
    task.criterion.aux_loss = False
    assert task.criterion.supervised_layers(L) == [2]


def test_region_loss_pairs_each_matching_with_its_own_layer() -> None:
    task = _task()
    out, target = _output(), torch.randn(2, M, 512)
    indices = [_matching(s) for s in range(L)]
    with torch.no_grad():
        got = task.region_loss(out, indices, target)
        torch.testing.assert_close(got, _by_hand(task, out, zip(range(L), indices), target))
        # only the last layer supervised: its single matching goes with the LAST layer's states
        task.criterion.aux_loss = False
        last = task.region_loss(out, indices[-1:], target)
        torch.testing.assert_close(last, _by_hand(task, out, [(L - 1, indices[-1])], target))
        first = _by_hand(task, out, [(0, indices[-1])], target)
        assert not torch.allclose(last, first)  # the old positional pairing (layer 0)
        with pytest.raises(ValueError, match="supervised layers"):
            task.region_loss(out, indices, target)  # 3 matchings for 1 supervised layer


@pytest.mark.parametrize("variant", ["conditional", "deformable"])
def test_default_init_is_upstream_fine_tuning(variant: str) -> None:
    det = _task(variant).detector
    head = det.bbox_embed if variant == "conditional" else det.bbox_embed[0]
    assert torch.count_nonzero(head.layers[-1].weight) == 0
    expected_bias = [0, 0, -2, -2] if variant == "deformable" else [0, 0, 0, 0]
    assert head.layers[-1].bias.tolist() == expected_bias
    assert det.pos_offset == (-0.5 if variant == "deformable" else 0.0)


@pytest.mark.parametrize("variant", ["vanilla", "conditional", "deformable"])
def test_official_init_matches_the_official_pretraining_code(variant: str) -> None:
    det = _task(variant, official_init=True).detector
    heads = list(det.bbox_embed) if variant == "deformable" else [det.bbox_embed]
    for head in heads:
        for layer in head.layers:  # PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), ..)
            bound = 1 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                assert torch.count_nonzero(p) == p.numel()
                assert p.abs().max() <= bound
    assert det.pos_offset == 0.0
    # the detector's position encoding is the official one: count / total * 2 pi, no offset
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    pos = det._pos(mask, torch.zeros(()))
    torch.testing.assert_close(pos, sine_position_encoding(mask, 16, offset=0.0))
    y_first = pos[0, 0, 0, 0]  # channel 0 = sin(y / T^0) at row 0: (1 / 3) * 2 pi
    assert float(y_first) == pytest.approx(math.sin(1 / 3 * 2 * math.pi), abs=1e-5)
