"""Checkpoints written before the issue-15 redesign still load, fine-tune and convert as they
did. The fixtures were saved by the old code (tests/fixtures/make_legacy_checkpoints.py, run at
commit 5b918d2); the frozen ResNet-18 backbone is left out of the file to keep it small and is
rebuilt here the way the script built it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siamese_detr.configio import from_dict
from siamese_detr.convert import convert_checkpoint
from siamese_detr.engine.checkpoint import load_checkpoint, save_checkpoint
from siamese_detr.eval.loading import init_from_checkpoint, load_detector
from siamese_detr.models.detector import build_detector, build_detector_from_config

FIXTURES = Path(__file__).parents[2] / "fixtures"
PRETRAIN = FIXTURES / "legacy_pretrain_vanilla.pt"


def fingerprint(state: dict) -> dict:
    """The same per-tensor fingerprint as the fixture script (shape, sum, |sum|, weighted)."""
    out = {}
    for k, v in state.items():
        x = v.detach().double().flatten()
        w = torch.arange(1, x.numel() + 1, dtype=torch.float64)
        out[k] = torch.cat([torch.tensor([float(len(v.shape))], dtype=torch.float64),
                            torch.tensor(list(v.shape), dtype=torch.float64),
                            torch.stack([x.sum(), x.abs().sum(), (w * x).sum()])])
    return out


def assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def expected() -> dict:
    return load_checkpoint(FIXTURES / "legacy_expected.pt")["vanilla"]


def _backbone(cfg) -> dict:
    torch.manual_seed(0)
    det = build_detector(cfg.model, 2)
    return {k: v for k, v in det.state_dict().items() if k.startswith("backbone.")}


def _full_pretrain(tmp_path: Path) -> Path:
    ckpt = load_checkpoint(PRETRAIN)
    model = dict(ckpt["model"])
    model.update({"detector." + k: v for k, v in _backbone(from_dict(ckpt["config"])).items()})
    path = tmp_path / "full.pt"
    save_checkpoint({**ckpt, "model": model}, path)
    return path


def test_fixture_is_small_and_old_format() -> None:
    assert PRETRAIN.stat().st_size < 300_000
    ckpt = load_checkpoint(PRETRAIN)
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 7
    assert all(k.startswith(("detector.", "patch2query")) for k in ckpt["model"])


def test_converts_to_the_same_tensors(expected: dict) -> None:
    state, report = convert_checkpoint(load_checkpoint(PRETRAIN), "detr")
    assert report.summary() == expected["report"]
    assert_same(fingerprint(state), expected["convert"])


def test_fine_tuning_init_loads_the_same_tensors(tmp_path: Path, expected: dict) -> None:
    ckpt = load_checkpoint(PRETRAIN)
    fcfg = from_dict({**ckpt["config"], "task": "finetune",
                      "model": {**ckpt["config"]["model"],
                                "backbone": {**ckpt["config"]["model"]["backbone"],
                                             "freeze": "stem+layer1"}}})
    torch.manual_seed(1)
    det = build_detector_from_config(fcfg)
    report = init_from_checkpoint(det, _full_pretrain(tmp_path), "vanilla")
    assert report.summary() == expected["init_summary"]
    state = {k: v for k, v in det.state_dict().items() if not k.startswith("backbone.")}
    assert_same(fingerprint(state), expected["init_state"])


def test_load_detector_reads_the_old_checkpoint(tmp_path: Path) -> None:
    loaded = load_detector(_full_pretrain(tmp_path))
    ckpt = load_checkpoint(PRETRAIN)
    assert loaded.kind == "pretrain" and loaded.step == 7 and loaded.missing == []
    assert loaded.config.model.variant == "vanilla" and loaded.config.model.hidden_dim == 32
    assert loaded.detector.head_activation == "softmax" and not loaded.detector.training
    own = loaded.detector.state_dict()
    for k, v in ckpt["model"].items():
        if k.startswith("detector."):
            assert torch.equal(own[k.removeprefix("detector.")], v), k


def test_load_detector_reads_a_converted_file_with_a_config(tmp_path: Path) -> None:
    full = load_checkpoint(_full_pretrain(tmp_path))
    state, _ = convert_checkpoint(full, "detr")
    path = tmp_path / "converted.pth"
    save_checkpoint({"model": state}, path)
    cfg = from_dict(full["config"])
    loaded = load_detector(path, config=cfg)
    assert loaded.kind == "finetune"  # the converted file does not say; no detector. prefix
    assert sorted(loaded.missing) == ["class_embed.bias", "class_embed.weight"]
    own = loaded.detector.state_dict()
    torch.testing.assert_close(own["backbone.body.conv1.weight"],
                               state["backbone.0.body.conv1.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="stores no config"):
        load_detector(path)
