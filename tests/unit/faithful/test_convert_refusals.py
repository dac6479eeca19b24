"""Issue 12 item 6: ``convert`` refuses files that the upstream repositories cannot use."""

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
from siamese_detr.convert import ConversionError, convert_checkpoint
from siamese_detr.convert.compat import upstream_blockers

TARGET = {"vanilla": "detr", "conditional": "conditional-detr", "deformable": "deformable-detr"}


def _ckpt(variant: str, depth: int = 50, hidden: int = 256, levels: int = 1) -> dict:
    """A pretraining checkpoint of the given shape (weights of a real task, tiny otherwise)."""
    from siamese_detr.methods.siamese.task import build_siamese_task

    model = ModelConfig(variant=variant, backbone=BackboneConfig(depth=depth, freeze="all"),
                        hidden_dim=hidden, nheads=4, enc_layers=1, dec_layers=1,
                        dim_feedforward=32, num_queries=4, num_feature_levels=levels,
                        enc_n_points=1, dec_n_points=1)
    cfg = RunConfig(task="pretrain", model=model,
                    pretrain=PretrainConfig(siamese=SiameseOptions(num_regions=2)))
    torch.manual_seed(0)
    task = build_siamese_task(cfg)
    return {"model": task.state_dict(), "config": to_dict(cfg), "kind": "pretrain", "step": 1}


# (variant, depth, hidden, levels, words the refusal must contain)
REFUSED = [
    ("deformable", 50, 64, 2, ["num_feature_levels=2", "input_proj"]),
    ("conditional", 18, 64, 1, ["hidden_dim=64", "hard-codes 256", "fail in forward"]),
    ("deformable", 18, 64, 1, ["ResNet-18", "number of channels are hard coded"]),
    ("deformable", 34, 64, 4, ["ResNet-34"]),
]


@pytest.mark.parametrize("variant,depth,hidden,levels,words", REFUSED)
def test_refused_with_the_reason(variant, depth, hidden, levels, words) -> None:
    ckpt = _ckpt(variant, depth, hidden, levels)
    target = TARGET[variant]
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(ckpt, target)
    msg = str(err.value)
    assert msg.startswith(f"upstream {target} cannot use this checkpoint: ")
    assert all(w in msg for w in words), msg
    assert "--own-code-only" in msg and "\n" not in msg
    # with the explicit flag it converts and the report says so
    state, report = convert_checkpoint(ckpt, target, own_code_only=True)
    assert report.ok and state and report.blockers
    assert "FOR SIAMESE-DETR'S OWN CODE ONLY" in report.summary()


@pytest.mark.parametrize("variant,depth,hidden,levels", [
    ("deformable", 50, 64, 1), ("deformable", 50, 64, 3), ("deformable", 50, 64, 4),
    ("conditional", 50, 256, 1), ("vanilla", 18, 64, 1), ("conditional", 34, 256, 1),
])
def test_configurations_upstream_builds_are_not_refused(variant, depth, hidden, levels) -> None:
    config = {"model": {"variant": variant, "backbone": {"depth": depth}, "hidden_dim": hidden,
                        "num_feature_levels": levels}}
    assert upstream_blockers(config, TARGET[variant]) == []


def test_detr_resnet18_converts_with_the_upstream_arguments(tmp_path: Path, capsys) -> None:
    from siamese_detr.cli.main import main

    ckpt = _ckpt("vanilla", 18, 64)
    state, report = convert_checkpoint(ckpt, "detr")
    assert report.ok and not report.blockers
    assert report.upstream_args == ("--backbone resnet18 --hidden_dim 64 --nheads 4 "
                                    "--enc_layers 1 --dec_layers 1 --dim_feedforward 32 "
                                    "--num_queries 4")
    assert state["input_proj.weight"].shape == (64, 512, 1, 1)  # upstream resnet18 width
    torch.save(ckpt, tmp_path / "last.pt")
    assert main(["convert", "--checkpoint", str(tmp_path / "last.pt"), "--to", "detr",
                 "--out", str(tmp_path / "detr.pth")]) == 0
    assert "upstream model arguments: --backbone resnet18 --hidden_dim 64" in (
        capsys.readouterr().out)


def test_cli_refuses_then_writes_a_marked_file_with_the_flag(tmp_path: Path, capsys) -> None:
    from siamese_detr.cli.main import main

    src = tmp_path / "last.pt"
    torch.save(_ckpt("deformable", 50, 64, 2), src)
    out = tmp_path / "deformable.pth"
    args = ["convert", "--checkpoint", str(src), "--to", "deformable-detr", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "num_feature_levels=2" in err and "--own-code-only" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(args + ["--own-code-only"]) == 0
    printed = capsys.readouterr().out
    assert "own code only" in printed
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    assert set(loaded) == {"model", "note"}
    assert loaded["note"].startswith("for siamese-detr's own code only: upstream deformable-detr")
