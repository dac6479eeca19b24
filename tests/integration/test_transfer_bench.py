"""bench/transfer.py end to end at smoke scale: every run, the table, the plot, the configs,
and a second call that re-runs nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_budget_end_to_end_and_resumable(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_transfer_e2e",
                                                  ROOT / "bench" / "transfer.py")
    assert spec is not None and spec.loader is not None
    transfer = importlib.util.module_from_spec(spec)
    sys.modules["bench_transfer_e2e"] = transfer
    spec.loader.exec_module(transfer)
    argv = ["--out", str(tmp_path), "--methods", "siamese,updetr,detreg", "--n-train", "4",
            "--n-val", "4", "--n-unlabeled", "8", "--backbone-steps", "2",
            "--pretrain-iters", "2", "--finetune-iters", "2", "--eval-every", "1",
            "--finetune-seeds", "0", "1", "--jobs", "2"]
    transfer.main(argv)
    table = (tmp_path / "table.md").read_text()
    assert "| from scratch |" in table and "| DETReg |" in table and "| Siamese DETR |" in table
    if "tiny/deformable/updetr" not in transfer.PRESETS:
        assert "| UP-DETR | skipped:" in table
    assert (tmp_path / "ap_vs_step.png").stat().st_size > 0
    configs = sorted(p.name for p in (tmp_path / "configs").glob("*.yaml"))
    assert "pre_detreg_s0.yaml" in configs and "ft_scratch_f1.yaml" in configs
    finals = sorted((tmp_path / "runs").glob("ft_*/final_metrics.json"))
    stamps = {p: p.stat().st_mtime_ns for p in finals}
    assert len(finals) >= 6
    curve = transfer.ap_curve(tmp_path / "runs" / "ft_detreg_p0_f0")
    assert [s for s, _ in curve] == [1, 2]
    transfer.main(argv)  # everything finished: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in finals} == stamps
