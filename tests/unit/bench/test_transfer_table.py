"""bench/transfer.py: the table arithmetic (means, sample sd, paired differences, wins), the
AP curve reader and the run-time estimate, on hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def transfer(load_bench):
    return load_bench("transfer")


def _m(ap: float, ap50: float = 0.5, ap75: float = 0.1) -> dict[str, float]:
    return {"coco/AP": ap, "coco/AP50": ap50, "coco/AP75": ap75}


RESULTS = {
    "scratch": {(None, 0): _m(0.20), (None, 1): _m(0.30)},
    "detreg": {(0, 0): _m(0.25), (0, 1): _m(0.28), (1, 0): _m(0.26), (1, 1): _m(0.35)},
}


def test_mean_sd_is_sample_sd(transfer) -> None:
    assert transfer.mean_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert transfer.mean_sd([7.0]) == (7.0, 0.0)
    assert all(math.isnan(v) for v in transfer.mean_sd([]))


def test_paired_differences_use_the_same_finetune_seed(transfer) -> None:
    diffs = transfer.paired_differences(RESULTS["detreg"], RESULTS["scratch"])
    # sorted by (pretrain seed, fine-tune seed): (0,0), (0,1), (1,0), (1,1)
    assert diffs == pytest.approx([0.05, -0.02, 0.06, 0.05])
    # a run without a scratch partner is left out
    only0 = {(None, 0): _m(0.20)}
    assert transfer.paired_differences(RESULTS["detreg"], only0) == pytest.approx([0.05, 0.06])


def test_summary_rows_and_table(transfer) -> None:
    rows = transfer.summary_rows(RESULTS)
    assert [r.init for r in rows] == ["scratch", "detreg"]
    scratch, detreg = rows
    assert scratch.stats["coco/AP"] == pytest.approx((25.0, math.sqrt(50.0)))
    assert scratch.diff is None and scratch.n == 2
    assert detreg.stats["coco/AP"][0] == pytest.approx(28.5)
    assert detreg.diff is not None
    assert detreg.diff[0] == pytest.approx(3.5)
    assert detreg.diff[1] == pytest.approx(transfer.mean_sd([5.0, -2.0, 6.0, 5.0])[1])
    assert (detreg.wins, detreg.n_pairs) == (3, 4)
    table = transfer.markdown_table(rows, {"updetr": "no preset"}, RESULTS, "caption")
    assert "| from scratch | 25.0 ± 7.1 |" in table
    assert "| DETReg | 28.5 ± 4.5 |" in table and "| +3.5 ± 3.7 | 3/4 | 4 |" in table
    assert "| UP-DETR | skipped: no preset |" in table
    assert "| DETReg | 1 | 1 | 35.0 | 50.0 | 10.0 |" in table


def test_ap_curve_keeps_the_last_value_per_step(transfer, tmp_path: Path) -> None:
    lines = [{"step": 2, "loss": 1.0}, {"step": 2, "eval/coco/AP": 0.1},
             {"step": 4, "eval/coco/AP": 0.2}, {"step": 2, "eval/coco/AP": 0.15}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert transfer.ap_curve(tmp_path) == pytest.approx([(2, 15.0), (4, 20.0)])


def test_estimate_counts_steps(transfer) -> None:
    # nothing but data preparation
    assert transfer.estimate_minutes([], 1, 0, 100, 100, 1) == transfer.DATA_MINUTES
    one = transfer.estimate_minutes(["detreg"], 1, 1, 1000, 0, 0)
    ref = transfer.DATA_MINUTES + 1000 * transfer.STEP_COST["detreg"] * \
        transfer.SECONDS_PER_STEP / 60
    assert one == pytest.approx(ref)
    # the default budget with all three methods fits in an hour on 2 cores
    assert transfer.estimate_minutes(["siamese", "updetr", "detreg"], 1, 2, 2000, 600, 3) < 60
