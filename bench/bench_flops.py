"""Floating-point work of a pretraining step against a fine-tuning step, counted on the CPU.

Issue 13 asks the pretraining step to take at most 1.5x the fine-tuning step of the same
detector and batch. Once both are bound by the GPU (CUDA graphs, bf16), their ratio tends to
the ratio of their work. This counts that work with ``torch.utils.flop_counter`` over one
forward and backward of each step (our steps as ``bench_gpu.py`` builds them, fp32):
matrix products and convolutions only. The deformable attention's sampling is not counted
(it is memory-bound, and the counter has no formula for it). Per encoded view: a
pretraining step encodes ``2B`` views, a fine-tuning step ``B`` images.

    PYTHONPATH=src python bench/bench_flops.py                       # batch 2 at 800x1088
    PYTHONPATH=src python bench/bench_flops.py --batch 8 --size 480x480
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import bench_gpu as bg  # noqa: E402


def step_flops(fwd_bwd: Any) -> float:
    """GFLOP of one ``fwd_bwd()`` call. (The counter's split by module is left out: it
    misplaces backward work between modules, e.g. half the trunk's for a multi-level one.)"""
    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    return counter.get_total_flops() / 1e9


def measure(variant: str, batch: int, h: int, w: int) -> dict[str, Any]:
    dev = torch.device("cpu")
    cfg, (model, criterion), opt = bg.build_ours(variant, dev)
    images = bg.make_images(batch, h, w, dev)
    targets = bg.make_targets(batch, cfg.model.num_classes, dev)
    fine = bg.ours_step(model, criterion, opt, images, targets, dev, "fp32")
    ft = step_flops(fine.fwd_bwd)
    del model, criterion, opt, fine
    pcfg, task, popt = bg.build_pretrain(variant, dev, None)
    s = pcfg.pretrain.siamese
    sb = bg.make_siamese_batch(batch, h, w, s.num_regions, s.crop_size, dev)
    pre = bg.pretrain_step(task, popt, sb, dev, "fp32")
    pt = step_flops(pre.fwd_bwd)
    return {"variant": variant, "batch": batch, "size": f"{h}x{w}",
            "finetune_gflop": round(ft, 1), "pretrain_gflop": round(pt, 1),
            "pretrain_over_finetune": round(pt / ft, 3),
            "per_view": round(pt / 2 / ft, 3),
            "regions": s.num_regions, "crop": s.crop_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="detr,conditional,deformable")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", default="800x1088")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    h, w = bg.parse_size(args.size)
    torch.manual_seed(0)
    rows = []
    print(f"batch {args.batch} at {h}x{w}, fp32, one forward and backward (GFLOP; matrix "
          "products and convolutions)")
    print(f"  {'detector':12s} {'fine-tuning':>12s} {'pretraining':>12s} {'ratio':>6s} "
          f"{'per view':>9s}")
    for variant in args.variants.split(","):
        r = measure(variant, args.batch, h, w)
        rows.append(r)
        print(f"  {variant:12s} {r['finetune_gflop']:12.1f} {r['pretrain_gflop']:12.1f} "
              f"{r['pretrain_over_finetune']:6.2f} {r['per_view']:9.2f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
