"""Item 9: the smaller faults, one test each."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch

from siamese_detr.cli.main import main

from .conftest import last_line


@pytest.fixture
def store(tmp_path):
    from siamese_detr.proposals.store import ImageProposals, StoreWriter

    writer = StoreWriter(tmp_path / "store", chunk_size=4)
    for i in range(3):
        writer.add(f"im{i}.png", np.array([[0, 0, 5, 5]], np.float32), np.ones(1, np.float32),
                   (10, 10))
    writer.close()
    assert ImageProposals
    return tmp_path / "store"


def test_proposals_stats_on_a_truncated_array_is_one_line(store, capsys):
    boxes = next(store.glob("parts/*/boxes.npy"))
    boxes.write_bytes(boxes.read_bytes()[:20])
    assert main(["proposals", "stats", str(store)]) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"siamese-detr proposals: error: proposal store {store} is damaged")


def test_proposals_stats_on_broken_meta_is_one_line(store, capsys):
    (store / "meta.json").write_text('{"format": "siamese-detr-prop')
    assert main(["proposals", "stats", str(store)]) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"siamese-detr proposals: error: {store / 'meta.json'} is damaged "
                           "(not valid JSON")


def test_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from siamese_detr.engine.checkpoint import save_checkpoint
    from siamese_detr.errors import UserError

    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def full(obj, handle, *a, **k):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed "
                           "writing file data/0") from OSError(errno.ENOSPC, "No space left")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"no space left on the device writing .*last.pt; the "
                                        r"previous last.pt \(if any\) is intact"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_files_follow_the_umask(tmp_path):
    from siamese_detr.files import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o644


def test_resume_removes_temporaries_and_replayed_metrics(tmp_path):
    from siamese_detr.engine.setup import tidy_resumed_run

    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    tidy_resumed_run(tmp_path, 2)
    assert not (tmp_path / ".last.pt.abc123.tmp").exists()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.parametrize("key", ["data.batch_size=0", "pretrain.batch_size=0"])
def test_batch_size_zero_is_a_config_error(key, tmp_path, capsys):
    command = "finetune" if key.startswith("data") else "pretrain"
    assert main([command, "--out", str(tmp_path / "r"), key]) == 2
    line = last_line(capsys.readouterr().err)
    assert line == f"siamese-detr {command}: error: {key}: must be >= 1 (images per process)"


def test_shorter_run_needs_one_override():
    from siamese_detr.configio import apply_overrides
    from siamese_detr.presets import get_preset

    cfg = apply_overrides(get_preset("tiny/conditional/finetune"), ["optim.length=10"])
    assert (cfg.optim.length, cfg.optim.lr_drops) == (10, (8,))  # 240/300 of the run
    cfg = apply_overrides(get_preset("tiny/conditional/finetune"),
                          ["optim.length=10", "optim.lr_drops=[3]"])
    assert cfg.optim.lr_drops == (3,)


def test_voc_metrics_print_na_like_coco():
    from siamese_detr.eval.detection import describe_metrics

    text = describe_metrics({"coco/AP": -1.0, "voc07/AP50": -1.0})
    assert "-1.0000" not in text
    assert "voc07/AP50 = n/a (no ground truth)" in text


def test_views_picture_draws_no_zero_area_region(tmp_path):
    from PIL import Image

    from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD
    from siamese_detr.methods.siamese.data import _palette, draw_views
    from siamese_detr.methods.siamese.views import SiameseSample

    grey = ((torch.full((3, 40, 40), 0.5) - torch.tensor(IMAGENET_MEAN)[:, None, None])
            / torch.tensor(IMAGENET_STD)[:, None, None])
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [10.0, 2.0, 10.0, 35.0]])  # 2nd: zero width
    sample = SiameseSample(grey, grey.clone(), boxes, boxes.clone(), None, None, "x")
    arr = np.asarray(Image.open(draw_views(sample, tmp_path / "v.png", gap=0)))
    colour = np.array(_palette(2)[1])
    assert not (arr == colour).all(-1).any()  # region 1 (zero area) is not drawn as a line
    assert (arr == np.array(_palette(2)[0])).all(-1).any()


def test_demo_backbone_warmup_shows_progress(tmp_path, caplog):
    import logging

    from siamese_detr.demo.photo_backbone import train_photo_backbone

    with caplog.at_level(logging.INFO, logger="siamese_detr"):
        train_photo_backbone(tmp_path / "b.pt", steps=2, batch_size=2, crop_size=32)
    lines = [r.getMessage() for r in caplog.records if "backbone warm-up" in r.getMessage()]
    assert [m.split(",")[0] for m in lines] == ["backbone warm-up: step 1/2",
                                                "backbone warm-up: step 2/2"]
