"""Item 8: a randomly initialised frozen backbone never trains without a word."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from siamese_detr.presets import get_preset


def test_paper_preset_without_weights_is_refused(tmp_path, capsys):
    from siamese_detr.cli.main import main

    rc = main(["pretrain", "--preset", "siamese/conditional-100q/in1k", "--out",
               str(tmp_path / "run"), f"pretrain.images={tmp_path}", "model.backbone.weights="])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert err.startswith("siamese-detr pretrain: error: preset siamese/conditional-100q/in1k: "
                          "model.backbone.weights is empty: the frozen backbone (all) is "
                          "randomly initialised")
    assert "model.backbone.weights=random" in err


def test_tiny_preset_warns_and_random_is_an_explicit_choice(caplog):
    from siamese_detr.runner import check_backbone_weights

    cfg = get_preset("tiny/conditional/siamese")
    with caplog.at_level(logging.WARNING, logger="siamese_detr"):
        check_backbone_weights(cfg)
    assert any("randomly initialised" in r.getMessage() for r in caplog.records)
    caplog.clear()
    explicit = replace(cfg, model=replace(cfg.model, backbone=replace(
        cfg.model.backbone, weights="random")))
    with caplog.at_level(logging.WARNING, logger="siamese_detr"):
        check_backbone_weights(explicit)
    assert not caplog.records
    paper = get_preset("siamese/detr/in1k")
    paper = replace(paper, model=replace(paper.model, backbone=replace(
        paper.model.backbone, weights="")))
    explicit_paper = replace(paper, model=replace(paper.model, backbone=replace(
        paper.model.backbone, weights="random")))
    check_backbone_weights(explicit_paper)  # allowed when explicit
    from siamese_detr.errors import ConfigError

    with pytest.raises(ConfigError):
        check_backbone_weights(paper)


def test_random_keyword_builds_without_a_file():
    from siamese_detr.config import BackboneConfig
    from siamese_detr.models.detector import build_detector

    model = get_preset("tiny/vanilla/siamese").model
    model = replace(model, backbone=BackboneConfig(depth=18, freeze="all", weights="random"))
    det = build_detector(model, 2)
    assert sum(p.numel() for p in det.parameters()) > 0
