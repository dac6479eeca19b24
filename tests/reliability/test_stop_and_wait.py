"""Items 1, 3 and 4: no endless wait for data, no silent overwrite of a run, a stopped run
says it stopped and how to resume it. The commands run as subprocesses; each ends on its own
exit (the time-out is only a safety net)."""

from __future__ import annotations

import pytest
import torch

from .conftest import last_line, pretrain_args, run_cli, sigterm_when, start_cli


def test_no_usable_sample_stops_with_counted_reasons(unlabeled, tmp_path):
    """Item 1: every proposal filtered away -> bounded wait, one line, non-zero exit."""
    out = tmp_path / "run"
    proc = run_cli(*pretrain_args(unlabeled, out, 2, "pretrain.proposals.min_size=100000",
                                  "engine.max_empty_batches=20"))
    line = last_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert line.startswith("siamese-detr pretrain: error: no usable sample in 20 consecutive "
                           "batches"), line
    # 20 empty batches of 2 samples, all for the same counted reason
    assert "no proposal left after pretrain.proposals filters (top_k, min_size, min_score): 40" \
        in line
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigterm_is_obeyed_while_waiting_for_data(unlabeled, tmp_path):
    """Item 1: the stop flag is checked in the wait (the wait itself is made endless)."""
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = start_cli(*pretrain_args(unlabeled, out, 2, "pretrain.proposals.min_size=100000",
                                    "engine.max_empty_batches=1000000000"), log=log)
    rc = sigterm_when(lambda: "empty proposal list" in log.read_text(errors="replace"), proc,
                      "data warning")
    text = log.read_text(errors="replace")
    assert rc == 75, text[-2000:]
    line = last_line(text)
    assert line.startswith("siamese-detr pretrain: stopped at step 0 of 2 (stop signal); "
                           f"checkpoint saved: {out / 'last.pt'}; resume with: "), line
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 0


@pytest.mark.slow
def test_sigterm_stop_is_not_reported_as_finished(unlabeled, tmp_path):
    """Item 4: 'stopped at step k of n; checkpoint saved; resume with: <command>', exit 75,
    and the printed command resumes the run."""
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    args = pretrain_args(unlabeled, out, 500)
    proc = start_cli(*args, log=log)
    rc = sigterm_when(lambda: (out / "metrics.jsonl").is_file(), proc, "first logged step")
    text = log.read_text(errors="replace")
    assert rc == 75, text[-2000:]
    assert "final losses" not in text and "fine-tune with --init" not in text
    line = last_line(text)
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 1 <= step < 500
    head = f"siamese-detr pretrain: stopped at step {step} of 500 (stop signal); checkpoint " \
           f"saved: {out / 'last.pt'}; resume with: "
    assert line.startswith(head), line
    command = line[len(head):]
    assert command.endswith(" --resume") and " pretrain --preset tiny/vanilla/siamese " in command


def test_rerun_without_resume_is_refused(tmp_path, capsys):
    """Item 3: a folder holding a run is not overwritten silently."""
    from siamese_detr.cli.main import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"previous run")
    args = ["pretrain", "--preset", "tiny/vanilla/siamese", "--out", str(out),
            f"pretrain.images={tmp_path / 'nowhere'}"]
    assert main(args) == 2
    line = last_line(capsys.readouterr().err)
    assert line == (f"siamese-detr pretrain: error: run folder {out} already holds a run "
                    "(last.pt); add --resume to continue it, --overwrite to start again from "
                    "step 0, or choose another --out")
    assert (out / "last.pt").read_bytes() == b"previous run"
    assert main(["finetune", "--out", str(out), "data.train_ann=x.json"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # --overwrite: the old run is removed, then the (here: bad) config is reported
    assert main([*args, "--overwrite"]) == 2
    assert not (out / "last.pt").exists()
    assert "already holds a run" not in capsys.readouterr().err


def test_interrupt_names_the_resume_command(tmp_path, capsys, monkeypatch):
    """Item 3: Ctrl-C says where the checkpoint is and the exact command that resumes."""
    import siamese_detr.cli.pretrain as cli_pretrain
    from siamese_detr.cli.main import main

    out = tmp_path / "run"

    def interrupted(cfg, resume, overwrite=False):
        out.mkdir(exist_ok=True)
        (out / "last.pt").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_pretrain, "run_training", interrupted)
    monkeypatch.setattr("sys.argv", ["/x/bin/siamese-detr"])
    assert main(["pretrain", "--out", str(out), "optim.length=3", "optim.lr_drops=[2]"]) == 130
    line = last_line(capsys.readouterr().err)
    assert line == (f"siamese-detr pretrain: interrupted; the last periodic checkpoint "
                    f"{out / 'last.pt'} is kept; resume with: siamese-detr pretrain --out "
                    f"{out} optim.length=3 'optim.lr_drops=[2]' --resume")


def test_python_api_signals_a_stopped_run(monkeypatch):
    """Item 4 (library side): ``runner.run`` raises RunStopped instead of returning as if
    finished; the CLI maps it to exit 75."""
    from siamese_detr.cli.main import main
    from siamese_detr.errors import EXIT_STOPPED, RunStopped

    assert EXIT_STOPPED == 75

    def stopped(cfg, resume, overwrite=False):
        raise RunStopped(3, 10, "runs/x/last.pt", "stop signal")

    import siamese_detr.cli.finetune as cli_finetune

    monkeypatch.setattr(cli_finetune, "run_training", stopped)
    assert main(["finetune", "optim.length=3"]) == 75


