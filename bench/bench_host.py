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
    h, w = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)
    _stub()
    from siamese_detr.engine import graphs
    from siamese_detr.engine.profiling import OpCounter
    from siamese_detr.methods.supervised import DetectionTask

    dev, real = torch.device("cpu"), graphs._capture_cuda

    def graphed(task: Any, losses_graph: bool = True) -> Any:
        task.enable_cuda_graphs(max_graphs=2, pad_multiple=32,
                                capture=lambda m, a, p: real(m, a, p))
        if not losses_graph:
            task._losses = None
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
    ops: dict[str, Any] = {}
    for i in range(args.steps + 2):  # interleaved; two warm-up rounds (the captures)
        for k, (task, batch) in rows.items():
            task.zero_grad(set_to_none=True)
            if i == 1:
                with OpCounter() as c:
                    task(batch).total.backward()
                ops[k] = c
                continue
            t0 = time.perf_counter()
            task(batch).total.backward()
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    print(f"{args.variant}, batch {args.batch} at {h}x{w}, CPU, 1 thread, replays stubbed "
          f"(median of {args.steps}; times on a shared machine: compare rows only)")
    for k, v in times.items():
        c = ops[k]
        print(f"  {k:44s} {statistics.median(v) * 1e3:7.2f} ms  {c.ops:5d} eager ops "
              f"({c.op_names['detach']} detach)  {c.syncs} host read")


if __name__ == "__main__":
    main()
