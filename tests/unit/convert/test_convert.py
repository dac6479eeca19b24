"""Checkpoint conversion to DETR / Conditional DETR / Deformable DETR layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siamese_detr.config import (
    BackboneConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    SiameseOptions,
)
from siamese_detr.configio import to_dict
from siamese_detr.convert import ConversionError, convert_checkpoint, to_internal
from siamese_detr.convert.deformable import per_layer
from siamese_detr.structures import ImageBatch

TARGET = {"vanilla": "detr", "conditional": "conditional-detr", "deformable": "deformable-detr"}
CASES = [("vanilla", 1), ("conditional", 1), ("deformable", 1), ("deformable", 4)]


def _cfg(variant: str, levels: int = 1, dec_layers: int = 2) -> RunConfig:
    model = ModelConfig(
        variant=variant, backbone=BackboneConfig(depth=18, freeze="all"), hidden_dim=32,
        nheads=4, enc_layers=1, dec_layers=dec_layers, dim_feedforward=64, dropout=0.0,
        num_queries=8, num_feature_levels=levels, enc_n_points=2, dec_n_points=2,
    )
    return RunConfig(task="pretrain", model=model,
                     pretrain=PretrainConfig(siamese=SiameseOptions(num_regions=4)))


def _pretrain_ckpt(variant: str, levels: int = 1, dec_layers: int = 2):
    from siamese_detr.methods.siamese.task import build_siamese_task

    torch.manual_seed(0)
    cfg = _cfg(variant, levels, dec_layers)
    task = build_siamese_task(cfg)
    with torch.no_grad():  # non-trivial values everywhere (zero-initialised box layers too)
        for p in task.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"model": task.state_dict(), "config": to_dict(cfg), "kind": "pretrain", "step": 3}
    return task, cfg, ckpt


def _images() -> ImageBatch:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=g)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    images[1, :, :, 64:] = 0
    return ImageBatch(images=images, mask=mask, sizes=torch.tensor([[64, 96], [64, 64]]))


def _fresh_detector(cfg: RunConfig, num_logits: int):
    from siamese_detr.models.detector import build_detector

    torch.manual_seed(123)
    return build_detector(cfg.model, num_logits).eval()


@pytest.mark.parametrize("variant,levels", CASES)
def test_pretrain_conversion_complete_and_equivalent(variant: str, levels: int) -> None:
    task, cfg, ckpt = _pretrain_ckpt(variant, levels)
    state, report = convert_checkpoint(ckpt, TARGET[variant], own_code_only=True)
    assert report.ok and report.unmapped == []
    assert any(k.startswith("backbone.0.body.") for k in state)
    assert not any(k.startswith(("backbone.body.", "detector.", "patch2query", "feature_align",
                                 "projector", "predictor", "class_embed")) for k in state)
    dropped = {k for k, _ in report.dropped}
    assert "patch2query.weight" in dropped and any(k.startswith("class_embed") for k in dropped)
    if variant == "deformable":
        assert state["query_embed.weight"].shape == (8, 64)  # [Q, 2D] as upstream
        assert {k.split(".")[1] for k in state if k.startswith("bbox_embed.")} == {"0", "1"}
    # load into a fresh detector: only the class head is missing; boxes/states identical
    det = _fresh_detector(cfg, 2)
    missing, unexpected = det.load_state_dict(to_internal(state), strict=False)
    assert unexpected == [] and missing and all(k.startswith("class_embed") for k in missing)
    ref = task.detector.eval()
    with torch.no_grad():
        a, b = ref(_images()), det(_images())
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.hidden, b.hidden)


@pytest.mark.parametrize("variant", ["vanilla", "deformable"])
def test_finetune_checkpoint_keeps_class_head_and_matches(variant: str) -> None:
    cfg = _cfg(variant)
    det = _fresh_detector(cfg, 5)
    ckpt = {"model": det.state_dict(), "config": to_dict(cfg), "kind": "finetune"}
    state, report = convert_checkpoint(ckpt, TARGET[variant], own_code_only=True)
    assert report.ok and report.dropped == []
    other = _fresh_detector(cfg, 5)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(to_internal(state), strict=True)
    with torch.no_grad():
        a, b = det(_images()), other(_images())
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.boxes, b.boxes)


def test_unknown_key_reported_as_unmapped() -> None:
    _, _, ckpt = _pretrain_ckpt("conditional")
    ckpt["model"]["mystery.weight"] = torch.zeros(3)
    state, report = convert_checkpoint(ckpt, "conditional-detr", own_code_only=True)
    assert not report.ok and report.unmapped == ["mystery.weight"]
    assert "mystery.weight" not in state and "UNMAPPED: mystery.weight" in report.summary()


def test_wrong_target_for_variant_raises() -> None:
    _, _, ckpt = _pretrain_ckpt("deformable")
    with pytest.raises(ConversionError, match="deformable-detr"):
        convert_checkpoint(ckpt, "detr")
    with pytest.raises(ConversionError):
        convert_checkpoint(ckpt, "yolo")


def test_deformable_layer_count_comes_from_config() -> None:
    head = {"bbox_embed.layers.0.weight": torch.ones(2, 2), "class_embed.0.bias": torch.ones(2)}
    cfg = to_dict(_cfg("deformable", dec_layers=3))
    ckpt = {"model": head, "config": cfg, "kind": "finetune"}
    state, report = convert_checkpoint(ckpt, "deformable-detr", own_code_only=True)
    assert report.ok
    assert sorted(k for k in state if k.startswith("bbox_embed")) == [
        f"bbox_embed.{i}.layers.0.weight" for i in range(3)
    ]
    assert "class_embed.0.bias" in state
    with pytest.raises(ValueError):
        per_layer("bbox_embed", 2)("bbox_embed.5.layers.0.weight", torch.ones(1))


def test_cli_convert_writes_loadable_file(tmp_path: Path, capsys) -> None:
    from siamese_detr.cli.main import main

    _, _, ckpt = _pretrain_ckpt("vanilla")
    src, out = tmp_path / "last.pt", tmp_path / "out" / "detr.pth"
    torch.save(ckpt, src)
    assert main(["convert", "--checkpoint", str(src), "--to", "detr", "--out", str(out)]) == 0
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    assert set(loaded) == {"model"} and "backbone.0.body.conv1.weight" in loaded["model"]
    assert [p.name for p in out.parent.iterdir()] == ["detr.pth"]  # no temp file left
    assert "unmapped: 0" in capsys.readouterr().out

    ckpt["model"]["mystery.weight"] = torch.zeros(1)
    torch.save(ckpt, src)
    out2 = tmp_path / "bad.pth"
    assert main(["convert", "--checkpoint", str(src), "--to", "detr", "--out", str(out2)]) == 1
    assert not out2.exists()
    assert main(["convert", "--checkpoint", str(src), "--to", "detr", "--out", str(out2),
                 "--allow-unmapped"]) == 0
    assert out2.exists()
    # wrong target for the stored variant: a one-line user error (exit 2)
    assert main(["convert", "--checkpoint", str(src), "--to", "deformable-detr", "--out",
                 str(tmp_path / "x.pth")]) == 2
    assert "deformable" in capsys.readouterr().err
