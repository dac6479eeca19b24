"""What a graphed training step leaves to the host, measured on a CPU.

``torch.cuda.make_graphed_callables`` runs here with its CUDA primitives stubbed (the tests'
``stub_cuda_graph_primitives``): the capture computes once, and a replay dispatches nothing.
So a step's eager aten ops and its wall time are the host's part of a graphed step: Python, the
eager ops, the copies into the graphs' static inputs, and the matching. Rows: Siamese
pretraining with the dense part graphed only (the losses eager, as before session 8), with the
dense part and the losses graphed, and fine-tuning the same two ways (its losses graphed
since session 10). Small images (default 64x96) keep the stubbed copies and the eager CPU
kernels small; the eager losses of the rows without a losses graph still compute on the
CPU, so their times are not host time alone, but their op counts are.

The column "after dense" is the host's work on the GPU's critical path: from the dense part's
return (on a GPU, its replay is queued and the host next waits for the matching cost) to the
start of the backward, the loop's loss bookkeeping (``LossWindow.add``) included. On a GPU
the device idles for about that long per step, since its queue is empty once the dense part
has run; the rest of the host's work (the backward's and the optimiser's launches, the next
batch) overlaps the backward's kernels. The column "update" is the optimiser's part after
the backward (clip, fused AdamW with its skip flag, ``zero_grad``) over the same number of
one-element tensors, so that it is the host's work alone.

    PYTHONPATH=src python bench/bench_host.py --batch 8
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import bench_gpu as bg  # noqa: E402


def _stub() -> None:
    path = HERE.parent / "tests" / "unit" / "engine" / "test_cuda_graphs.py"
    spec = importlib.util.spec_from_file_location("graph_tests", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.stub_cuda_graph_primitives(setattr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="detr", choices=list(bg.VARIANTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="64x96")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    h, w = bg.parse_size(args.size)
    torch.set_num_threads(1)
    _stub()
    from siamese_detr.engine import graphs
    from siamese_detr.engine.loop import LossWindow
    from siamese_detr.engine.profiling import OpCounter
    from siamese_detr.methods.supervised import DetectionTask

    dev, real = torch.device("cpu"), graphs._capture_cuda

    def graphed(task: Any, losses_graph: bool = True) -> Any:
        task.enable_cuda_graphs(max_graphs=2, pad_multiple=32,
                                capture=lambda m, a, p: real(m, a, p), losses=losses_graph)
        return task.train()

    cfg, dense_only, _ = bg.build_pretrain(args.variant, dev, 32)
    s = cfg.pretrain.siamese
    sb = bg.make_siamese_batch(args.batch, h, w, s.num_regions, s.crop_size, dev)
    _, both, _ = bg.build_pretrain(args.variant, dev, 32)
    fcfg, (model, criterion), _ = bg.build_ours(args.variant, dev)
    _, (model2, criterion2), _ = bg.build_ours(args.variant, dev)
    model2.load_state_dict(model.state_dict())
    fb = (bg.make_images(args.batch, h, w, dev),
          bg.make_targets(args.batch, fcfg.model.num_classes, dev))
    rows = {"pretraining, dense part graphed": (graphed(dense_only, False), sb),
            "pretraining, dense part and losses graphed": (graphed(both), sb),
            "fine-tuning, dense part graphed": (
                graphed(DetectionTask(model, criterion), False), fb),
            "fine-tuning, dense part and losses graphed": (
                graphed(DetectionTask(model2, criterion2)), fb)}
    times: dict[str, list[float]] = {k: [] for k in rows}
    after: dict[str, list[float]] = {k: [] for k in rows}
    ops: dict[str, Any] = {}
    dense_done = [0.0]
    for task, _ in rows.values():
        _time_dense(task, dense_done)
    window = LossWindow()
    for i in range(args.steps + 2):  # interleaved; two warm-up rounds (the captures)
        for k, (task, batch) in rows.items():
            task.zero_grad(set_to_none=True)
            if i == 1:
                with OpCounter() as c:
                    task(batch).total.backward()
                ops[k] = c
                continue
            t0 = time.perf_counter()
            out = task(batch)
            window.add(out, i)
            t1 = time.perf_counter()
            out.total.backward()
            window.clear()  # the rows' loss names differ
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
                after[k].append(t1 - dense_done[0])
    update = [_update_host(n) for n in (_trainable_tensors(both), _trainable_tensors(model))]
    print(f"{args.variant}, batch {args.batch} at {h}x{w}, CPU, 1 thread, replays stubbed "
          f"(median of {args.steps}; times on a shared machine: compare rows only)")
    print(f"  {'':44s} {'step':>10s} {'after dense':>12s}")
    for k, v in times.items():
        c = ops[k]
        step_ms, after_ms = statistics.median(v) * 1e3, statistics.median(after[k]) * 1e3
        print(f"  {k:44s} {step_ms:7.2f} ms {after_ms:9.2f} ms  {c.ops:5d} eager ops "
              f"({c.op_names['detach']} detach)  {c.syncs} host read")
    for name, (n, ms) in zip(("pretraining", "fine-tuning"), update):
        print(f"  update, {name} ({n} tensors){'':18s} {ms:7.2f} ms")


def _time_dense(task: Any, stamp: list[float]) -> None:
    """Record in ``stamp[0]`` when ``task``'s dense part returns."""
    run = task.run_dense

    def timed(*args: Any) -> Any:
        out = run(*args)
        stamp[0] = time.perf_counter()
        return out
    task.run_dense = timed


def _trainable_tensors(module: torch.nn.Module) -> int:
    return sum(1 for p in module.parameters() if p.requires_grad)


def _update_host(n: int, steps: int = 50) -> tuple[int, float]:
    """Median ms of the loop's update (clip, fused AdamW with its skip flag, ``zero_grad``)
    over ``n`` one-element tensors in two groups: the host's part of it."""
    from siamese_detr.engine.loop import optimizer_step
    from siamese_detr.engine.optim import set_lr

    params = [torch.zeros(1, requires_grad=True) for _ in range(n)]
    opt = torch.optim.AdamW([{"params": params[: n // 2], "base_lr": 1e-4},
                             {"params": params[n // 2:], "base_lr": 1e-5}], fused=True)
    ts = []
    for i in range(steps + 5):
        for p in params:
            p.grad = torch.ones(1)
        t0 = time.perf_counter()
        set_lr(opt, 1.0)
        norm = torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer_step(opt, (~torch.isfinite(norm)).float())
        opt.zero_grad(set_to_none=True)
        if i >= 5:
            ts.append(time.perf_counter() - t0)
    return n, statistics.median(ts) * 1e3


if __name__ == "__main__":
    main()
