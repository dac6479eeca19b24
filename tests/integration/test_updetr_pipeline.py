"""UP-DETR end to end on the toy data: `pretrain --preset tiny/*/updetr`, then
`finetune --init` starts from its transformer."""

import pytest
import torch

from siamese_detr.cli.main import main
from siamese_detr.engine.checkpoint import load_checkpoint

from .conftest import finetune_overrides


def _pretrain(toy, out, variant: str) -> list[str]:
    return [
        "pretrain", "--preset", f"tiny/{variant}/updetr", "--out", str(out),
        f"pretrain.images={toy['root'] / 'unlabeled'}", "pretrain.batch_size=2",
        "pretrain.updetr.base_scales=128", "pretrain.updetr.patch_size=32",
        f"model.backbone.weights={toy['root'] / 'r18.pth'}", "optim.length=2",
        "optim.lr_drops=2", "engine.log_every=1", "engine.progress=false",
    ]


@pytest.mark.parametrize("variant", ["conditional", "deformable"])
def test_updetr_checkpoint_fine_tunes_with_init(toy_data, tmp_path, variant):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(_pretrain(toy_data, pre, variant)) == 0
    assert main(["finetune", *finetune_overrides(toy_data, ft, iters=1, variant=variant),
                 "optim.lr=1e-12", "optim.lr_backbone=1e-12", "optim.lr_drops=",
                 "--init", str(pre / "last.pt")]) == 0
    a = load_checkpoint(pre / "last.pt")["model"]
    b = load_checkpoint(ft / "last.pt")["model"]
    assert any(k.startswith("patch2query.") for k in a)
    assert not any(k.startswith(("patch2query.", "feature_align.")) for k in b)
    for k in a:
        if k.startswith("detector.transformer."):
            assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert "init from" in (ft / "log.txt").read_text()
