"""Fine-tuning's losses as a second graphed part (``DetectionTask.losses``): the targets and the
matched pairs padded to a power of two, the padding counting 0. The same loss and gradients as
the eager criterion, for the softmax (DETR) and the focal (Deformable DETR) class losses, with
images without targets, more targets than queries, and a batch without any target. (That
the losses read nothing back nor upload: ``test_cuda_graphs.py``.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from siamese_detr.engine.graphs import enable_cuda_graphs
from siamese_detr.losses.set_criterion import padded_targets, target_slots
from siamese_detr.structures import BoxTargets

_spec = importlib.util.spec_from_file_location(
    "host_syncs", Path(__file__).parents[1] / "engine" / "test_host_syncs.py")
hs = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(hs)  # type: ignore[union-attr]


def _targets(g: torch.Generator, counts: list[int]) -> list[BoxTargets]:
    out = []
    for k in counts:
        cxcy = 0.2 + 0.6 * torch.rand(k, 2, generator=g)
        wh = 0.05 + 0.3 * torch.rand(k, 2, generator=g)
        out.append(BoxTargets(torch.cat([cxcy, wh], 1), torch.randint(0, 4, (k,), generator=g)))
    return out


def _batch(counts: list[int], seed: int = 0) -> Any:
    images, _ = hs.finetune_batches(1, seed=seed)[0]
    return images, _targets(torch.Generator().manual_seed(seed), counts)


def _step(task: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    task.zero_grad(set_to_none=True)
    out = task(batch)
    out.total.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for p in task.parameters()]
    return out.total.detach(), out.raw.detach(), grads


def _passthrough(module: Any, args: Any, pool: Any) -> Any:
    """A 'capture' that runs the part eagerly: the graphed path's arithmetic, no graph."""
    return module


# 8 queries per image: (3, 11) has an image with more targets than queries; (0, 4) one
# without; (0, 0) a batch without any target
@pytest.mark.parametrize("counts", [(2, 3), (3, 11), (0, 4), (0, 0)])
@pytest.mark.parametrize("variant", ["vanilla", "deformable"])
def test_padded_losses_equal_the_eager_criterion(variant: str, counts: tuple[int, int]) -> None:
    batch = _batch(list(counts))
    eager = hs.finetune_task(variant).train()
    graphed = hs.finetune_task(variant).train()
    graphed.load_state_dict(eager.state_dict())
    enable_cuda_graphs(graphed, max_graphs=2, pad_multiple=1, capture=_passthrough)
    torch.manual_seed(1)  # the same dropout masks: the dense part draws them first
    total, raw, grads = _step(eager, batch)
    torch.manual_seed(1)
    p_total, p_raw, p_grads = _step(graphed, batch)
    assert graphed._losses.graphed_calls == 1  # the padded path ran
    torch.testing.assert_close(p_raw, raw, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p_total, total, rtol=1e-6, atol=1e-7)
    for a, b in zip(p_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if sum(counts) > 0:
        assert raw[1] > 0 and raw[2] > 0  # the box terms are real


def test_padding_keeps_one_graph_per_power_of_two() -> None:
    assert [target_slots(n) for n in (0, 5, 15, 16, 17, 31, 32, 100)] == [
        16, 16, 16, 32, 32, 32, 64, 128]
    targets = _targets(torch.Generator().manual_seed(0), [2, 3])
    labels, boxes = padded_targets(targets, 16, torch.device("cpu"))
    assert labels.shape == (16,) and boxes.shape == (16, 4)
    assert torch.equal(labels[:5], torch.cat([t.labels for t in targets]))
    assert torch.equal(boxes[5:], torch.full((11, 4), 0.5)) and not labels[5:].any()
