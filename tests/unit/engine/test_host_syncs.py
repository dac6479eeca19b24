"""Host reads (device-to-host syncs) per training step, counted on CPU through the real loop.

On a GPU every host read waits for the device to drain its queue; a training step may have at
most one outside logging (the batched Hungarian cost matrices). Counted with ``OpCounter``
for a fine-tuning step of each detector (aux losses on) and a Siamese pretraining step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from siamese_detr.config import BackboneConfig, EngineConfig, LossConfig, ModelConfig
from siamese_detr.data.collate import pad_images
from siamese_detr.engine.distributed import DistInfo
from siamese_detr.engine.loop import Schedule, train
from siamese_detr.engine.optim import param_groups
from siamese_detr.engine.profiling import OpCounter
from siamese_detr.structures import BoxTargets, ImageBatch

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
VARIANTS = ("vanilla", "conditional", "deformable")
STEPS = 3


class StepCounter(nn.Module):
    """Wraps a task; ``after_step`` (called by the loop once per step, before any logging)
    records the host reads of each step."""

    def __init__(self, task: nn.Module, counter: OpCounter) -> None:
        super().__init__()
        self.task, self.counter = task, counter
        self.syncs: list[int] = []
        self.sites: list[Counter[str]] = []
        self._last = (0, Counter[str]())

    def forward(self, batch: Any) -> Any:
        return self.task(batch)

    def after_step(self, step: int) -> None:
        n, sites = self.counter.syncs, Counter(self.counter.sync_sites)
        self.syncs.append(n - self._last[0])
        self.sites.append(sites - self._last[1])
        self._last = (n, sites)
        if hasattr(self.task, "after_step"):
            self.task.after_step(step)


def _model_cfg(variant: str, num_classes: int, freeze: str) -> ModelConfig:
    return ModelConfig(variant=variant, backbone=BackboneConfig(depth=18, freeze=freeze),
                       hidden_dim=32, nheads=4, enc_layers=1, dec_layers=3, dim_feedforward=64,
                       dropout=0.1, num_queries=8, num_classes=num_classes, enc_n_points=2,
                       dec_n_points=2, aux_loss=True)


def _images(g: torch.Generator, sizes: list[tuple[int, int]]) -> ImageBatch:
    return pad_images([torch.randn(3, h, w, generator=g) for h, w in sizes])


def finetune_batches(n: int, seed: int = 0) -> list[tuple[ImageBatch, list[BoxTargets]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        targets = []
        for k in (2, 3):
            cxcy = 0.3 + 0.4 * torch.rand(k, 2, generator=g)
            wh = 0.1 + 0.2 * torch.rand(k, 2, generator=g)
            targets.append(BoxTargets(torch.cat([cxcy, wh], 1),
                                      torch.randint(0, 4, (k,), generator=g)))
        out.append((_images(g, [(64, 80), (56, 64)]), targets))
    return out


def pretrain_batches(n: int, seed: int = 0) -> list[Any]:
    from siamese_detr.methods.siamese.data import SiameseBatch

    g = torch.Generator().manual_seed(seed)
    sizes, M = [(64, 80), (56, 64)], 4
    out = []
    for _ in range(n):
        boxes = []
        for _view in range(2):
            xy = torch.rand(2, M, 2, generator=g) * 24
            boxes.append(torch.cat([xy, xy + 16 + torch.rand(2, M, 2, generator=g) * 16], -1))
        out.append(SiameseBatch(
            view1=_images(g, sizes), view2=_images(g, sizes), boxes1=boxes[0], boxes2=boxes[1],
            crops1=torch.randn(2, M, 3, 32, 32, generator=g),
            crops2=torch.randn(2, M, 3, 32, 32, generator=g), image_ids=["a", "b"]))
    return out


def finetune_task(variant: str) -> nn.Module:
    from siamese_detr.losses.set_criterion import build_criterion, num_logits
    from siamese_detr.methods.supervised import DetectionTask
    from siamese_detr.models.detector import build_detector

    torch.manual_seed(0)
    cfg = _model_cfg(variant, 4, "stem+layer1")
    return DetectionTask(build_detector(cfg, num_logits(cfg, LossConfig())),
                         build_criterion(cfg, LossConfig()))


def pretrain_task(variant: str) -> nn.Module:
    from siamese_detr.config import PretrainConfig, RunConfig, SiameseOptions
    from siamese_detr.methods.siamese.task import build_siamese_task

    torch.manual_seed(0)
    opts = SiameseOptions(num_regions=4, crop_size=32, weight_region=3.0, weight_global=1.0)
    cfg = RunConfig(task="pretrain", model=_model_cfg(variant, 2, "all"),
                    pretrain=PretrainConfig(siamese=opts))
    return build_siamese_task(cfg)


def fused_adamw(task: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(task, 1e-4, 1e-5, 1e-4), fused=True)


def count_steps(task: nn.Module, batches: list[Any], tmp_path: Path,
                optimizer: torch.optim.Optimizer | None = None, clip: float = 0.1,
                log_every: int = 100) -> StepCounter:
    """Train ``len(batches)`` steps under an ``OpCounter``; per-step host reads (logging and the
    final checkpoint come after the last ``after_step``)."""
    counter = OpCounter()
    wrapped = StepCounter(task, counter)
    opt = optimizer or fused_adamw(task)

    def stream(position: int) -> Iterator[Any]:
        return iter(batches[position:])

    eng = EngineConfig(log_every=log_every, ckpt_every=0, progress=False, keep_checkpoints=0)
    with counter:
        train(task=wrapped, batches=stream, optimizer=opt,
              schedule=Schedule(len(batches), (), 0.1, 0, clip), engine=eng, run_dir=tmp_path,
              dist_info=CPU, checkpoint_meta={"kind": "test", "config": {}},
              state_dict_of=task.state_dict)
    return wrapped


# the deformable attention core and encoder read the level shapes from the device; they are
# rewritten by the issue-13 kernel work (ops/deform_attn.py, models/transformer/), which owns
# them; until it lands, their reads make the deformable cases xfail instead of pass
FOREIGN = ("ops/deform_attn.py", "models/transformer/")


def _explain(counted: StepCounter) -> str:
    return "; ".join(f"step {i}: {n} {dict(s)}" for i, (n, s) in
                     enumerate(zip(counted.syncs, counted.sites)))


def _check(counted: StepCounter) -> None:
    assert len(counted.syncs) == STEPS
    own = [sum(n for site, n in sites.items() if not any(f in site for f in FOREIGN))
           for sites in counted.sites]
    assert max(own) <= 1, _explain(counted)
    if max(counted.syncs) > 1:
        pytest.xfail(f"host reads in the deformable kernels: {_explain(counted)}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_finetune_step_has_at_most_one_host_read(variant, tmp_path):
    _check(count_steps(finetune_task(variant), finetune_batches(STEPS), tmp_path))


@pytest.mark.parametrize("variant", VARIANTS)
def test_pretrain_step_has_at_most_one_host_read(variant, tmp_path):
    _check(count_steps(pretrain_task(variant), pretrain_batches(STEPS), tmp_path))


# --------------------------------------------------------------------------- non-finite losses
class PoisonedTask(nn.Module):
    """Linear regression whose loss is NaN at the steps in ``poisoned`` (by call count);
    ``after_step`` keeps a copy of the weights after every step."""

    def __init__(self, poisoned: set[int]) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.poisoned, self.calls = poisoned, 0
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        from siamese_detr.structures import LossOutput

        x, y = batch
        loss = ((self.lin(x).squeeze(-1) - y) ** 2).mean()
        if self.calls in self.poisoned:
            loss = loss * float("nan")
        self.calls += 1
        return LossOutput(total=loss, names=["loss_mse"], weights=[1.0], raw=loss.reshape(1))

    def after_step(self, step: int) -> None:
        self.snapshots.append({k: v.clone() for k, v in self.state_dict().items()})


def _regression(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(x, x.sum(1)) for x in (torch.randn(8, 4, generator=g) for _ in range(n))]


@pytest.mark.parametrize("fused", [True, False])
def test_nan_loss_never_reaches_the_weights(fused, tmp_path):
    from siamese_detr.engine.logging import read_jsonl

    torch.manual_seed(0)
    task = PoisonedTask(poisoned={1})
    opt = (torch.optim.AdamW(task.parameters(), lr=0.1, fused=True) if fused
           else torch.optim.SGD(task.parameters(), lr=0.1))
    counter = OpCounter()
    wrapped = StepCounter(task, counter)
    batches = _regression(4)
    eng = EngineConfig(log_every=4, ckpt_every=0, progress=False, keep_checkpoints=0)
    with counter:  # one bad step is within engine.max_nonfinite_steps: the run goes on
        train(task=wrapped, batches=lambda p: iter(batches[p:]), optimizer=opt,
              schedule=Schedule(4, (), 0.1, 0, 1.0), engine=eng, run_dir=tmp_path,
              dist_info=CPU, checkpoint_meta={"kind": "test", "config": {}},
              state_dict_of=task.state_dict)
    before, poisoned, after = task.snapshots[0], task.snapshots[1], task.snapshots[2]
    for k in before:
        assert torch.equal(poisoned[k], before[k]), k  # the NaN step changed nothing
        assert torch.isfinite(after[k]).all() and not torch.equal(after[k], before[k]), k
    if fused:  # skipped on the device: no host read; Adam's step count did not advance
        assert wrapped.syncs == [0, 0, 0, 0]
        assert all(int(s["step"]) == 3 for s in opt.state.values())
    else:  # other optimisers read the flag once per step
        assert wrapped.syncs == [1, 1, 1, 1]
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row["nonfinite_steps"] == 1
    assert row["loss_mse_unscaled"] == row["loss_mse_unscaled"]  # the NaN is not averaged in


def test_logged_values_are_window_means_of_device_terms(tmp_path):
    from siamese_detr.engine.logging import read_jsonl
    from siamese_detr.structures import LossOutput

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, batch: torch.Tensor) -> LossOutput:
            c = batch + 0 * self.w.sum()
            return LossOutput(total=3 * c, names=["a", "b"], weights=[2.0, 0.5],
                              raw=torch.cat([c, 2 * c]))

    task = Fixed()
    batches = [torch.tensor([v]) for v in (1.0, 2.0, 4.0, 8.0, 16.0)]
    eng = EngineConfig(log_every=2, ckpt_every=0, progress=False, keep_checkpoints=0)
    train(task=task, batches=lambda p: iter(batches[p:]), optimizer=fused_adamw(task),
          schedule=Schedule(5, (), 0.1, 0, 0.0), engine=eng, run_dir=tmp_path, dist_info=CPU,
          checkpoint_meta={"kind": "test", "config": {}})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 5]
    for r, mean in zip(rows, (1.5, 6.0, 16.0)):
        assert r["loss"] == pytest.approx(3 * mean)
        assert r["a_unscaled"] == pytest.approx(mean) and r["a"] == pytest.approx(2 * mean)
        assert r["b_unscaled"] == pytest.approx(2 * mean) and r["b"] == pytest.approx(mean)


def test_the_configured_optimizer_steps_without_a_host_read(tmp_path):
    """The optimiser the runners build (``engine.optim.build_optimizer``) must take the
    ``found_inf`` flag (fused AdamW), else every step pays one more read."""
    from siamese_detr.config import OptimConfig
    from siamese_detr.engine.optim import build_optimizer

    task = finetune_task("conditional")
    opt = build_optimizer(task, OptimConfig())
    counted = count_steps(task, finetune_batches(STEPS), tmp_path, optimizer=opt)
    if not getattr(opt, "_step_supports_amp_scaling", False):
        # one read of the flag per step (plus, counted on CPU only, the for-loop AdamW's
        # item() of its CPU step counters)
        pytest.xfail("engine.optim.build_optimizer does not build a fused AdamW yet: "
                     + _explain(counted))
    assert max(counted.syncs) <= 1, _explain(counted)


# --------------------------------------------------------------------------- baselines, device aug


def _deferred_siamese_batches(n: int) -> list[Any]:
    """Siamese batches as ``augment_on=device`` collates them: uint8 views, no crops, colour
    parameters (cut and coloured in the step)."""
    import numpy as np

    from siamese_detr.methods.siamese.colour import sample_colour_params
    from siamese_detr.methods.siamese.views import DeferredAugment

    rng = np.random.default_rng(0)

    def params(*shape: int) -> torch.Tensor:
        flat = [sample_colour_params(rng) for _ in range(int(np.prod(shape)))]
        return torch.tensor(np.stack(flat), dtype=torch.float32).view(*shape, -1)

    out = []
    for b in pretrain_batches(n):
        b.view1 = b.view1.__class__((b.view1.images.abs() * 60).clamp(0, 255).to(torch.uint8),
                                    b.view1.mask, b.view1.sizes)
        b.view2 = b.view2.__class__((b.view2.images.abs() * 60).clamp(0, 255).to(torch.uint8),
                                    b.view2.mask, b.view2.sizes)
        b.crops1 = b.crops2 = None
        b.deferred = DeferredAugment(params(2, 2), params(2, 2, 4), 32)
        out.append(b)
    return out


@pytest.mark.parametrize("variant", ["vanilla", "deformable"])
def test_pretrain_step_with_device_augmentation_has_at_most_one_host_read(variant, tmp_path):
    _check(count_steps(pretrain_task(variant), _deferred_siamese_batches(STEPS), tmp_path))


@pytest.mark.parametrize("method", ["detreg", "updetr"])
def test_baseline_steps_have_at_most_one_host_read(method, tmp_path):
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
    mod = importlib.import_module(f"test_{method}_task")
    variant = "conditional"
    _check(count_steps(mod.make_task(variant), [mod.make_batch(seed=s) for s in range(STEPS)],
                       tmp_path))
