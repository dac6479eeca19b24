"""``engine.cuda_graphs``: the dense part of a step from CUDA graphs (engine/graphs.py).

On the CPU: the padding to shape buckets, the capture-safety of the dense parts (no host read,
no tensor made from host data after the first call), the capture cache (one graph per
signature, a cap, eager in eval mode and without gradients) and the gradients, checked with a
CPU stand-in for ``torch.cuda.make_graphed_callables`` that has its interface and its autograd
structure (static inputs, one autograd node, the module's parameters as extra inputs); the
real ``make_graphed_callables`` with its CUDA primitives stubbed; the memory rule and failed
captures; DistributedDataParallel over two CPU processes. On a GPU: the real graphs against
eager training. Tasks: fine-tuning, Siamese DETR, DETReg and UP-DETR, each detector.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from siamese_detr.config import EngineConfig
from siamese_detr.data.collate import pad_images, pad_to_multiple, padded_size
from siamese_detr.engine.graphs import GraphedDense, enable_cuda_graphs, graph_signature
from siamese_detr.engine.loop import Schedule, train
from siamese_detr.engine.profiling import OpCounter
from siamese_detr.errors import ConfigError


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_HERE = Path(__file__).parent
hs = _load("host_syncs", _HERE / "test_host_syncs.py")  # fine-tuning and Siamese fixtures
dr = _load("detreg_task", _HERE.parent / "methods" / "test_detreg_task.py")
ud = _load("updetr_task", _HERE.parent / "methods" / "test_updetr_task.py")
bb = _load("backbone_tests", _HERE.parent / "models" / "test_backbone.py")  # fused-op stand-ins

VARIANTS = ("vanilla", "conditional", "deformable")
# pretrain_aug: Siamese DETR on augment_on=device batches (the crops cut and coloured, the
# views coloured inside the dense part)
KINDS = ("finetune", "pretrain", "pretrain_aug", "detreg", "updetr")


def make_task(kind: str, variant: str) -> nn.Module:
    """The task of ``kind`` (fine-tuning, Siamese DETR, DETReg, UP-DETR) at test size."""
    if kind == "finetune":
        return hs.finetune_task(variant)
    if kind in ("pretrain", "pretrain_aug"):
        return hs.pretrain_task(variant)
    return (dr if kind == "detreg" else ud).make_task(variant, levels=1 if variant != "deformable"
                                                      else 2)


def make_batches(kind: str, n: int) -> list[Any]:
    if kind == "finetune":
        return hs.finetune_batches(n)
    if kind == "pretrain":
        return hs.pretrain_batches(n)
    if kind == "pretrain_aug":
        return hs._deferred_siamese_batches(n)
    return [(dr if kind == "detreg" else ud).make_batch(seed=i) for i in range(n)]


def dense_args(kind: str, batch: Any) -> tuple[Tensor | None, ...]:
    """The inputs of ``task.dense`` for one batch, as the task's forward builds them."""
    if kind == "finetune":
        images = batch[0]
        u8 = (images.images.clamp(-2, 2) * 60 + 128).to(torch.uint8)  # the loaders hand uint8
        return u8, images.mask, images.sizes
    if kind == "pretrain":
        views, crops = batch.joint_inputs()
        return (views.images, views.mask, views.sizes, torch.cat([batch.boxes1, batch.boxes2]),
                crops)
    if kind == "pretrain_aug":
        views, boxes, view_colour, crop_colour, _ = batch.joint_raw()
        return views.images, views.mask, views.sizes, boxes, None, view_colour, crop_colour
    images = batch.images
    if kind == "detreg":
        return images.images, images.mask, images.sizes
    return images.images, images.mask, images.sizes, batch.patches


# --------------------------------------------------------------------------- shape buckets
def test_padded_size_rounds_up_to_the_multiple():
    assert padded_size(480, 640, 128) == (512, 640)
    assert padded_size(1, 129, 128) == (128, 256)
    assert padded_size(800, 1066, 1) == (800, 1066)


def test_pad_to_multiple_pads_bottom_right_with_masked_zeros():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(1, 255, (3, 50, 70), dtype=torch.uint8, generator=g)
    b = torch.randint(1, 255, (3, 40, 90), dtype=torch.uint8, generator=g)
    batch = pad_images([a, b])
    out = pad_to_multiple(batch, 32)
    assert tuple(out.images.shape) == (2, 3, 64, 96)
    assert torch.equal(out.images[:, :, :50, :90], batch.images)
    assert int(out.images[:, :, 50:].abs().sum()) == 0 and int(out.images[..., 90:].sum()) == 0
    assert torch.equal(out.mask[:, :50, :90], batch.mask)
    assert bool(out.mask[:, 50:].all()) and bool(out.mask[..., 90:].all())
    assert torch.equal(out.sizes, batch.sizes)
    # normalising after padding = padding after normalising (padding is zero either way)
    assert torch.equal(out.normalised().images,
                       pad_to_multiple(batch.normalised(), 32).images)
    assert pad_to_multiple(out, 32) is out


# --------------------------------------------------------------------------- capture safety
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_dense_part_neither_reads_nor_uploads_after_its_first_call(variant, kind):
    """What a CUDA graph can capture: after a first (warm-up) call, forward and backward of
    the dense part read nothing back to the host and make no tensor from host data (either
    would break the capture or replay stale host memory)."""
    task = make_task(kind, variant).train()
    args = dense_args(kind, make_batches(kind, 1)[0])
    task.dense(*args)
    with OpCounter() as c:
        out = task.dense(*args)
        sum(o.float().sum() for o in out if o.requires_grad).backward()
    assert c.syncs == 0, dict(c.sync_sites)
    assert c.uploads == 0, dict(c.upload_sites)
    assert c.op_names["lift_fresh"] + c.op_names["lift_fresh_copy"] == 0  # from_numpy etc.
    assert c.op_names["nonzero"] == 0  # boolean-mask indexing: a host read on a GPU
    assert c.ops > 100  # the counter saw the step


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["pretrain", "pretrain_aug", "finetune"])
def test_losses_part_neither_reads_nor_uploads(variant, kind):
    """The second graphed part, the losses after the matching, is capturable too: Siamese
    DETR's (criterion, region and global discrimination) and fine-tuning's (the criterion on
    padded targets and pairs). Given the dense part's outputs and the matched pairs, forward
    and backward read nothing back and upload nothing."""
    task = make_task(kind, variant).train()
    seen: list[tuple[Any, ...]] = []
    inner = task.losses

    def record(*args: Any) -> Any:
        seen.append(args)
        return inner(*args)

    task.losses = record  # what the losses' graphs are made of; a 'capture' that runs it
    enable_cuda_graphs(task, max_graphs=2, pad_multiple=32, capture=lambda m, a, pool: m)
    task(make_batches(kind, 1)[0]).total.backward()
    args = tuple(a.detach().requires_grad_(a.requires_grad) if a is not None else None
                 for a in seen[0])
    inner(*args)
    with OpCounter() as c:
        total, raw = inner(*args)
        total.backward()
    assert c.syncs == 0, dict(c.sync_sites)
    assert c.uploads == 0, dict(c.upload_sites)
    assert c.op_names["lift_fresh"] + c.op_names["lift_fresh_copy"] == 0
    # boolean-mask indexing (nonzero) reads a size back on a GPU (torchvision's GIoU loss)
    assert c.op_names["nonzero"] == 0
    assert c.ops > 50 and raw.shape[0] > 3 * 3


def test_op_counter_sees_uploads():
    """The control of the test above: a batch of an image size not seen before makes the
    deformable attention's level sizes new, and their one upload (``device_constant``) is
    counted; the same size again uploads nothing."""
    import torch.nn.functional as F

    task = make_task("finetune", "deformable").train()
    images, mask, sizes = dense_args("finetune", make_batches("finetune", 1)[0])
    task.dense(images, mask, sizes)  # constants of this size made
    wider = (F.pad(images, (0, 97)), F.pad(mask, (0, 97), value=True), sizes)
    for expected in (1, 0):
        with OpCounter() as c:
            task.dense(*wider)
        sites = [site for site in c.upload_sites if "structures.py" in site]
        assert c.uploads == expected and len(sites) == expected, dict(c.upload_sites)


def test_constants_a_graph_reads_are_never_evicted():
    """A captured graph reads the level sizes and the normalisation constants from their
    addresses at every replay, so the caches that made them must keep them for the process:
    after 1000 other padded sizes (the automatic 32-pixel padding alone makes 277 shapes,
    docs/benchmarks.md), the first ones are the same tensors, at the same addresses."""
    from siamese_detr.ops.deform_attn import shapes_tensor
    from siamese_detr.structures import device_constant

    cpu = torch.device("cpu")
    first = shapes_tensor([(25, 34), (13, 17)], cpu)
    mean = device_constant((0.485, 0.456, 0.406), cpu)
    ptrs = first.data_ptr(), mean.data_ptr()
    for i in range(1000):
        shapes_tensor([(30 + i, 40), (15 + i, 20)], cpu)
    assert shapes_tensor([(25, 34), (13, 17)], cpu) is first
    assert device_constant((0.485, 0.456, 0.406), cpu) is mean
    assert (first.data_ptr(), mean.data_ptr()) == ptrs


# --------------------------------------------------------------------------- capture cache
class EmulatedCapture:
    """CPU stand-in for ``torch.cuda.make_graphed_callables(module, sample_args)``: the same
    calling convention and autograd structure (inputs copied into static buffers, one autograd
    node whose extra inputs are the module's parameters, parameter gradients returned by that
    node), with the forward recomputed eagerly instead of replayed."""

    def __init__(self) -> None:
        self.captures: list[list[tuple[int, ...]]] = []
        self.pools: list[Any] = []  # the pool handle each capture was given
        self.events: list[tuple[str, int]] = []  # ("fwd" | "bwd", capture index), in order

    def __call__(self, module: nn.Module, sample_args: tuple[Tensor, ...],
                 pool: Any = None) -> Callable[..., Any]:
        assert all(isinstance(a, Tensor) for a in sample_args)
        self.captures.append([tuple(a.shape) for a in sample_args])
        self.pools.append(pool)
        index, events = len(self.captures) - 1, self.events
        params = tuple(module.parameters())
        static = [a.detach().clone().requires_grad_(a.requires_grad) for a in sample_args]
        n = len(static)

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
                events.append(("fwd", index))
                for s, x in zip(static, inputs[:n]):
                    assert s.shape == x.shape and s.dtype == x.dtype
                    s.data.copy_(x)
                with torch.enable_grad():
                    ctx.outs = tuple(module(*static))
                return tuple(o.detach() for o in ctx.outs)

            @staticmethod
            def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
                events.append(("bwd", index))
                surface = [*static, *params]
                need = [t for t in surface if t.requires_grad]
                live = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad]
                got = iter(torch.autograd.grad([o for o, _ in live], need,
                                               [g for _, g in live], allow_unused=True))
                return tuple(next(got) if t.requires_grad else None for t in surface)

        return lambda *args: Graphed.apply(*args, *params)


def test_one_capture_per_signature_up_to_the_cap():
    lin = nn.Linear(4, 3)
    capture = EmulatedCapture()
    dense = GraphedDense(lin, lambda x: (lin(x),), max_graphs=2, capture=capture)
    for rows in (5, 5, 7, 5, 9, 9):
        (y,) = dense(torch.randn(rows, 4))
        assert y.shape == (rows, 3)
    assert capture.captures == [[(5, 4)], [(7, 4)]]
    assert dense.stats() == {"graphs": 2, "graphed_calls": 4, "eager_calls": 2,
                             "capture_seconds": pytest.approx(dense.capture_seconds),
                             "failed_captures": 0, "graph_mib": 0.0}
    lin.eval()  # evaluation and inference run eagerly
    dense(torch.randn(11, 4))
    lin.train()
    with torch.no_grad():
        dense(torch.randn(13, 4))
    assert len(capture.captures) == 2
    # the input's dtype and requires_grad and the autocast state belong to the signature
    x = torch.randn(5, 4)
    assert graph_signature((x,)) != graph_signature((x.double(),))
    assert graph_signature((x,)) != graph_signature((x.requires_grad_(),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = graph_signature((x.detach(),))
    assert inside != graph_signature((x.detach(),))


def test_a_capture_samples_leaves_and_undoes_its_warm_up_on_the_running_stats():
    """A capture runs the part eagerly a few times first (``make_graphed_callables``' warm-up:
    3 runs); those runs must not count as steps for the BatchNorm running statistics (Siamese
    DETR's projector runs in its losses' graph). Inputs with a gradient (another graph's
    outputs) reach the capture as leaves of their own, not as the caller's tensors."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    eager = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    eager.load_state_dict(head.state_dict())
    inner = EmulatedCapture()
    seen: list[Tensor] = []

    def warm_then_capture(module: nn.Module, args: tuple[Tensor, ...], pool: Any
                          ) -> Callable[..., Any]:
        seen.extend(args)
        for _ in range(3):
            module(*args)
        return inner(module, args, pool)

    dense = GraphedDense(head, lambda x: (head(x),), capture=warm_then_capture)
    x = (torch.randn(5, 4) * 3 + 1).requires_grad_()
    y = x * 2  # not a leaf: the output of an earlier part
    dense(y)[0].sum().backward()
    eager(y.detach())
    assert seen[0] is not y and seen[0].is_leaf and seen[0].requires_grad
    assert torch.equal(seen[0], y.detach())
    bn, ref = head[1], eager[1]
    assert int(bn.num_batches_tracked) == 1  # one step, not 1 + 3 warm-up runs
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # the gradient went through


def test_a_failed_capture_leaves_that_shape_eager():
    lin = nn.Linear(4, 3)
    capture = EmulatedCapture()

    def flaky(module: nn.Module, args: tuple[Tensor, ...], pool: Any) -> Callable[..., Any]:
        if args[0].shape[0] == 7:
            raise RuntimeError("operation not permitted when stream is capturing")
        return capture(module, args, pool)

    dense = GraphedDense(lin, lambda x: (lin(x),), max_graphs=4, capture=flaky)
    x = torch.randn(7, 4)
    for rows in (7, 5, 7):
        (y,) = dense(torch.randn(rows, 4) if rows != 7 else x)
    torch.testing.assert_close(y, lin(x))  # the eager result
    assert dense.stats()["failed_captures"] == 1 and dense.eager_calls == 2
    assert dense.graphed_calls == 1 and len(capture.captures) == 1  # tried once, not again


def test_no_new_graph_without_room_for_it():
    """Each capture's memory is measured; a new shape is captured only while at least twice
    the largest so far is available."""
    lin = nn.Linear(4, 3)
    state = {"reserved": 0, "available": 1000}

    def capture(module: nn.Module, args: tuple[Tensor, ...], pool: Any) -> Callable[..., Any]:
        state["reserved"] += 100 * args[0].shape[0]  # the graph's pool
        state["available"] -= 100 * args[0].shape[0]
        return EmulatedCapture()(module, args, pool)

    dense = GraphedDense(lin, lambda x: (lin(x),), max_graphs=8, capture=capture,
                         memory=lambda device: (state["available"], state["reserved"]))
    for rows in (2, 3, 1, 3):
        dense(torch.randn(rows, 4))
    # 2 rows: +200 (800 left); 3 rows: +300 (500 left); 1 row: 500 < 2 x 300, eager
    assert dense.graph_bytes == 300 and len(dense.graphs) == 2
    assert dense.graphed_calls == 3 and dense.eager_calls == 1
    assert dense.stats()["graph_mib"] == 500 / 2**20  # both captures' memory, summed
    assert dense.capture_mib == [200 / 2**20, 300 / 2**20]


def test_one_pool_per_dense_part_shared_by_its_graphs():
    """``shared_pool`` (the default): every capture of a dense part is given that part's one
    pool handle, and another dense part has another; ``shared_pool=False``: each capture gets
    ``None`` (a pool of its own, made by ``make_graphed_callables``)."""
    lin = nn.Linear(4, 3)
    parts = {name: (EmulatedCapture(), shared) for name, shared in
             (("a", True), ("b", True), ("own", False))}
    for capture, shared in parts.values():
        dense = GraphedDense(lin, lambda x: (lin(x),), capture=capture, shared_pool=shared)
        for rows in (2, 3, 2, 5):
            dense(torch.randn(rows, 4))
        assert len(capture.captures) == 3
    pools = {name: capture.pools for name, (capture, _) in parts.items()}
    assert pools["a"][0] is not None and pools["a"] == [pools["a"][0]] * 3
    assert pools["b"] == [pools["b"][0]] * 3 and pools["b"][0] != pools["a"][0]
    assert pools["own"] == [None] * 3


def test_every_task_has_one_dense_part():
    """The shared pool is safe because one dense part runs one forward and its backward per
    step with no other graph of its pool in between. Each task has exactly one dense part;
    Siamese DETR's second graphed part, its losses, is a ``GraphedDense`` with a pool of its
    own (the nesting is checked in the alternating-shapes test)."""
    for kind in KINDS:
        for variant in VARIANTS:
            task = make_task(kind, variant)
            names = enable_cuda_graphs(task, max_graphs=2, pad_multiple=0,
                                       capture=EmulatedCapture())
            assert len(names) == 1, (kind, variant, names)
            losses = getattr(task, "_losses", None)
            assert (losses is not None) == _has_loss_graph(kind)
            if losses is not None:
                assert losses.pool is not None and losses.pool != task._dense.pool


def _stream(batches: list[Any]) -> Callable[[int], Iterator[Any]]:
    return lambda position: iter(batches[position:])


def _train(task: nn.Module, batches: list[Any], tmp_path: Path) -> list[Tensor]:
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.05)
    eng = EngineConfig(log_every=100, ckpt_every=0, progress=False, keep_checkpoints=0)
    train(task=task, batches=_stream(batches), optimizer=opt,
          schedule=Schedule(len(batches), (), 0.1, 0, 0.1), engine=eng, run_dir=tmp_path,
          dist_info=hs.CPU, checkpoint_meta={"kind": "test", "config": {}})
    return [p.detach().clone() for p in task.parameters()]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_graphed_training_equals_eager_training(variant, kind, tmp_path):
    """Three steps through the real loop with the dense part behind the graph interface
    (emulated) give the same weights as eager steps: every trainable parameter gets its
    gradient through the graph's autograd node, the eager rest (matching, losses) is
    unchanged, padding included."""
    batches = make_batches(kind, 3)
    results = []
    for graphed in (False, True):
        task = make_task(kind, variant)
        capture = EmulatedCapture()
        if graphed:
            assert enable_cuda_graphs(task, max_graphs=4, pad_multiple=32, capture=capture)
        else:
            task.pad_multiple = 32
        torch.manual_seed(1)
        results.append(_train(task, batches, tmp_path / str(graphed)))
        if graphed:
            # all three batches pad to one shape; Siamese DETR's losses are a second graph
            assert len(capture.captures) == 1 + _has_loss_graph(kind)
            assert capture.captures[0][0][-2:] == (64, 96)
            from siamese_detr.engine.logging import read_jsonl

            last = read_jsonl(tmp_path / "True" / "metrics.jsonl")[-1]
            assert last["cuda_graphs"] == 1 and last["graphed_share"] == 1.0
            if _has_loss_graph(kind):  # the losses' graph is logged too
                assert last["losses_graphed_share"] == 1.0
            else:
                assert "losses_graphed_share" not in last
    changed = 0
    for eager, graphed in zip(*results):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    for p0, p1 in zip(results[0], [p.detach() for p in make_task(kind, variant).parameters()]):
        changed += int(not torch.equal(p0, p1))
    assert changed > 10  # the steps did train


def _widen(batch: Any, extra: int) -> Any:
    """The batch with its images padded by ``extra`` columns on the right (mask True): a
    second padded shape with the same losses' meaning (fine-tuning and Siamese batches)."""
    from dataclasses import replace

    from siamese_detr.structures import ImageBatch

    def wide(b: ImageBatch) -> ImageBatch:
        pad = (0, extra)
        return ImageBatch(torch.nn.functional.pad(b.images, pad),
                          torch.nn.functional.pad(b.mask, pad, value=True), b.sizes)

    if isinstance(batch, tuple):
        return (wide(batch[0]), batch[1])
    return replace(batch, view1=wide(batch.view1), view2=wide(batch.view2))


def _eager_then_graphed(kind: str, variant: str, batches: list[Any], device: torch.device,
                        capture: Any, tmp_path: Path, amp: str, shared_pool: bool = True,
                        setup: Callable[[nn.Module], Any] | None = None
                        ) -> tuple[list[list[float]], list[list[Tensor]], GraphedDense]:
    """The same steps through the real loop twice, eager then with graphs (``capture``:
    ``None`` for the real one on CUDA; ``shared_pool`` as ``engine.cuda_graphs_pool``),
    randomness off, padding to 32 in both: the logged losses and the weights after the steps
    of each run, and the graphed run's dense part."""
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.engine.logging import read_jsonl

    losses, weights = [], []
    for graphed in (False, True):
        task = _no_randomness(make_task(kind, variant)).to(device)
        if setup is not None:  # e.g. the backbone in channels_last, in both runs
            setup(task)
        if graphed:
            assert enable_cuda_graphs(task, max_graphs=4, pad_multiple=32, capture=capture,
                                      shared_pool=shared_pool)
        else:
            task.pad_multiple = 32
        opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.05)
        eng = EngineConfig(log_every=1, ckpt_every=0, progress=False, keep_checkpoints=0,
                           amp=amp, cuda_graphs=graphed and device.type == "cuda")
        torch.manual_seed(1)
        run = tmp_path / str(graphed)
        train(task=task, batches=_stream(batches), optimizer=opt,
              schedule=Schedule(len(batches), (), 0.1, 0, 0.1), engine=eng, run_dir=run,
              dist_info=DistInfo(rank=0, world_size=1, local_rank=0, device=device),
              checkpoint_meta={"kind": "test", "config": {}})
        losses.append([r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r])
        weights.append([p.detach().float().cpu() for p in task.parameters()])
    task._dense.losses_part = task._losses  # the second part, the losses (or None)
    return losses, weights, task._dense


def _tolerance(device: torch.device, amp: str) -> dict[str, float]:
    if device.type == "cpu":
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=1e-3, atol=1e-5) if amp == "none" else dict(rtol=3e-2, atol=1e-3)


def _alternating_shapes_run(kind: str, variant: str, device: torch.device, capture: Any,
                            tmp_path: Path, amp: str = "none", shared_pool: bool = True) -> None:
    """Four steps whose batches alternate between two padded shapes (A, B, A, B), with two
    graphs, against eager steps: each graph's static inputs, outputs and gradients and the
    level-size constants it reads must survive the other graph's replays; with one pool, the
    second graph reuses the first one's temporaries and saved activations, which must be dead
    by then."""
    base = make_batches(kind, 4)
    batches = [b if i % 2 == 0 else _widen(b, 64) for i, b in enumerate(base)]
    losses, weights, dense = _eager_then_graphed(kind, variant, batches, device, capture,
                                                 tmp_path, amp, shared_pool)
    assert (dense.pool is not None) == shared_pool
    if isinstance(capture, EmulatedCapture):
        # what makes one pool safe: each graph's backward replays right after its forward,
        # with no other graph of its pool in between (the real loop, not the assumption).
        # Siamese DETR's losses (one shape, captured second, their own pool) nest inside
        if _has_loss_graph(kind):
            dense_ids = [0, 2]
            assert capture.events == [e for i in range(4) for e in (
                ("fwd", dense_ids[i % 2]), ("fwd", 1), ("bwd", 1), ("bwd", dense_ids[i % 2]))]
        else:
            assert capture.events == [(k, i % 2) for i in range(4) for k in ("fwd", "bwd")]
    assert len(dense.graphs) == 2 and dense.graphed_calls == 4
    tol = _tolerance(device, amp)
    assert len(losses[0]) == 4
    torch.testing.assert_close(losses[1], losses[0], **tol)
    for eager, graphed in zip(*weights):
        torch.testing.assert_close(graphed, eager, **tol)


@pytest.mark.parametrize("variant", ["vanilla", "deformable"])
@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_two_shapes_alternating_train_like_eager(kind, variant, tmp_path):
    """The alternating-shapes run with the CPU stand-in (its GPU twin below uses real
    graphs)."""
    _alternating_shapes_run(kind, variant, torch.device("cpu"), EmulatedCapture(), tmp_path)


def _has_loss_graph(kind: str) -> bool:
    """Siamese DETR's and fine-tuning's steps have a second graphed part after the matching:
    their losses."""
    return kind in ("finetune", "pretrain", "pretrain_aug")


def _no_randomness(task: nn.Module) -> nn.Module:
    from dataclasses import replace

    for m in task.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):  # attention dropout inside SDPA
            m.dropout = 0.0
    opts = getattr(task, "opts", None)
    if opts is not None:  # Siamese box jitter, UP-DETR patch masking and query shuffle
        off = {"box_jitter": 0.0, "mask_ratio": 0.0, "query_shuffle": False}
        task.opts = replace(opts, **{k: v for k, v in off.items() if hasattr(opts, k)})
    return task


def stub_cuda_graph_primitives(setattr: Callable[[Any, str, Any], None]) -> None:
    """Replace the CUDA primitives ``make_graphed_callables`` uses (stream, synchronize, graph
    capture, replay, memory pool) by no-ops, through ``setattr`` (pytest's
    ``monkeypatch.setattr``, or the builtin in a subprocess), so that the real function runs on
    the CPU. The capture then computes eagerly once and a replay does nothing. Its static
    gradient buffers come from ``torch.empty_like``, which is made ``zeros_like``: without a
    real replay nothing ever fills them, and uninitialised memory can hold NaNs (the backward
    of a stubbed graph is meaningless, but it must be deterministic)."""
    import contextlib

    import torch.cuda.graphs as tcg

    class NoGraph:
        def replay(self) -> None:
            pass

    setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    setattr(torch.cuda, "Stream", lambda *a, **k: None)
    setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    setattr(torch.cuda, "CUDAGraph", NoGraph)
    setattr(torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    setattr(tcg, "graph_pool_handle", lambda: None)
    setattr(torch, "empty_like", torch.zeros_like)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_real_make_graphed_callables_accepts_the_dense_parts(variant, kind, monkeypatch):
    """The real ``torch.cuda.make_graphed_callables`` on the CPU, its CUDA primitives (stream,
    synchronize, graph capture and replay) replaced by no-ops: its warm-up, its autograd over
    our outputs and the module's parameters and its graphed autograd node accept the dense
    parts as they are (tensor-only inputs and outputs, outputs without gradient, parameters
    the part does not use). A no-op replay returns what the capture computed from the first
    batch, so the first step's loss must equal the eager loss (nothing random), and every
    trainable parameter must receive a gradient of its shape."""
    from siamese_detr.engine import graphs

    stub_cuda_graph_primitives(monkeypatch.setattr)
    batch = make_batches(kind, 1)[0]
    eager = _no_randomness(make_task(kind, variant).train())
    task = _no_randomness(make_task(kind, variant).train())
    real, make = graphs._capture_cuda, torch.cuda.make_graphed_callables
    given: list[Any] = []

    @functools.wraps(make)  # keeps the signature the capture inspects
    def recording(*args: Any, **kwargs: Any) -> Any:
        given.append(kwargs.get("pool"))
        return make(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", recording)
    enable_cuda_graphs(task, max_graphs=2, pad_multiple=1,
                       capture=lambda m, a, pool: real(m, a, pool))
    loss = task(batch).total
    loss.backward()
    parts = [task._dense] + ([task._losses] if _has_loss_graph(kind) else [])
    assert [part.stats()["graphed_calls"] for part in parts] == [1] * len(parts)
    # each part's shared pool, passed on; Siamese DETR's two parts have one each
    assert given == [part.pool for part in parts] and None not in given
    assert len(set(given)) == len(given)
    torch.testing.assert_close(loss.detach(), eager(batch).total.detach(), rtol=1e-6, atol=0)
    for name, p in task.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape, name


def test_cuda_graphs_config_rules():
    with pytest.raises(ConfigError, match="accum_steps"):
        EngineConfig(cuda_graphs=True, accum_steps=2)
    with pytest.raises(ConfigError, match="cuda_graphs_max"):
        EngineConfig(cuda_graphs_max=0)
    with pytest.raises(ConfigError, match="pad_to_multiple"):
        EngineConfig(pad_to_multiple=-1)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_real_cuda_graphs_train_like_eager(variant, kind, amp, tmp_path):
    """Real ``make_graphed_callables`` against eager, dropout and box jitter off (the capture's
    warm-up draws random numbers, so only deterministic steps can be compared): the losses of
    three steps and the weights after them agree."""
    dev = torch.device("cuda")
    losses, weights, dense = _eager_then_graphed(kind, variant, make_batches(kind, 3), dev,
                                                 None, tmp_path, amp)
    assert dense.graphed_calls == 3 and len(dense.graphs) == 1
    if _has_loss_graph(kind):  # the losses' graph was captured and replayed, not eager
        assert dense.losses_part is not None
        assert dense.losses_part.stats()["failed_captures"] == 0, dense.losses_part.failed
        assert dense.losses_part.graphed_calls == 3
    tol = _tolerance(dev, amp)
    torch.testing.assert_close(losses[1], losses[0], **tol)
    for eager, graphed in zip(*weights):
        torch.testing.assert_close(graphed, eager, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["pretrain", "pretrain_aug", "finetune"])
@pytest.mark.parametrize("option", ["channels_last", "fused_conv_relu"])
def test_real_cuda_graphs_with_a_backbone_option(option, kind, tmp_path):
    """The backbone options that are off by default until this passes on a GPU:
    ``model.backbone.channels_last`` (8-11 % off the graphed pretraining step on the H100 in
    session 8) and ``model.backbone.fused_conv_relu`` (cuDNN's fused convolution + bias +
    residual + ReLU for the frozen units, session 9). Graphed training with the option trains
    like eager training with it, in bf16."""
    dev = torch.device("cuda")
    losses, weights, dense = _eager_then_graphed(
        kind, "vanilla", make_batches(kind, 3), dev, None, tmp_path, "bf16",
        setup=lambda task: getattr(task.detector.backbone, f"use_{option}")())
    assert dense.graphed_calls == 3 and not dense.failed
    tol = _tolerance(dev, "bf16")
    torch.testing.assert_close(losses[1], losses[0], **tol)
    for eager, graphed in zip(*weights):
        torch.testing.assert_close(graphed, eager, **tol)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_graphed_training_with_a_channels_last_backbone_equals_eager(kind, tmp_path):
    """The CPU twin of ``test_real_cuda_graphs_with_a_backbone_option[channels_last]``, with
    the graph stand-in."""
    losses, weights, _ = _eager_then_graphed(
        kind, "vanilla", make_batches(kind, 3), torch.device("cpu"), EmulatedCapture(),
        tmp_path, "none", setup=lambda task: task.detector.backbone.use_channels_last())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for eager, graphed in zip(*weights):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_graphed_training_with_fused_conv_relu_equals_eager(kind, tmp_path, monkeypatch):
    """The CPU twin of ``test_real_cuda_graphs_with_a_backbone_option[fused_conv_relu]``: the
    graph stand-in, and the fused ops replaced by what they compute and taken on the CPU
    (where no gradient flows), counted; eager training with them equals the unfused one."""
    calls = bb._reference_fused_ops(monkeypatch)
    losses, weights, _ = _eager_then_graphed(
        kind, "vanilla", make_batches(kind, 3), torch.device("cpu"), EmulatedCapture(),
        tmp_path, "none", setup=lambda task: task.detector.backbone.use_fused_conv_relu())
    assert calls["relu"] + calls["add_relu"] > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for eager, graphed in zip(*weights):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    unfused, _, _ = _eager_then_graphed(kind, "vanilla", make_batches(kind, 3),
                                        torch.device("cpu"), None, tmp_path / "plain", "none")
    torch.testing.assert_close(losses[0], unfused[0], rtol=1e-4, atol=1e-6)


def _random_graphed_run(kind: str, device: torch.device, capture: Any, tmp_path: Path,
                        amp: str) -> tuple[list[float], GraphedDense]:
    """Three graphed steps through the real loop with every random op on: dropout, the
    Siamese box jitter, UP-DETR's patch masking and query shuffle (``torch.randperm`` on the
    device, inside the dense part). The logged losses and the dense part."""
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.engine.logging import read_jsonl

    if kind == "updetr":
        task = ud.make_task("vanilla", levels=1, query_shuffle=True).to(device)
        assert task.opts.query_shuffle and task.opts.mask_ratio > 0
    else:
        task = make_task(kind, "vanilla").to(device)
    assert enable_cuda_graphs(task, max_graphs=4, pad_multiple=32, capture=capture)
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.05)
    eng = EngineConfig(log_every=1, ckpt_every=0, progress=False, keep_checkpoints=0, amp=amp,
                       cuda_graphs=device.type == "cuda")
    torch.manual_seed(1)
    train(task=task, batches=_stream(make_batches(kind, 3)), optimizer=opt,
          schedule=Schedule(3, (), 0.1, 0, 0.1), engine=eng, run_dir=tmp_path,
          dist_info=DistInfo(rank=0, world_size=1, local_rank=0, device=device),
          checkpoint_meta={"kind": "test", "config": {}})
    return [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r], task._dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["pretrain", "detreg", "updetr"])
def test_real_cuda_graphs_capture_the_random_ops(kind, tmp_path):
    """The other GPU tests turn randomness off to compare with eager training. Here it is on,
    UP-DETR's query shuffle included (``torch.randperm`` on the device inside the capture,
    never run on a GPU before session 9's script): every step replays the graphs (no
    fallback to eager) and the losses are finite."""
    losses, dense = _random_graphed_run(kind, torch.device("cuda"), None, tmp_path, "bf16")
    assert dense.graphed_calls == 3 and not dense.failed
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_graphed_steps_with_the_random_ops_on(tmp_path):
    """The CPU twin of the test above, for UP-DETR with its query shuffle and patch masking,
    with the graph stand-in: the steps go through the graphs, and the losses are finite."""
    losses, dense = _random_graphed_run("updetr", torch.device("cpu"), EmulatedCapture(),
                                        tmp_path, "none")
    assert dense.graphed_calls == 3 and not dense.failed
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_failed_capture_leaves_random_ops_working():
    """A part that cannot be captured (boolean-mask indexing reads a size back) runs eagerly,
    and the process goes on: dropout after it, eager and in a new capture, still works (a
    failed capture used to leave the CUDA generator in its capture state)."""
    dev = torch.device("cuda")
    lin = nn.Linear(4, 4).to(dev).train()
    bad = GraphedDense(lin, lambda x: (lin(x)[lin(x) > 0].sum().reshape(1),))
    x = torch.randn(8, 4, device=dev)
    out = bad(x)[0]
    assert len(bad.failed) == 1 and bad.eager_calls == 1 and out.requires_grad
    drop = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).to(dev).train()
    y = drop(x)
    assert float((y == 0).float().mean()) > 0.1  # dropout ran
    good = GraphedDense(drop, lambda x: (drop(x),))
    good(x)[0].sum().backward()
    assert good.graphed_calls == 1 and not good.failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("kind", "variant", "pool"), [
    *((k, v, "shared") for k in ("finetune", "pretrain") for v in ("vanilla", "deformable")),
    ("pretrain", "deformable", "per_graph")])
def test_real_cuda_graphs_two_shapes_alternating(kind, variant, pool, tmp_path):
    """Two real graphs replayed in turn train like eager, in bf16 as the fast configuration
    runs: from one memory pool (the default), and for the largest dense part from one pool
    each (the former behaviour, ``engine.cuda_graphs_pool=per_graph``)."""
    _alternating_shapes_run(kind, variant, torch.device("cuda"), None, tmp_path, "bf16",
                            shared_pool=pool == "shared")


def test_setup_ignores_graphs_on_the_cpu_and_applies_the_padding(tmp_path, caplog):
    from dataclasses import replace

    from siamese_detr.config import RunConfig
    from siamese_detr.engine.setup import prepare_training

    base = RunConfig(output_dir=str(tmp_path))
    task = make_task("finetune", "vanilla")
    cfg = replace(base, engine=EngineConfig(cuda_graphs=True, progress=False))
    with caplog.at_level("WARNING"):
        prepare_training(task, cfg, hs.CPU, dataset_len=4, per_process_batch=2)
    assert task._dense is None and task.pad_multiple == 1  # the automatic 128 needs graphs
    assert "ignored on cpu" in caplog.text
    cfg = replace(base, engine=EngineConfig(cuda_graphs=True, pad_to_multiple=32,
                                            progress=False))
    prepare_training(task, cfg, hs.CPU, dataset_len=4, per_process_batch=2)
    assert task._dense is None and task.pad_multiple == 32  # explicit padding applies
    cfg = replace(base, engine=EngineConfig(pad_to_multiple=64, progress=False))
    prepare_training(task, cfg, hs.CPU, dataset_len=4, per_process_batch=2)
    assert task._dense is None and task.pad_multiple == 64


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_graphs_under_ddp_train_like_eager_ddp(kind, tmp_path):
    """Two CPU processes (gloo) under DistributedDataParallel, the task given its graphs
    before the wrap as ``prepare_training`` does: with the graph-shaped stand-in the losses
    and weights equal eager DDP training (the gradient hooks fire on the graph node's
    parameter gradients); the real ``make_graphed_callables`` (CUDA primitives stubbed) runs
    its warm-up and capture inside DDP's forward without upsetting DDP's reducer."""
    import subprocess
    import sys

    worker = Path(__file__).with_name("ddp_graphs_worker.py")
    results = {}
    for mode in ("eager", "emulated", "stubbed"):
        out = tmp_path / mode
        out.mkdir()
        proc = subprocess.run([sys.executable, str(worker), str(out), kind, "vanilla", mode,
                               _free_port()], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = torch.load(out / "result.pt", weights_only=True)
    eager, emulated, stubbed = results["eager"], results["emulated"], results["stubbed"]
    assert emulated["graphed_calls"] == stubbed["graphed_calls"] == 2
    # under DDP too, a graph's backward replays right after its forward (the shared pool)
    assert emulated["events"] == [("fwd", 0), ("bwd", 0)] * 2
    torch.testing.assert_close(emulated["losses"], eager["losses"], rtol=1e-5, atol=0)
    for a, b in zip(emulated["weights"], eager["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stubbed["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-5)


def test_automatic_padding_follows_the_task():
    """``engine.pad_to_multiple=0`` with graphs: 128 for fine-tuning (images up to 1333 px),
    64 for the pretraining tasks (views under about 600 px); docs/benchmarks.md."""
    for kind, pad in (("finetune", 128), ("pretrain", 64), ("detreg", 64), ("updetr", 64)):
        task = make_task(kind, "vanilla")
        enable_cuda_graphs(task, max_graphs=2, pad_multiple=0, capture=EmulatedCapture())
        assert task.pad_multiple == pad, kind


@pytest.mark.parametrize("variant", ["vanilla", "deformable"])
def test_device_augmentation_inside_the_dense_part_equals_finishing_it_before(variant):
    """``augment_on=device``: finishing the augmentation inside ``dense`` (so that a graph
    replays it) gives the outputs of finishing it first (``joint_inputs``) and running the
    dense part on the finished views and crops."""
    task = _no_randomness(make_task("pretrain_aug", variant).train())
    batch = make_batches("pretrain_aug", 1)[0]
    inside = task.dense(*dense_args("pretrain_aug", batch))
    views, crops = batch.joint_inputs()
    before = task.dense(views.images, views.mask, views.sizes,
                        torch.cat([batch.boxes1, batch.boxes2]), crops)
    # logits, boxes, hidden, crop embeddings, pooled, matching cost
    assert len(inside) == len(before) == 6
    for a, b in zip(inside, before):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_engine_deterministic_sets_the_flags_and_turns_off_the_fused_convolutions(
        tmp_path, monkeypatch, caplog):
    """``engine.deterministic=true`` was a config key that did nothing until session 9. It
    now turns on PyTorch's deterministic algorithms (warn-only), cuDNN's deterministic mode
    and cuBLAS's fixed workspace. cuDNN's fused convolutions, which PyTorch calls with
    ``deterministic=False``, then stay off. On a GPU, a Deformable DETR run is warned that
    its attention backward is not bit-reproducible. Asking for cuDNN benchmarking as well is
    a config error."""
    import logging
    from dataclasses import replace

    from siamese_detr.config import RunConfig
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.engine.setup import prepare_training
    from siamese_detr.models import backbone as backbone_module

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    x = torch.zeros(1, 3, 8, 8)

    def fusable() -> bool:  # as on a GPU
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
            return backbone_module._fusable(x)

    assert fusable()
    cfg = replace(RunConfig(output_dir=str(tmp_path)),
                  engine=EngineConfig(deterministic=True, progress=False))
    cuda = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    try:
        with caplog.at_level(logging.WARNING):
            prepare_training(make_task("finetune", "deformable"), cfg, cuda, dataset_len=4,
                             per_process_batch=2)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not fusable()
        assert "not bit-reproducible" in caplog.text
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    with pytest.raises(ConfigError, match="engine.cudnn_benchmark=true picks"):
        EngineConfig(deterministic=True, cudnn_benchmark=True)


def test_cudnn_benchmark_is_set_on_cuda_only(tmp_path, monkeypatch):
    """``engine.cudnn_benchmark=true`` turns ``torch.backends.cudnn.benchmark`` on for a CUDA
    run and leaves it alone on the CPU (and by default)."""
    from dataclasses import replace

    from siamese_detr.config import RunConfig
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.engine.setup import prepare_training

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    base = RunConfig(output_dir=str(tmp_path))
    on = replace(base, engine=EngineConfig(cudnn_benchmark=True, progress=False))
    prepare_training(make_task("finetune", "vanilla"), on, hs.CPU, dataset_len=4,
                     per_process_batch=2)
    assert torch.backends.cudnn.benchmark is False  # ignored on the CPU
    cuda = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    prepare_training(make_task("finetune", "vanilla"), replace(base, engine=EngineConfig(
        progress=False)), cuda, dataset_len=4, per_process_batch=2)
    assert torch.backends.cudnn.benchmark is False  # off by default
    prepare_training(make_task("finetune", "vanilla"), on, cuda, dataset_len=4,
                     per_process_batch=2)
    assert torch.backends.cudnn.benchmark is True
