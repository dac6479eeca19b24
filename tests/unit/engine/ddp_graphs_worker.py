"""Two CPU processes (gloo) training a task under DDP, eager or with its dense part behind the
graph interface; run by ``test_cuda_graphs.test_graphs_under_ddp_train_like_eager_ddp``.

    python ddp_graphs_worker.py OUT_DIR KIND VARIANT MODE    # MODE: eager | emulated | stubbed

Rank 0 writes ``OUT_DIR/result.pt``: the per-step losses (rank 0's batches) and the weights
after the steps. ``stubbed`` is the real ``make_graphed_callables`` with its CUDA primitives
stubbed (its backward is meaningless then: only the first loss is compared).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 2


def _helpers():  # the tests' task and batch builders
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cuda_graph_tests", Path(__file__).with_name("test_cuda_graphs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(rank: int, out: str, kind: str, variant: str, mode: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from siamese_detr.config import EngineConfig
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.engine.graphs import enable_cuda_graphs
    from siamese_detr.engine.logging import read_jsonl
    from siamese_detr.engine.loop import Schedule, train

    cg = _helpers()
    task = cg._no_randomness(cg.make_task(kind, variant))
    emulated = cg.EmulatedCapture()
    if mode == "emulated":
        enable_cuda_graphs(task, max_graphs=2, pad_multiple=32, capture=emulated)
    elif mode == "stubbed":
        from siamese_detr.engine import graphs

        cg.stub_cuda_graph_primitives(setattr)
        enable_cuda_graphs(task, max_graphs=2, pad_multiple=32,
                           capture=lambda m, a, pool: graphs._capture_cuda(m, a, pool))
    else:
        task.pad_multiple = 32
    model = torch.nn.parallel.DistributedDataParallel(task)
    batches = cg.make_batches(kind, 2 * STEPS)[rank::2]  # each rank its own batches
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.05)
    eng = EngineConfig(log_every=1, ckpt_every=0, progress=False, keep_checkpoints=0)
    run_dir = Path(out) / f"rank{rank}"
    train(task=model, batches=lambda p: iter(batches[p:]), optimizer=opt,
          schedule=Schedule(STEPS, (), 0.1, 0, 0.1), engine=eng, run_dir=run_dir,
          dist_info=DistInfo(rank=rank, world_size=2, local_rank=rank,
                             device=torch.device("cpu")),
          checkpoint_meta={"kind": "test", "config": {}}, state_dict_of=task.state_dict)
    if rank == 0:
        losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
        torch.save({"losses": losses, "weights": [p.detach() for p in task.parameters()],
                    "graphed_calls": getattr(task._dense, "graphed_calls", 0),
                    "events": emulated.events},
                   Path(out) / "result.pt")
    dist.barrier()  # neither rank tears gloo down while the other still writes or trains
    dist.destroy_process_group()
    # Skip the interpreter's teardown: with the CUDA primitives stubbed (mode ``stubbed``), it
    # aborted in about 1 run in 15 ("terminate called without an active exception", in C++
    # destructors after every result was written). Not a state any real run reaches.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out, kind, variant, mode, port = sys.argv[1:6]
    mp.spawn(worker, args=(out, kind, variant, mode, port), nprocs=2, join=True)
