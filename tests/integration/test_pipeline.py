"""End to end on tiny data: exact resume of fine-tuning and pretraining, --init from a
pretraining checkpoint, `evaluate` reproducing the in-run evaluation."""

import json
import shutil

import pytest
import torch

from siamese_detr.cli.main import main
from siamese_detr.engine.checkpoint import load_checkpoint
from siamese_detr.engine.logging import read_jsonl

from .conftest import finetune_overrides, pretrain_overrides


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _assert_same_weights(a, b):
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_resume_n_plus_n_equals_2n(toy_data, tmp_path, command):
    make = finetune_overrides if command == "finetune" else pretrain_overrides
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([command, *make(toy_data, straight, iters=4)]) == 0
    # first half: stop after 2 iterations, keep its checkpoint, then resume to 4
    assert main([command, *make(toy_data, split, iters=2)]) == 0
    assert load_checkpoint(split / "last.pt")["step"] == 2
    assert main([command, *make(toy_data, split, iters=4), "--resume"]) == 0
    assert load_checkpoint(split / "last.pt")["step"] == 4
    _assert_same_weights(straight / "last.pt", split / "last.pt")
    assert _losses(split) == _losses(straight)


def test_init_from_pretraining_and_evaluate_cli(toy_data, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", *pretrain_overrides(toy_data, pre, iters=2)]) == 0
    ft = tmp_path / "ft"
    assert main(["finetune", *finetune_overrides(toy_data, ft, iters=2),
                 "--init", str(pre / "last.pt")]) == 0
    pre_sd = load_checkpoint(pre / "last.pt")["model"]
    log = (ft / "log.txt").read_text()
    assert "init from" in log and "class_embed.weight" in log
    # the transformer started from the pretrained weights (the class head did not)
    in_run = json.loads((ft / "eval_metrics.json").read_text())
    capsys.readouterr()
    preds = tmp_path / "preds.json"
    assert main(["evaluate", "--checkpoint", str(ft / "last.pt"),
                 "--predictions", str(preds)]) == 0
    out = capsys.readouterr().out
    assert f"{in_run['coco/AP']:.4f}" in out and "AP@[.5:.95]" in out
    assert json.loads(preds.read_text()) == json.loads((ft / "predictions.json").read_text())
    assert any(k.startswith("detector.transformer.") for k in pre_sd)


def test_init_changes_the_starting_point(toy_data, tmp_path):
    """Zero fine-tuning steps are not allowed, so compare one step with a tiny lr."""
    pre = tmp_path / "pre"
    assert main(["pretrain", *pretrain_overrides(toy_data, pre, iters=2)]) == 0
    ft = tmp_path / "ft"
    assert main(["finetune", *finetune_overrides(toy_data, ft, iters=1), "optim.lr=1e-12",
                 "optim.lr_backbone=1e-12", "optim.lr_drops=", "--init",
                 str(pre / "last.pt")]) == 0
    a = load_checkpoint(pre / "last.pt")["model"]
    b = load_checkpoint(ft / "last.pt")["model"]
    key = "detector.transformer.decoder.layers.0.ca_qpos_sine_proj.weight"
    assert torch.allclose(a[key], b[key], atol=1e-6)
    assert not torch.equal(a["detector.class_embed.weight"].flatten()[:2],
                           b["detector.class_embed.weight"].flatten()[:2])


def test_bad_init_is_one_line_error(toy_data, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["finetune", *finetune_overrides(toy_data, tmp_path / "x", iters=1),
                 "--init", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("siamese-detr finetune: error: checkpoint") and "bad.pt" in err[-1]
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
