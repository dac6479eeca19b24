"""The engine on a toy task: schedules, exact resume, non-finite detection, checkpoints."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from siamese_detr.config import ConfigError, EngineConfig, OptimConfig
from siamese_detr.engine.checkpoint import load_checkpoint, save_checkpoint
from siamese_detr.engine.distributed import DistInfo
from siamese_detr.engine.logging import read_jsonl
from siamese_detr.engine.loop import NonFiniteLossError, Schedule, resume, train
from siamese_detr.engine.optim import build_optimizer, lr_factor, resolve_schedule
from siamese_detr.structures import LossOutput

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class ToyTask(nn.Module):
    """Linear regression with dropout, so RNG state matters for exact resume."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> LossOutput:
        x, y = batch
        pred = self.head(self.drop(self.backbone(x)))
        loss = ((pred.squeeze(-1) - y) ** 2).mean()
        return LossOutput(total=loss, terms={"loss_mse": (loss.item(), loss.item())})


def stream(position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    k = position
    while True:
        g = torch.Generator().manual_seed(k)
        x = torch.randn(8, 4, generator=g)
        yield x, x.sum(1)
        k += 1


def make(seed: int = 0):
    torch.manual_seed(seed)
    task = ToyTask()
    opt = build_optimizer(task, OptimConfig(lr=1e-2, lr_backbone=1e-3, unit="iter", length=10,
                                            lr_drops=(6,)))
    return task, opt


def run(task, opt, run_dir: Path, total: int, start=None, accum=1):
    eng = EngineConfig(log_every=1, ckpt_every=3, progress=False, accum_steps=accum)
    return train(task=task, batches=stream, optimizer=opt,
                 schedule=Schedule(total, (6,), 0.1, 0, 1.0), engine=eng, run_dir=run_dir,
                 dist_info=CPU, checkpoint_meta={"kind": "test", "config": {}}, start=start)


def test_lr_factor_and_schedule_resolution():
    assert [lr_factor(s, (3, 5), 0.1) for s in (0, 2, 3, 4, 5)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01])
    assert lr_factor(0, (), 0.1, warmup_iters=4) == pytest.approx(0.25)
    assert resolve_schedule(OptimConfig(length=50, lr_drops=(40,)), 100) == (5000, (4000,))
    assert resolve_schedule(OptimConfig(unit="iter", length=7, lr_drops=(5,)), 100) == (7, (5,))


def test_backbone_gets_its_own_lr():
    task, opt = make()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([1e-3, 1e-2])


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_n_plus_n_equals_2n(tmp_path, accum):
    task, opt = make()
    run(task, opt, tmp_path / "straight", 8, accum=accum)
    straight = {k: v.clone() for k, v in task.state_dict().items()}
    losses = [r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]

    task, opt = make()
    run(task, opt, tmp_path / "split", 4, accum=accum)
    task2, opt2 = make(seed=123)  # a fresh process: other init, other RNG
    st = resume(tmp_path / "split" / "last.pt", task2, opt2, None)
    assert st.step == 4 and st.data_position == 4 * accum
    run(task2, opt2, tmp_path / "split", 8, start=st, accum=accum)
    for k, v in task2.state_dict().items():
        assert torch.equal(v, straight[k]), k
    split_losses = [r["loss"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")]
    assert split_losses == losses


def test_lr_drop_is_applied(tmp_path):
    task, opt = make()
    run(task, opt, tmp_path, 8)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert lrs[5] == pytest.approx(1e-2) and lrs[6] == pytest.approx(1e-3)


def test_non_finite_loss_stops_with_terms(tmp_path):
    class Bad(ToyTask):
        def forward(self, batch):
            out = super().forward(batch)
            return LossOutput(total=out.total * float("nan"), terms={"loss_x": (1.0, 2.0)})

    task = Bad()
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="loss_x"):
        run(task, opt, tmp_path, 3)


def test_checkpoints_are_safe_and_rotated(tmp_path):
    task, opt = make()
    run(task, opt, tmp_path, 9)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 9 and ckpt["kind"] == "test"
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_3.pt", "step_6.pt"]


def test_code_carrying_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")
    save_checkpoint({"a": torch.ones(1)}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["a"], torch.ones(1))
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_loader_watch_warns_once_after_the_first_window():
    from siamese_detr.engine.loop import LoaderWatch

    watch = LoaderWatch("pretrain.num_workers=4")
    assert watch.message(0.09, 0.10, "1-20") is None  # start-up window: left out
    assert watch.message(0.02, 0.10, "21-40") is None  # 20 %: under a quarter
    msg = watch.message(0.03, 0.10, "41-60")
    assert msg is not None
    assert "30%" in msg and "30 of 100 ms" in msg and "steps 41-60" in msg
    assert "raise pretrain.num_workers=4" in msg and "CPU cores per training process" in msg
    assert watch.message(0.09, 0.10, "61-80") is None  # said once


class SlowTask(ToyTask):
    def forward(self, batch):
        import time

        time.sleep(0.02)
        return super().forward(batch)


def slow_stream(position: int):
    import time

    for batch in stream(position):
        time.sleep(0.02)
        yield batch


@pytest.mark.parametrize("slow", ["data", "model"])
def test_training_that_waits_for_data_says_so(slow, tmp_path, caplog):
    """A stream slower than the model gets one warning naming the setting to raise (data
    share about 50 %); a model slower than its stream gets none (share about 0)."""
    torch.manual_seed(0)
    task = SlowTask()  # 20 ms a step; the slow stream adds 20 ms a batch
    opt = build_optimizer(task, OptimConfig(lr=1e-2, lr_backbone=1e-3, unit="iter", length=9,
                                            lr_drops=()))
    eng = EngineConfig(log_every=3, ckpt_every=0, progress=False, keep_checkpoints=0)
    with caplog.at_level("WARNING"):
        train(task=task, batches=slow_stream if slow == "data" else stream, optimizer=opt,
              schedule=Schedule(9, (), 0.1, 0, 1.0), engine=eng, run_dir=tmp_path,
              dist_info=CPU, checkpoint_meta={"kind": "test", "config": {}},
              loader_hint="data.num_workers=2")
    warned = [r.getMessage() for r in caplog.records if "loader is the limit" in r.getMessage()]
    if slow == "data":
        assert len(warned) == 1 and "raise data.num_workers=2" in warned[0], warned
        assert "steps 4-6" in warned[0]
    else:
        assert warned == []
