"""bench/targets.py: issue 13's verdicts from bench results, on hand-made rows and on the
H100 results committed from session 3 (whose figures docs/benchmarks.md quotes)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
H100 = ROOT / "bench" / "results" / "2026-11-26-h100"
H100_S7 = ROOT / "bench" / "results" / "2026-11-26-h100-s7"


@pytest.fixture(scope="module")
def targets(load_bench):
    return load_bench("targets")


def _row(impl: str, dtype: str, ms: float, variant: str = "detr", batch: int = 2,
         images_per_s: float = 0.0) -> dict:
    return {"variant": variant, "dtype": dtype, "impl": impl, "ms_median": ms, "batch": batch,
            "size": [800, 1088], "images_per_s": images_per_s}


def _by_what(verdicts) -> dict[str, tuple[float, bool]]:
    return {v.what.split(", detr")[0]: (round(v.value, 4), v.passed) for v in verdicts}


def test_step_targets_on_hand_made_rows(targets):
    rows = [_row("hf", "fp32", 130.0), _row("ours", "fp32", 100.0),
            _row("hf", "bf16", 120.0), _row("ours", "bf16", 110.0),
            _row("ours_graphed", "fp32", 50.0), _row("ours_graphed", "bf16", 35.0),
            _row("pretrain", "fp32", 160.0), _row("pretrain_graphed", "fp32", 80.0)]
    got = _by_what(targets.step_targets(rows, "x.json"))
    assert got == {
        "HF / ours eager, fp32": (1.3, True),  # at the bound: passes
        "HF / ours fastest, fp32": (2.6, True),  # 130 / 50 (graphed)
        "HF / ours eager, bf16": (1.0909, False),
        "HF / ours fastest, bf16": (3.4286, True),
        "ours fp32 / bf16": (0.9091, False),
        "ours_graphed fp32 / bf16": (1.4286, True),
        "fastest fine-tuning fp32 / fastest bf16": (1.4286, True),  # 50 / 35
        "pretrain / ours, fp32": (1.6, False),
        "pretrain_graphed / ours_graphed, fp32": (1.6, False),
    }


def test_times_are_compared_within_one_file_only(targets):
    results = [("a.json", [_row("ours", "fp32", 100.0)]), ("b.json", [_row("hf", "fp32", 200.0)])]
    assert [v for name, rows in results for v in targets.step_targets(rows, name)] == []


def test_loader_lines_and_the_loader_target(targets):
    log = ("pretrain/paper                             16.4 samples/s per worker,   2.23 MB "
           "per sample | loader with 4 workers     53.6 samples/s\n"
           "pretrain/paper, augment on device         95.0 samples/s per worker,   1.24 MB "
           "per sample | loader with 4 workers    380.0 samples/s\n"
           "pretrain/paper, augment on device, batch copied to shm    90.0 samples/s per "
           "worker,   1.24 MB per sample | loader with 4 workers    370.0 samples/s\n"
           "finetune  142.4 samples/s per worker,   0.85 MB per sample\n")
    rates = targets.loader_rates(log)
    assert rates == [("pretrain/paper", 4, 53.6), ("pretrain/paper, augment on device", 4, 380.0),
                     ("pretrain/paper, augment on device, batch copied to shm", 4, 370.0)]
    rows = [_row("pretrain_aug", "fp32", 80.0, batch=8, images_per_s=100.0),
            _row("pretrain_aug_graphed", "fp32", 40.0, batch=8, images_per_s=200.0)]
    (verdict,) = targets.loader_targets(rates, rows)  # the fastest step is the demand
    assert verdict.value == pytest.approx(1.9) and not verdict.passed


def test_session3_h100_results_give_the_documented_verdicts(targets, capsys):
    """The committed H100 results reproduce docs/benchmarks.md's ratios: every fine-tuning step
    faster than transformers by 1.31-2.02x, eager bf16 slower than fp32 at batch 2, graphed
    bf16 1.35-1.48x graphed fp32, and the one pretraining ratio over 1.5 (Deformable DETR,
    fp32, batch 2 at 800x1088)."""
    assert targets.main([str(H100)]) == 0
    lines = capsys.readouterr().out.splitlines()
    hf = [float(line.rsplit(": ", 1)[1]) for line in lines if " hf " in line]
    assert len(hf) == 6 and min(hf) == pytest.approx(1.31, abs=0.005)
    assert max(hf) == pytest.approx(2.02, abs=0.005)
    assert all(line.startswith("PASS") for line in lines if " hf " in line)
    graphed = sorted(float(line.rsplit(": ", 1)[1]) for line in lines
                     if "ours_graphed fp32 / bf16" in line)
    assert graphed == pytest.approx([1.35, 1.48, 1.48], abs=0.005)
    misses = [line for line in lines if line.startswith("MISS") and " pretrain " in line[:15]]
    assert len(misses) == 1 and "deformable, batch 2 at 800x1088" in misses[0]
    assert "----  loader" in lines[-1]  # no loader log in that folder


def test_session7_h100_results_give_the_documented_verdicts(targets, capsys):
    """Session 7's H100 results (engine.cuda_graphs on a GPU for the first time), as
    docs/benchmarks.md quotes them: transformers slower in all 12 pairs (1.50-4.18x), graphed
    bf16 at least 1.3x graphed fp32 in 15 of 16 pairs (the miss: DETR pretraining, 1.27, where
    a second run gave 1.44), and the loader short at 4 workers but not at 12. The folder also
    holds bench_phases.py's JSONs (rows as a dict), which are not step results."""
    assert targets.main([str(H100_S7)]) == 0
    lines = capsys.readouterr().out.splitlines()
    hf = [float(line.rsplit(": ", 1)[1]) for line in lines if " hf " in line]
    assert len(hf) == 12 and all(line.startswith("PASS") for line in lines if " hf " in line)
    assert (min(hf), max(hf)) == pytest.approx((1.50, 4.18), abs=0.005)
    graphed = [line for line in lines if "_graphed fp32 / bf16" in line]
    misses = [line for line in graphed if line.startswith("MISS")]
    assert len(graphed) == 16 and len(misses) == 1 and misses[0].endswith(": 1.27")
    loader = [line for line in lines if " loader " in line]
    assert [line[:4] for line in loader] == ["MISS", "PASS"]
    assert "4 workers: 2.61" in loader[0] and "12 workers: 4.66" in loader[1]


def test_missing_input_is_one_line_and_exit_2(targets, tmp_path, capsys):
    assert targets.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err


def test_per_view_figures_pair_the_graphed_steps(targets):
    """The per-view figure (not a target): a graphed pretraining step over two encoded views
    per image against the graphed fine-tuning step of the same options and dtype."""
    rows = [_row("ours_graphed", "bf16", 26.0), _row("pretrain_graphed", "bf16", 49.4),
            _row("pretrain_aug_graphed", "bf16", 57.2), _row("ours_graphed", "fp32", 34.0),
            _row("ours_graphed_cl_fused", "bf16", 24.0),
            _row("pretrain_graphed_cl_fused", "bf16", 36.0),
            _row("pretrain_graphed_fused", "bf16", 40.0)]  # no fine-tuning pair: no line
    lines = targets.per_view(rows, "b8.json")
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["1.10", "0.95", "0.75"]
    assert lines[0].startswith("INFO  per-view pretrain_aug_graphed / 2 / ours_graphed, bf16")


def test_other_benches_rows_in_the_folder_are_skipped(targets, tmp_path):
    """A device call's folder holds other benches' JSON too (bench_deform_bwd.py: rows of
    launch settings; bench_phases.py: a dict): only bench_gpu.py's step rows count."""
    import json

    (tmp_path / "deform_sem.json").write_text(json.dumps(
        {"rows": [{"sem": "relaxed", "block_q": 64, "fwd_ms": 1.0, "bwd_ms": 2.0}]}))
    (tmp_path / "phases.json").write_text(json.dumps({"rows": {"ours": {"total_ms": 3.0}}}))
    (tmp_path / "b2.json").write_text(json.dumps(
        {"rows": [_row("hf", "fp32", 130.0), _row("ours", "fp32", 100.0)]}))
    results, _ = targets.collect([tmp_path])
    assert [(name, len(rows)) for name, rows in results] == [("b2.json", 2)]
    assert targets.main([str(tmp_path)]) == 0
