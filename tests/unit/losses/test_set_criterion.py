"""SetCriterion: hand-computed losses, aux layers, weights applied once, build defaults."""

from __future__ import annotations

import math

import pytest
import torch

from siamese_detr.config import ConfigError, LossConfig, ModelConfig
from siamese_detr.losses.focal import sigmoid_focal_loss
from siamese_detr.losses.set_criterion import SetCriterion, build_criterion, num_logits
from siamese_detr.matcher import HungarianMatcher
from siamese_detr.structures import BoxTargets, DetectorOutput


def _out(logits: torch.Tensor, boxes: torch.Tensor) -> DetectorOutput:
    """Wrap ``[L, B, Q, *]`` tensors."""
    L, B, Q = boxes.shape[:3]
    return DetectorOutput(logits=logits, boxes=boxes, hidden=torch.zeros(L, B, Q, 8))


def _criterion(cls_loss: str = "ce", num_classes: int = 2, **kw) -> SetCriterion:
    matcher = HungarianMatcher(1.0, 5.0, 2.0, cls_loss=cls_loss)
    return SetCriterion(num_classes, matcher, cls_loss=cls_loss, **kw)


TBOXES = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
TLABELS = torch.tensor([1, 0])


def _perfect(cls_loss: str, L: int = 1):
    """Q=4: queries 1 and 3 hold the two targets exactly, with very confident logits."""
    C = 3 if cls_loss == "ce" else 2
    logits = torch.full((L, 1, 4, C), -20.0)
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], TBOXES[0].tolist(),
                          [0.1, 0.9, 0.1, 0.1], TBOXES[1].tolist()]).expand(L, 1, 4, 4).clone()
    logits[:, 0, 1, 1] = 20.0
    logits[:, 0, 3, 0] = 20.0
    if cls_loss == "ce":
        logits[:, 0, 0, 2] = 20.0
        logits[:, 0, 2, 2] = 20.0
    return _out(logits, boxes), [BoxTargets(boxes=TBOXES, labels=TLABELS)]


@pytest.mark.parametrize("cls_loss", ["ce", "focal"])
def test_perfect_prediction(cls_loss: str) -> None:
    out, targets = _perfect(cls_loss)
    loss, indices = _criterion(cls_loss)(out, targets)
    assert loss.terms["loss_bbox"][1] == pytest.approx(0.0, abs=1e-6)
    assert loss.terms["loss_giou"][1] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= loss.terms["loss_ce"][1] < 1e-6
    r, c = indices[-1][0]
    assert r.tolist() == [1, 3] and c.tolist() == [0, 1]


def test_ce_hand_computed_with_eos_weight() -> None:
    # one target (label 1) matched by query 0 (same box); query 1 is unmatched -> no-object
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    logits = torch.tensor([[[[0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]]])
    boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]])
    loss, _ = _criterion("ce", eos_coef=0.1)(_out(logits, boxes),
                                             [BoxTargets(boxes=box, labels=torch.tensor([1]))])

    def nll(row: list[float], k: int) -> float:
        return -(row[k] - math.log(sum(math.exp(v) for v in row)))

    expected = (1.0 * nll([0.0, 1.0, 0.0], 1) + 0.1 * nll([0.5, 0.0, 1.0], 2)) / (1.0 + 0.1)
    assert loss.terms["loss_ce"][1] == pytest.approx(expected, rel=1e-6)


def test_box_losses_hand_computed_and_num_boxes() -> None:
    # pred shifted by 0.1 in x: L1 = 0.1, GIoU = 0.02 / 0.06 - 0 = 1/3 -> 1 - GIoU = 2/3.
    # two images, one target each, the second image's prediction is exact -> /2
    tgt = [BoxTargets(boxes=torch.tensor([[0.6, 0.5, 0.2, 0.2]]), labels=torch.tensor([0])),
           BoxTargets(boxes=torch.tensor([[0.4, 0.4, 0.2, 0.2]]), labels=torch.tensor([0]))]
    boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.2]], [[0.4, 0.4, 0.2, 0.2]]]])
    logits = torch.zeros(1, 2, 1, 2)
    loss, _ = _criterion("focal", num_classes=2)(_out(logits, boxes), tgt)
    assert loss.terms["loss_bbox"][1] == pytest.approx(0.1 / 2, rel=1e-5)
    assert loss.terms["loss_giou"][1] == pytest.approx((2 / 3) / 2, rel=1e-5)
    # focal: onehot has a 1 at (img, q0, class 0) for both images, normalised by 2 boxes
    p = 0.5
    pos = 0.25 * (1 - p) ** 2 * -math.log(p)
    neg = 0.75 * p**2 * -math.log(1 - p)
    assert loss.terms["loss_ce"][1] == pytest.approx((2 * pos + 2 * neg) / 2, rel=1e-5)


def test_focal_helper_matches_formula() -> None:
    x = torch.tensor([[2.0, -1.0]])
    t = torch.tensor([[1.0, 0.0]])
    p = torch.sigmoid(x)[0].tolist()
    ref = 0.25 * (1 - p[0]) ** 2 * -math.log(p[0]) + 0.75 * p[1] ** 2 * -math.log(1 - p[1])
    assert float(sigmoid_focal_loss(x, t, num_boxes=4.0)) == pytest.approx(ref / 4, rel=1e-5)


@pytest.mark.parametrize("cls_loss", ["ce", "focal"])
def test_aux_layers_are_summed(cls_loss: str) -> None:
    g = torch.Generator().manual_seed(0)
    C = 4 if cls_loss == "ce" else 3
    one = _out(torch.randn(1, 2, 5, C, generator=g), torch.rand(1, 2, 5, 4, generator=g) * 0.4
               + 0.3)
    L = 3
    stacked = _out(one.logits.expand(L, -1, -1, -1), one.boxes.expand(L, -1, -1, -1))
    targets = [BoxTargets(boxes=TBOXES, labels=TLABELS), BoxTargets(boxes=TBOXES[:1],
                                                                    labels=TLABELS[:1])]
    crit = _criterion(cls_loss, num_classes=3)
    single, _ = crit(one, targets)
    multi, indices = crit(stacked, targets)
    assert len(indices) == L and len(indices[0]) == 2
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert multi.terms[name][1] == pytest.approx(L * single.terms[name][1], rel=1e-5)
        for layer in range(L):
            assert multi.terms[f"{name}_{layer}"][1] == pytest.approx(single.terms[name][1],
                                                                      rel=1e-5)
    assert float(multi.total) == pytest.approx(L * float(single.total), rel=1e-5)
    # without aux only the last layer counts
    last, idx = _criterion(cls_loss, num_classes=3, aux_loss=False)(stacked, targets)
    assert len(idx) == 1 and float(last.total) == pytest.approx(float(single.total), rel=1e-5)


def test_weights_applied_once() -> None:
    g = torch.Generator().manual_seed(3)
    out = _out(torch.randn(2, 1, 5, 3, generator=g, requires_grad=True),
               torch.rand(2, 1, 5, 4, generator=g) * 0.4 + 0.3)
    targets = [BoxTargets(boxes=TBOXES, labels=TLABELS)]
    a, _ = _criterion(weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0)(out, targets)
    b, _ = _criterion(weight_ce=1.0, weight_bbox=10.0, weight_giou=2.0)(out, targets)
    assert b.terms["loss_bbox"][0] == pytest.approx(2 * a.terms["loss_bbox"][0], rel=1e-6)
    assert b.terms["loss_bbox"][1] == pytest.approx(a.terms["loss_bbox"][1], rel=1e-6)
    assert b.terms["loss_bbox"][0] == pytest.approx(10 * b.terms["loss_bbox"][1], rel=1e-6)
    for name in ("loss_ce", "loss_giou"):
        assert b.terms[name] == pytest.approx(a.terms[name])
    assert float((b.total - a.total).detach()) == pytest.approx(a.terms["loss_bbox"][0], rel=1e-5)
    weighted_sum = sum(a.terms[n][0] for n in ("loss_ce", "loss_bbox", "loss_giou"))
    assert float(a.total.detach()) == pytest.approx(weighted_sum, rel=1e-6)
    a.total.backward()
    assert out.logits.grad is not None and out.logits.grad.abs().sum() > 0


def test_empty_targets_give_finite_loss() -> None:
    out = _out(torch.randn(1, 1, 3, 3), torch.rand(1, 1, 3, 4) * 0.4 + 0.3)
    empty = [BoxTargets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))]
    loss, _ = _criterion()(out, empty)
    assert loss.terms["loss_bbox"][1] == 0.0 and loss.terms["loss_giou"][1] == 0.0
    # all queries are no-object, weights all eos_coef -> plain mean NLL of the last column
    ref = -torch.log_softmax(out.logits[0, 0], -1)[:, 2].mean()
    assert loss.terms["loss_ce"][1] == pytest.approx(float(ref), rel=1e-5)


def test_label_out_of_range_is_a_config_error() -> None:
    out = _out(torch.randn(1, 1, 3, 3), torch.rand(1, 1, 3, 4) * 0.4 + 0.3)
    bad = [BoxTargets(boxes=TBOXES[:1], labels=torch.tensor([5]))]
    with pytest.raises(ConfigError, match="model.num_classes"):
        _criterion()(out, bad)


def test_build_criterion_defaults() -> None:
    cond = build_criterion(ModelConfig(variant="conditional", num_classes=20), LossConfig())
    assert cond.cls_loss == "focal" and cond.weights["loss_ce"] == 2.0
    assert cond.matcher.cost_class == 2.0 and cond.weights["loss_bbox"] == 5.0
    van = build_criterion(ModelConfig(variant="vanilla", num_classes=20, aux_loss=False),
                          LossConfig())
    assert van.cls_loss == "ce" and van.weights["loss_ce"] == 1.0
    assert van.matcher.cost_class == 1.0 and not van.aux_loss
    assert float(van.empty_weight[-1]) == pytest.approx(0.1)
    explicit = build_criterion(ModelConfig(), LossConfig(cls_loss="ce", cls_weight=3.0))
    assert explicit.cls_loss == "ce" and explicit.weights["loss_ce"] == 3.0
    assert num_logits(ModelConfig(variant="vanilla", num_classes=20), LossConfig()) == 21
    assert num_logits(ModelConfig(num_classes=20), LossConfig()) == 20
    with pytest.raises(ConfigError, match="loss.cls_weight"):
        build_criterion(ModelConfig(), LossConfig(cls_weight=-2.0))
