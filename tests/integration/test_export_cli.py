"""End to end: a fine-tuning run stores its category names, `export --to hf` turns them into
id2label, and `finetune --init` starts from the exported transformers directory."""

import json

import pytest

from siamese_detr.cli.main import main
from siamese_detr.engine.checkpoint import load_checkpoint

from .conftest import finetune_overrides


def test_finetune_export_hf_and_init_from_it(toy_data, tmp_path, capsys):
    pytest.importorskip("transformers")
    ft = tmp_path / "ft"
    assert main(["finetune", *finetune_overrides(toy_data, ft, iters=1)]) == 0
    ckpt = load_checkpoint(ft / "last.pt")
    gt = json.loads(toy_data["det"].train_ann.read_text())["categories"]
    assert ckpt["categories"] == [{"id": c["id"], "name": c["name"]} for c in gt]
    capsys.readouterr()
    assert main(["export", str(ft / "last.pt"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "ConditionalDetrForObjectDetection" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for c in gt:
        assert config["id2label"][str(c["id"])] == c["name"]
    again = tmp_path / "again"
    assert main(["finetune", *finetune_overrides(toy_data, again, iters=1),
                 "--init", str(tmp_path / "hf")]) == 0
    log = (again / "log.txt").read_text()
    assert "init from" in log and "missing 0" in log and "unexpected 0" in log
