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
    for arm in ("scratch", "siamese"):
        # two fine-tuning seeds per arm at this setting, each its own run folder and process
        assert sorted(table[arm]["runs"]) == ["0", "1"]
        aps = []
        for seed in (0, 1):
            run_dir = out / "runs" / f"finetune_{arm}_seed{seed}"
            evaluator = json.loads((run_dir / "eval_metrics.json").read_text())
            assert table[arm]["runs"][str(seed)] == evaluator
            assert all(math.isfinite(v) for v in evaluator.values())
            assert 0.0 <= evaluator["coco/AP"] <= 1.0
            assert f"{100 * evaluator['coco/AP']:.1f}" in report
            aps.append(evaluator["coco/AP"])
            cfg = (out / "runs" / "configs" / f"{run_dir.name}.yaml").read_text()
            assert f"seed: {seed}" in cfg
        # the table's mean and sample sd are those of the per-seed numbers
        assert math.isclose(table[arm]["mean"]["coco/AP"], sum(aps) / 2)
        assert math.isclose(table[arm]["sd"]["coco/AP"], abs(aps[0] - aps[1]) / 2 ** 0.5)
    gain = table["gain"]["coco/AP"]
    assert gain["pairs"] == 2 and math.isclose(
        gain["mean"], table["siamese"]["mean"]["coco/AP"] - table["scratch"]["mean"]["coco/AP"],
        abs_tol=1e-12)
    # the pretraining checkpoint initialised the Siamese arm, not the scratch arm
    for seed in (0, 1):
        siamese_log = (out / "runs" / f"finetune_siamese_seed{seed}.log").read_text()
        assert "init from" in siamese_log and "pretrain/last.pt" in siamese_log
        assert "init from" not in (out / "runs" / f"finetune_scratch_seed{seed}.log").read_text()
    # a second run skips every finished stage and reports the same numbers
    stamp = (out / "runs" / "pretrain" / "last.pt").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--minutes", "0.3"]) == 0
    assert (out / "runs" / "pretrain" / "last.pt").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text()) == table
    out_text = capsys.readouterr().out
    assert "mean ± sd over 2 fine-tuning seeds" in out_text
    assert f"{100 * table['siamese']['mean']['coco/AP']:5.1f} ± " in out_text
