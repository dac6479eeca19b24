"""Item 10: a non-finite loss never reaches the weights, is logged with the loss terms and
the batch's image ids, and follows the documented policy (skip up to
``engine.max_nonfinite_steps`` steps, then stop with a checkpoint)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from siamese_detr.config import EngineConfig
from siamese_detr.engine.checkpoint import load_checkpoint
from siamese_detr.engine.distributed import DistInfo
from siamese_detr.engine.logging import read_jsonl
from siamese_detr.engine.loop import Schedule, train
from siamese_detr.structures import LossOutput

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@dataclass
class Batch:
    x: torch.Tensor
    image_ids: list[str]
    poison: bool = False

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device):
        return self


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, batch: Batch) -> LossOutput:
        loss = self.lin(batch.x).pow(2).mean()
        if batch.poison:
            loss = loss * float("nan")
        v = float(loss.detach())
        return LossOutput(total=loss, terms={"loss_sq": (v, v)})


def stream_with_nan_at(bad: set[int]):
    def batches(position: int):
        k = position
        while True:
            g = torch.Generator().manual_seed(k)
            yield Batch(torch.randn(2, 3, generator=g), [f"im{k}a", f"im{k}b"], k in bad)
            k += 1
    return batches


def _train(tmp_path, bad, total, limit=2):
    torch.manual_seed(0)
    task = Toy()
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    snapshots = []

    def after_step(step):  # weights after every step
        snapshots.append({k: v.clone() for k, v in task.state_dict().items()})

    task.after_step = after_step  # type: ignore[attr-defined]
    eng = EngineConfig(log_every=1, ckpt_every=0, progress=False, max_nonfinite_steps=limit)
    result = train(task=task, batches=stream_with_nan_at(bad), optimizer=opt,
                   schedule=Schedule(total), engine=eng, run_dir=tmp_path, dist_info=CPU,
                   checkpoint_meta={"kind": "test", "config": {}})
    return task, snapshots, result


def test_nan_batch_is_skipped_and_logged(tmp_path, caplog):
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in Toy().state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="siamese_detr"):
        task, snaps, result = _train(tmp_path, {2}, 5)
    assert result.step == 5 and not result.stopped_early
    for k in initial:  # step 2 (third batch) applied no update: weights equal to after step 1
        assert torch.equal(snaps[2][k], snaps[1][k])
        assert not torch.equal(snaps[3][k], snaps[2][k])
        assert torch.isfinite(snaps[-1][k]).all()
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(msgs) == 1
    assert "non-finite loss at step 2: loss_sq=nan (raw nan); images ['im2a', 'im2b']" in msgs[0]
    assert "update skipped (1 of at most 2)" in msgs[0]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in records if r["step"] != 3)  # no NaN averaged in


def test_too_many_nan_steps_stop_with_a_checkpoint(tmp_path):
    from siamese_detr.engine.loop import NonFiniteLossError
    from siamese_detr.errors import RunStopped

    with pytest.raises(NonFiniteLossError) as err:
        _train(tmp_path, {1, 2, 3}, 10, limit=2)
    assert isinstance(err.value, RunStopped)
    msg = str(err.value)
    assert msg.startswith("stopped at step 4 of 10 (3 non-finite losses, more than "
                          "engine.max_nonfinite_steps=2; last: non-finite loss at step 3: ")
    assert "images ['im3a', 'im3b']" in msg
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
