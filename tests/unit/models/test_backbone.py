"""Backbone: FrozenBatchNorm2d, levels/freezing, and weight loading in the three formats."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18

from siamese_detr.config import ConfigError
from siamese_detr.models.backbone import Backbone, FrozenBatchNorm2d, load_backbone_weights


def _random_bn(n: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(n)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    return bn.eval()


def test_frozen_bn_equals_batchnorm_eval() -> None:
    torch.manual_seed(0)
    bn = _random_bn(6)
    frozen = FrozenBatchNorm2d(6)
    result = frozen.load_state_dict(bn.state_dict())  # includes num_batches_tracked
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)
    frozen.train()  # no batch statistics in any mode
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


@pytest.mark.parametrize(
    ("levels", "strides", "channels"),
    [((5,), [32], [512]), ((3, 4, 5), [8, 16, 32], [128, 256, 512])],
)
def test_backbone_levels(levels, strides, channels) -> None:
    bb = Backbone(18, levels).eval()
    assert bb.strides == strides and bb.num_channels == channels
    feats = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, strides)
    ]
    names = dict(bb.named_parameters())
    assert "body.conv1.weight" in names and "body.layer1.0.conv1.weight" in names
    assert not any(k.startswith(("body.fc", "body.avgpool")) for k in bb.state_dict())


def test_freeze_modes() -> None:
    frozen = {n for n, p in Backbone(18, freeze="stem+layer1").named_parameters()
              if not p.requires_grad}
    assert "body.conv1.weight" in frozen and "body.layer1.1.conv2.weight" in frozen
    assert not any(n.startswith(("body.layer2", "body.layer3", "body.layer4")) for n in frozen)
    assert Backbone(18, freeze="all").fully_frozen
    assert all(p.requires_grad for p in Backbone(18, freeze="none").parameters())
    bn_all = Backbone(18, freeze="all", frozen_bn=False).train()
    assert not bn_all.training and not bn_all.body.bn1.training  # stats never update


def _torchvision_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = resnet18(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(bb: Backbone, ref: dict[str, torch.Tensor]) -> None:
    for key, value in bb.body.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=0, atol=0)


def _n_target_keys() -> int:
    return len(Backbone(18).body.state_dict())


def test_load_torchvision(tmp_path) -> None:
    ref = _torchvision_state()
    path = tmp_path / "r18.pth"
    torch.save(ref, path)
    bb = Backbone(18)
    report = load_backbone_weights(bb, path, "torchvision")
    _assert_loaded(bb, ref)
    assert len(report.loaded) == _n_target_keys() and not report.missing
    assert not report.unexpected
    assert {"fc.weight", "fc.bias", "bn1.num_batches_tracked"} <= set(report.dropped)


def test_load_swav(tmp_path) -> None:
    ref = _torchvision_state()
    wrapped = {"module." + k: v for k, v in ref.items() if not k.startswith("fc.")}
    wrapped["module.projection_head.0.weight"] = torch.randn(8, 512)
    wrapped["module.prototypes.weight"] = torch.randn(3, 8)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save({"state_dict": wrapped, "epoch": 800}, path)
    bb = Backbone(18)
    report = load_backbone_weights(bb, path)  # auto-detected
    _assert_loaded(bb, ref)
    assert len(report.loaded) == _n_target_keys() and not report.missing
    assert not report.unexpected
    assert {"projection_head.0.weight", "prototypes.weight"} <= set(report.dropped)
    # explicitly as swav: same result
    bb2 = Backbone(18)
    load_backbone_weights(bb2, path, "swav")
    _assert_loaded(bb2, ref)


def test_load_safetensors(tmp_path) -> None:
    ref = _torchvision_state()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items() if "num_batches" not in k}, str(path))
    bb = Backbone(18, return_levels=(3, 4, 5))
    report = load_backbone_weights(bb, path, "safetensors")
    _assert_loaded(bb, ref)
    assert len(report.loaded) == _n_target_keys() and not report.missing
    assert set(report.dropped) == {"fc.weight", "fc.bias"} and not report.unexpected


def test_missing_keys(tmp_path) -> None:
    ref = _torchvision_state()
    partial = {k: v for k, v in ref.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(ConfigError, match="allow_missing_keys=true") as err:
        load_backbone_weights(Backbone(18), path)
    assert "partial.pth" in str(err.value) and "layer4.0.conv1.weight" in str(err.value)
    bb = Backbone(18)
    before = bb.body.layer4[0].conv1.weight.clone()
    report = load_backbone_weights(bb, path, allow_missing=True)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)
    torch.testing.assert_close(bb.body.conv1.weight, ref["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bb.body.layer4[0].conv1.weight, before, rtol=0, atol=0)


def test_bad_files(tmp_path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth"):
        load_backbone_weights(Backbone(18), junk)
    with pytest.raises(ConfigError, match="nope.pth"):
        load_backbone_weights(Backbone(18), tmp_path / "nope.pth")
    wrong = tmp_path / "r18.pth"
    torch.save(_torchvision_state(), wrong)
    with pytest.raises(ConfigError, match="shape"):
        load_backbone_weights(Backbone(50), wrong)


def test_frozen_bn_keeps_bfloat16() -> None:
    bn = FrozenBatchNorm2d(4)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
    bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    x = torch.randn(2, 4, 3, 5)
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16  # no float32 copy of a bfloat16 feature map
    expected = (x - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + 1e-5
                                                       ).sqrt() * bn.weight[:, None, None]
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
