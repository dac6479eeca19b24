"""UP-DETR through `siamese-detr pretrain`: exact resume, checkpoint fine-tunes with --init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.cli.main import main
from siamese_detr.engine.checkpoint import load_checkpoint
from siamese_detr.engine.logging import read_jsonl


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("updetr_images")
    rng = np.random.default_rng(0)
    for i in range(6):
        h, w = (56, 72) if i % 2 else (64, 64)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _args(images, out, iters: int, variant: str = "conditional") -> list[str]:
    return [
        "pretrain", "--preset", f"tiny/{variant}/updetr", "--out", str(out),
        f"pretrain.images={images}", "pretrain.batch_size=2", "pretrain.updetr.patch_size=32",
        "pretrain.updetr.base_scales=48,56", "pretrain.updetr.base_max_size=80",
        "model.hidden_dim=32", "model.enc_layers=1", "model.dim_feedforward=64",
        "model.dropout=0.1",  # dropout and the patch mask both draw from the resumed RNG
        f"optim.length={iters}", f"optim.lr_drops={iters}", "engine.log_every=1",
        "engine.ckpt_every=2", "engine.progress=false", "engine.keep_checkpoints=0",
    ]


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_resume_n_plus_n_equals_2n(images, tmp_path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_args(images, straight, 4)) == 0
    assert main(_args(images, split, 2)) == 0
    assert load_checkpoint(split / "last.pt")["step"] == 2
    assert main([*_args(images, split, 4), "--resume"]) == 0
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert b["step"] == 4 and a["model"].keys() == b["model"].keys()
    assert any(k.startswith("patch2query.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    losses = _losses(straight)
    assert len(losses) == 4 and all(np.isfinite(losses)) and _losses(split) == losses
    assert a["config"]["pretrain"]["method"] == "updetr"
