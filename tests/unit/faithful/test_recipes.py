"""Issue 12 items 3-5: VOC training sets and box convention, the official Deformable batch-0
queries as a preset, and the L_g pooling as a config key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siamese_detr.configio import apply_overrides
from siamese_detr.errors import ConfigError
from siamese_detr.presets import PRESETS, get_preset


def test_voc_presets_name_their_training_set() -> None:
    for variant in ("conditional-100q", "detr", "deformable-ms-300q"):
        improved = get_preset(f"finetune/{variant}/voc")
        faithful = get_preset(f"finetune/{variant}/voc12")
        assert improved.data.train_ann.endswith("voc0712_trainval.json")
        assert faithful.data.train_ann.endswith("voc12_trainval_official.json")
        assert faithful.data.val_ann.endswith("voc07_test_official.json")
        # nothing else differs
        assert faithful.model == improved.model and faithful.optim == improved.optim


def test_voc_official_box_convention(tmp_path: Path) -> None:
    from siamese_detr.cli.main import main
    from siamese_detr.data.voc import voc_to_coco

    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "Annotations" / "2008_000001.xml").write_text(
        "<annotation><size><width>320</width><height>240</height></size><object><name>cat"
        "</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>110</xmax>"
        "<ymax>70</ymax></bndbox></object></annotation>")
    (root / "ImageSets/Main/trainval.txt").write_text("2008_000001\n")
    ours = voc_to_coco(tmp_path / "VOCdevkit", [("2012", "trainval")])["annotations"][0]
    official = voc_to_coco(tmp_path / "VOCdevkit", [("2012", "trainval")],
                           box_convention="official")["annotations"][0]
    assert ours["bbox"] == [10, 20, 100, 50] and ours["area"] == 5000
    # Zx55/SiameseDETR util/voc_to_coco_style.py: [x1, y1, x2 - x1, y2 - y1]
    assert official["bbox"] == [11, 21, 99, 49] and official["area"] == 99 * 49
    out = tmp_path / "voc12_trainval_official.json"
    assert main(["voc2coco", "--devkit", str(tmp_path / "VOCdevkit"), "--sets",
                 "2012:trainval", "--out", str(out), "--box-convention", "official"]) == 0
    written = json.loads(out.read_text())
    assert written["annotations"][0]["bbox"] == [11, 21, 99, 49]
    assert "official" in written["info"]["bbox_convention"]


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("siamese/")
                                  and not n.endswith("-official")])
def test_every_pretraining_preset_has_an_official_twin(name: str) -> None:
    ours, official = get_preset(name), get_preset(name + "-official")
    deformable = ours.model.variant == "deformable"
    assert ours.pretrain.siamese.per_sample_queries
    assert official.pretrain.siamese.per_sample_queries is (not deformable)
    assert not ours.pretrain.siamese.pool_padding and official.pretrain.siamese.pool_padding
    assert not ours.pretrain.siamese.official_init and official.pretrain.siamese.official_init
    # everything else is the same recipe
    from dataclasses import replace

    same = replace(official.pretrain.siamese, per_sample_queries=True, pool_padding=False,
                   official_init=False)
    assert same == ours.pretrain.siamese
    assert official.model == ours.model and official.optim == ours.optim
    assert official.output_dir != ours.output_dir


@pytest.mark.parametrize("variant", ["vanilla", "conditional"])
def test_batch_zero_queries_refused_outside_deformable(variant: str) -> None:
    cfg = get_preset(f"tiny/{variant}/siamese")
    with pytest.raises(ConfigError) as err:
        apply_overrides(cfg, ["pretrain.siamese.per_sample_queries=false"])
    assert "pretrain.siamese.per_sample_queries=false" in str(err.value)
    assert f"model.variant={variant}" in str(err.value)
    ok = apply_overrides(get_preset("tiny/deformable/siamese"),
                         ["pretrain.siamese.per_sample_queries=false"])
    assert not ok.pretrain.siamese.per_sample_queries


def test_pool_padding_is_a_config_key_that_reaches_the_task() -> None:
    import torch

    from siamese_detr.methods.siamese.task import build_siamese_task

    cfg = apply_overrides(get_preset("tiny/conditional/siamese"),
                          ["model.backbone.weights=", "pretrain.siamese.pool_padding=true"])
    torch.manual_seed(0)
    task = build_siamese_task(cfg).eval()
    assert task.pool_padding
    from siamese_detr.structures import ImageBatch

    images = torch.randn(2, 3, 96, 96)
    mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    mask[1, :, 48:] = True  # sample 1 is half padding
    with torch.no_grad():
        enc = task.detector.encode(ImageBatch(images=images, mask=mask,
                                              sizes=torch.tensor([[96, 96], [96, 48]])))
        # official: plain mean over the whole padded map
        torch.testing.assert_close(task.pooled_memory(enc), enc.memory.mean(dim=1))
        task.pool_padding = False
        valid = (~enc.mask[1]).float()[:, None]
        torch.testing.assert_close(task.pooled_memory(enc)[1],
                                   (enc.memory[1] * valid).sum(0) / valid.sum())
