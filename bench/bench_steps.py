"""Step time and peak memory of one training step per variant at the tiny presets (CPU),
and of the paper-size models on CUDA when a GPU is present.

    python bench/bench_steps.py [--iters 5] [--paper]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from siamese_detr.losses.set_criterion import build_criterion, num_logits
from siamese_detr.methods.siamese.task import build_siamese_task
from siamese_detr.models.detector import build_detector
from siamese_detr.presets import get_preset
from siamese_detr.structures import BoxTargets, ImageBatch


def fake_siamese_batch(b: int, size: int, m: int, crop: int):
    from siamese_detr.methods.siamese.data import SiameseBatch

    def images() -> ImageBatch:
        return ImageBatch(torch.randn(b, 3, size, size), torch.zeros(b, size, size, dtype=bool),
                          torch.tensor([[size, size]] * b))

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(b, m, 2, generator=g) * size * 0.5
    boxes = torch.cat([xy, xy + size * 0.4], -1)
    crops = torch.randn(b, m, 3, crop, crop)
    return SiameseBatch(view1=images(), view2=images(), boxes1=boxes, boxes2=boxes.clone(),
                        crops1=crops, crops2=crops.clone(), image_ids=[str(i) for i in range(b)],
                        skipped=0)


def step(loss, optimizer) -> None:
    loss.total.backward()
    optimizer.step()
    optimizer.zero_grad()


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--variant", choices=["vanilla", "conditional", "deformable"], default=None,
                    help="one variant in this process (peak RSS is then per variant); default: "
                         "each variant in its own subprocess")
    args = ap.parse_args()
    if args.variant is None:
        import subprocess
        import sys

        for v in ("vanilla", "conditional", "deformable"):
            subprocess.run([sys.executable, __file__, "--variant", v, "--iters", str(args.iters),
                            "--size", str(args.size)], check=True)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[{args.variant}] device {device}, torch threads {torch.get_num_threads()}, "
          f"image {args.size}px")
    for variant in (args.variant,):
        cfg = get_preset(f"tiny/{variant}/siamese")
        task = build_siamese_task(cfg).to(device)
        opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
        batch = fake_siamese_batch(cfg.pretrain.batch_size, args.size,
                                   cfg.pretrain.siamese.num_regions,
                                   cfg.pretrain.siamese.crop_size).to(device)

        t_pre = timed(lambda t=task, o=opt, x=batch: step(t(x), o), args.iters)
        fcfg = get_preset(f"tiny/{variant}/finetune")
        det = build_detector(fcfg.model, num_logits(fcfg.model, fcfg.loss)).to(device)
        crit = build_criterion(fcfg.model, fcfg.loss)
        fopt = torch.optim.AdamW([p for p in det.parameters() if p.requires_grad], lr=1e-4)
        b = fcfg.data.batch_size
        images = ImageBatch(torch.randn(b, 3, args.size, args.size),
                            torch.zeros(b, args.size, args.size, dtype=bool),
                            torch.tensor([[args.size, args.size]] * b)).to(device)
        targets = [BoxTargets(torch.tensor([[0.5, 0.5, 0.4, 0.4]]), torch.tensor([1])).to(device)
                   for _ in range(b)]

        t_ft = timed(lambda c=crit, d=det, x=images, y=targets, o=fopt: step(c(d(x), y)[0], o),
                     args.iters)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{variant:12s} pretrain step {t_pre:.3f} s (batch {cfg.pretrain.batch_size}) | "
              f"finetune step {t_ft:.3f} s (batch {b}) | process peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
