import torch

from siamese_detr.demo.photo_backbone import train_photo_backbone
from siamese_detr.models.backbone import Backbone, load_backbone_weights


def test_photo_backbone_is_deterministic_and_loads_completely(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    train_photo_backbone(a, steps=2, batch_size=4, crop_size=64, seed=3)
    train_photo_backbone(b, steps=2, batch_size=4, crop_size=64, seed=3)
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    assert sa.keys() == sb.keys() and not any(k.startswith("fc.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # it trained: weights moved away from a fresh init with the same seed, BN stats updated
    assert not torch.equal(sa["bn1.running_mean"], torch.zeros_like(sa["bn1.running_mean"]))
    backbone = Backbone(depth=18, freeze="all")
    report = load_backbone_weights(backbone, a, "torchvision")
    assert not report.missing and not report.unexpected
    assert torch.equal(backbone.body.conv1.weight, sa["conv1.weight"])
