"""demo.jobs.run_job: when a run counts as done, and what a failed one says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from siamese_detr.demo import jobs
from siamese_detr.errors import UserError
from siamese_detr.presets import get_preset


def _cfg(tmp_path: Path):
    from dataclasses import replace

    return replace(get_preset("tiny/deformable/siamese"), output_dir=str(tmp_path / "runs" / "r"))


def _fake_call(rc: int, writes: str | None, calls: list):
    def call(cmd, stdout=None, stderr=None, env=None):
        calls.append((cmd, env))
        run_dir = Path(cmd[cmd.index("--config") + 1]).parent.parent / "runs" / "r"
        run_dir.mkdir(parents=True, exist_ok=True)
        if writes:
            (run_dir / writes).write_text("{}")
        return rc
    return call


def test_marker_written_by_the_run_or_here(tmp_path, monkeypatch) -> None:
    calls: list = []
    configs = tmp_path / "configs"
    # a fine-tuning run writes its own marker
    monkeypatch.setattr(subprocess, "call", _fake_call(0, "final_metrics.json", calls))
    run_dir = jobs.run_job("finetune", _cfg(tmp_path), "final_metrics.json", configs)
    assert (run_dir / "final_metrics.json").is_file()
    assert calls[0][1]["OMP_NUM_THREADS"] == "1" and "--overwrite" in calls[0][0]
    # done: not run again
    jobs.run_job("finetune", _cfg(tmp_path), "final_metrics.json", configs)
    assert len(calls) == 1
    # a pretraining run writes none: mark_done writes it after exit code 0
    monkeypatch.setattr(subprocess, "call", _fake_call(0, None, calls))
    run_dir = jobs.run_job("pretrain", _cfg(tmp_path), "done", configs, mark_done=True)
    assert (run_dir / "done").is_file() and len(calls) == 2


@pytest.mark.parametrize(("rc", "mark"), [(0, False), (3, True)])
def test_unfinished_run_is_a_user_error_naming_its_log(tmp_path, monkeypatch, rc, mark) -> None:
    monkeypatch.setattr(subprocess, "call", _fake_call(rc, None, []))
    with pytest.raises(UserError, match=rf"exit code {rc}.*r\.log"):
        jobs.run_job("pretrain", _cfg(tmp_path), "done", tmp_path / "configs", mark_done=mark)
    assert not (tmp_path / "runs" / "r" / "done").exists()
