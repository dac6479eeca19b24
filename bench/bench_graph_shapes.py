"""``engine.cuda_graphs`` on DETR's changing image sizes: eager against graphed training.

Batches are drawn like COCO fine-tuning: each image gets a shorter side from the preset's
``train_scales`` and an aspect ratio from a COCO-like mix (0.75, 1.33, 1.5, 1.0, 0.67; max
side 1333), the batch is padded to its maxima and then to ``--pad`` (the task's automatic
value by default: 128). With ``--task pretrain``: Siamese DETR steps whose view sizes follow
the presets' view geometry on ImageNet-like images (padded to 64 by default). The same
sequence of batches runs through two copies of the same model, eager and graphed
(``enable_cuda_graphs``), step after step interleaved. Printed and written to ``--out``
(JSON): the distinct padded shapes seen, the graphs captured and their capture seconds,
median ms/step of each side over the steps after the first ``--warm`` (captures happen in
those), the share of graphed steps, the memory the captures added (``graph_mib``, summed
over the graphs), and the memory held (allocated and reserved) after the run, both models
together. ``--pool per_graph`` gives each graph its own memory pool (the default shares one,
``engine.cuda_graphs_pool``): the two runs' ``graph_mib`` compare the two.

    PYTHONPATH=src python bench/bench_graph_shapes.py --variant detr --dtype bf16 --steps 60
    PYTHONPATH=src python bench/bench_graph_shapes.py --task pretrain --batch 8 --dtype bf16
    PYTHONPATH=src python bench/bench_graph_shapes.py --device cpu --small   # logic only

On the CPU the graphs are the CPU stand-in of the tests (no speed meaning): it checks the
bench runs and counts shapes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu as bg  # noqa: E402

from siamese_detr.data.collate import pad_images, padded_size  # noqa: E402
from siamese_detr.methods.supervised import DetectionTask  # noqa: E402

RATIOS = (0.75, 1.33, 1.5, 1.0, 0.67)  # h / w: landscape photos dominate COCO


def batch_shapes(n: int, b: int, scales: tuple[int, ...], max_size: int, seed: int
                 ) -> list[list[tuple[int, int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sizes = []
        for _ in range(b):
            short, r = rng.choice(scales), rng.choice(RATIOS)
            h, w = (short, round(short / r)) if r < 1 else (round(short * r), short)
            s = min(1.0, max_size / max(h, w))
            sizes.append((max(1, round(h * s)), max(1, round(w * s))))
        out.append(sizes)
    return out


def view_shapes(n: int, b: int, opts: Any, seed: int) -> list[tuple[int, int]]:
    """Padded-to-max ``(H, W)`` of ``n`` Siamese pretraining batches: ImageNet-like image
    sizes through the views' own geometry (base resize, outer view rectangle)."""
    import numpy as np

    from siamese_detr.methods.siamese.views import detr_resize_size, sample_outer_rect

    rng = np.random.default_rng(seed)
    dims = [(500, 375), (375, 500), (500, 333), (500, 500), (400, 300), (640, 480)]
    out = []
    for _ in range(n):
        hs, ws = [], []
        for _ in range(b):
            w, h = dims[int(rng.integers(len(dims)))]
            short = int(opts.base_scales[int(rng.integers(len(opts.base_scales)))])
            oh, ow = detr_resize_size(w, h, short, opts.base_max_size)
            rect = sample_outer_rect(ow, oh, opts.view_scale, opts.view_ratio, rng)
            hs.append(int(rect[3] - rect[1]))
            ws.append(int(rect[2] - rect[0]))
        out.append((max(hs), max(ws)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--variant", default="detr", choices=list(bg.VARIANTS))
    ap.add_argument("--task", default="finetune", choices=["finetune", "pretrain"],
                    help="pretrain: Siamese DETR steps on views of the presets' geometry")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warm", type=int, default=20, help="steps left out of the medians")
    ap.add_argument("--pad", type=int, default=0,
                    help="0: the task's automatic value (128 fine-tuning, 64 pretraining)")
    ap.add_argument("--max-graphs", type=int, default=16)
    ap.add_argument("--pool", default="shared", choices=["shared", "per_graph"],
                    help="engine.cuda_graphs_pool")
    ap.add_argument("--small", action="store_true", help="CPU sizes: scales 48-80, max 96")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    capture = None
    if device.type != "cuda":
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "unit" / "engine"))
        from test_cuda_graphs import EmulatedCapture  # type: ignore[import-not-found]

        capture = EmulatedCapture()
    if args.task == "finetune":
        cfg, (model, crit), opt = bg.build_ours(args.variant, device)
        _, (gmodel, gcrit), gopt = bg.build_ours(args.variant, device)
        gmodel.load_state_dict(model.state_dict())
        eager, graphed = DetectionTask(model, crit), DetectionTask(gmodel, gcrit)
    else:
        cfg, eager, opt = bg.build_pretrain(args.variant, device, None)
        _, graphed, gopt = bg.build_pretrain(args.variant, device, None)
        graphed.load_state_dict(eager.state_dict())
    graphed.enable_cuda_graphs(max_graphs=args.max_graphs, pad_multiple=args.pad,
                               capture=capture, shared_pool=args.pool == "shared")
    pad = eager.pad_multiple = graphed.pad_multiple
    if args.task == "finetune":
        scales, max_size = cfg.data.train_scales, cfg.data.max_size
        if args.small:
            scales, max_size = (48, 64, 80), 96
        plan: list[Any] = batch_shapes(args.steps, args.batch, tuple(scales), max_size, seed=0)
        targets = bg.make_targets(args.batch, cfg.model.num_classes, device)
    else:
        opts = cfg.pretrain.siamese
        if args.small:
            opts = replace(opts, base_scales=(64, 80), base_max_size=96, crop_size=32)
        plan = view_shapes(args.steps, args.batch, opts, seed=0)
    times: dict[str, list[float]] = {"eager": [], "graphed": []}
    shapes: list[tuple[int, int]] = []
    for i, sizes in enumerate(plan):
        if args.task == "finetune":
            g = torch.Generator().manual_seed(i)
            images = pad_images([torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                                               generator=g) for h, w in sizes]).to(device)
            batch: Any = (images, targets)
            hw = tuple(images.images.shape[-2:])
        else:
            o = cfg.pretrain.siamese
            batch = bg.make_siamese_batch(args.batch, *sizes, o.num_regions,
                                          32 if args.small else o.crop_size, device)
            hw = sizes
        shapes.append(padded_size(*hw, pad))
        order = [("eager", eager, opt), ("graphed", graphed, gopt)]
        for name, task, o in order if i % 2 == 0 else order[::-1]:
            def step(task: Any = task, o: Any = o, batch: Any = batch) -> None:
                with bg.autocast(device, args.dtype, weight_cache=False):
                    loss = task(batch).total
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for gr in o.param_groups for p in gr["params"]], bg.CLIP)
                o.step()
                o.zero_grad(set_to_none=True)
            dt, _ = bg.timed(step, device)
            times[name].append(dt)
        if (i + 1) % 10 == 0:
            bg.log(f"step {i + 1}: {len(set(shapes))} shapes, graphs {graphed._dense.stats()}")
    stats = graphed._dense.stats()  # type: ignore[union-attr]
    kept = slice(min(args.warm, args.steps - 1), None)
    med = {k: 1e3 * statistics.median(v[kept]) for k, v in times.items()}
    mem = {}
    if device.type == "cuda":
        mem = {"allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
               "reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
               "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    result = {
        "task": args.task, "variant": args.variant, "dtype": args.dtype, "batch": args.batch,
        "pad": pad, "pool": args.pool,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": args.steps, "distinct_shapes": len(set(shapes)),
        "shape_counts": {f"{h}x{w}": shapes.count((h, w)) for h, w in sorted(set(shapes))},
        **stats, "capture_mib": graphed._dense.capture_mib,  # type: ignore[union-attr]
        "ms_median": med, "graphed_over_eager_ms": med["graphed"] / med["eager"],
        "ms_all": times, "memory_both_models": mem, "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    bg.log(json.dumps({k: v for k, v in result.items() if k != "ms_all"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
