"""The README's main job at its smallest setting: files exist, AP numbers come from the
evaluator and are finite."""

import json
import math

from siamese_detr.cli.main import main


def test_demo_smallest_setting_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.3"]) == 0
    report = (out / "report.md").read_text()
    for name in ("proposals", "views", "pretrain_loss", "finetune_loss", "predictions"):
        png = out / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in report
    assert "toy-scale run" in report
    table = json.loads((out / "results.json").read_text())
    for run in ("scratch", "siamese"):
        evaluator = json.loads((out / "runs" / f"finetune_{run}" / "eval_metrics.json").read_text())
        assert table[run] == evaluator
        assert all(math.isfinite(v) for v in evaluator.values())
        assert 0.0 <= evaluator["coco/AP"] <= 1.0
        assert f"{100 * evaluator['coco/AP']:.1f}" in report
    # the pretraining checkpoint initialised the second fine-tuning run
    ft_log = (out / "demo.log").read_text()
    assert "init from" in ft_log and "pretrain/last.pt" in ft_log
    # a second run skips every finished stage and reports the same numbers
    stamp = (out / "runs" / "pretrain" / "last.pt").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--minutes", "0.3"]) == 0
    assert (out / "runs" / "pretrain" / "last.pt").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text()) == table
