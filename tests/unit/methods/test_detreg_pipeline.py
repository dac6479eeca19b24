"""DETReg through the CLI: exact resume, --init fine-tuning, conversion to upstream keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.cli.main import main
from siamese_detr.engine.checkpoint import load_checkpoint
from siamese_detr.engine.logging import read_jsonl
from siamese_detr.proposals.store import StoreWriter


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detreg")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    writer = StoreWriter(root / "store", chunk_size=4)
    for i in range(6):
        arr = rng.integers(0, 255, (56, 72, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        x0, y0 = rng.integers(0, 40, 8), rng.integers(0, 30, 8)
        boxes = np.stack([x0, y0, x0 + 16 + i, y0 + 20], 1).astype(np.float32)
        writer.add(f"{i}.png", boxes, np.arange(8, 0, -1, dtype=np.float32), (56, 72))
    writer.close()
    return root


def _args(root: Path, out: Path, iters: int, variant: str = "conditional") -> list[str]:
    return [
        "--preset", f"tiny/{variant}/detreg", "--out", str(out),
        f"pretrain.images={root / 'images'}", f"pretrain.proposals.store={root / 'store'}",
        "pretrain.batch_size=2", "pretrain.detreg.base_scales=64",
        "pretrain.detreg.crop_scales=64", "pretrain.detreg.crop_range=48,64",
        "pretrain.detreg.crop_size=32", "pretrain.detreg.max_proposals=6",
        "model.enc_layers=1", f"optim.length={iters}", f"optim.lr_drops={iters}",
        "engine.log_every=1", "engine.ckpt_every=1", "engine.progress=false",
        "engine.keep_checkpoints=0",
    ]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_resume_n_plus_n_equals_2n(unlabeled: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["pretrain", *_args(unlabeled, straight, 2)]) == 0
    assert main(["pretrain", *_args(unlabeled, split, 1)]) == 0
    assert load_checkpoint(split / "last.pt")["step"] == 1
    assert main(["pretrain", *_args(unlabeled, split, 2), "--resume"]) == 0
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert b["step"] == 2 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _losses(split) == _losses(straight)
    assert any(k.startswith("feature_embed.") for k in a["model"])
    assert a["config"]["pretrain"]["method"] == "detreg"


def test_checkpoint_converts_and_initialises_a_detector(unlabeled: Path, tmp_path: Path
                                                        ) -> None:
    from siamese_detr.convert import convert_checkpoint, to_internal
    from siamese_detr.eval.loading import init_from_checkpoint, load_detector
    from siamese_detr.models.detector import build_detector
    from siamese_detr.presets import get_preset

    pre = tmp_path / "pre"
    assert main(["pretrain", *_args(unlabeled, pre, 1, "deformable")]) == 0
    ckpt = load_checkpoint(pre / "last.pt")
    state, report = convert_checkpoint(ckpt, "deformable-detr", own_code_only=True)  # R18
    assert report.ok
    dropped = {k for k, _ in report.dropped}
    assert any(k.startswith("feature_embed.") for k in dropped)
    assert not any(k.startswith(("feature_embed", "class_embed")) for k in state)
    # fine-tuning init: everything but the class head comes from the checkpoint
    cfg = get_preset("tiny/deformable/finetune")
    cfg_model = cfg.model.__class__(**{**cfg.model.__dict__, "enc_layers": 1})
    det = build_detector(cfg_model, num_logits=3)
    rep = init_from_checkpoint(det, pre / "last.pt", "deformable")
    assert rep.skipped_shape and all("class_embed" in k for k in rep.skipped_shape)
    ours = det.state_dict()
    for k, v in to_internal(state).items():
        assert torch.equal(ours[k], v), k
    # the pretraining checkpoint itself loads for inference with its 1-logit sigmoid head
    loaded = load_detector(pre / "last.pt")
    assert loaded.kind == "pretrain" and loaded.missing == []
    assert loaded.detector.head_activation == "sigmoid"
    assert loaded.detector.class_embed[0].out_features == 1


def test_missing_store_is_one_line_error(unlabeled: Path, tmp_path: Path, capsys) -> None:
    args = _args(unlabeled, tmp_path / "x", 1)
    args = [a if not a.startswith("pretrain.proposals.store=") else
            f"pretrain.proposals.store={tmp_path / 'nowhere'}" for a in args]
    assert main(["pretrain", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "nowhere does not exist" in err[0]
    assert "selective-search" in err[0]


def test_task_object_builds_data_and_module(unlabeled: Path) -> None:
    from siamese_detr.configio import apply_overrides
    from siamese_detr.data.loaders import build_detection_loader
    from siamese_detr.methods.detreg.task import DETReg, DETRegTask
    from siamese_detr.presets import get_preset

    overrides = [a for a in _args(unlabeled, unlabeled / "unused", 1) if "=" in a]
    task = DETRegTask(apply_overrides(get_preset("tiny/vanilla/detreg"), overrides))
    assert task.kind == "pretrain" and task.batch_size == 2 and task.sync_bn is False
    dataset = task.build_dataset()
    assert len(dataset) == 6
    module = task.build_module()
    assert isinstance(module, DETReg) and task.make_evaluator(unlabeled) is None
    batch = next(build_detection_loader(dataset, task.batch_size, 0, 0, collate_fn=task.collate))
    assert len(batch) == 2 and batch.crops is not None
    assert all(len(t) <= 6 for t in batch.targets)
    out = module(batch)
    assert torch.isfinite(out.total) and "loss_embedding" in out.terms
