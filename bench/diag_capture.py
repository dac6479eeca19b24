"""Which part of ``SiameseDETR.losses`` a CUDA graph cannot capture, and why.

Runs one pretraining step of the bench's DETR configuration (batch 8 at 480x480 on CUDA; a
small one on the CPU), keeps the losses' inputs, then for one part (``all``, ``crit``,
``region``, ``global``) runs it eagerly under ``torch.cuda.set_sync_debug_mode("error")`` (a
host read raises, with its traceback) and captures its forward into a bare ``CUDAGraph``
(``capture_error_mode="global"``). Run each part in its own process: a failed capture leaves
the process unusable. Session 8 found with it that torchvision's GIoU loss (boolean-mask
indexing) broke the criterion's capture.

    for p in all crit region global; do python bench/diag_capture.py $p; done
    python bench/diag_capture.py all cpu   # the CPU: the parts' values only
"""
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu as bg  # noqa: E402
import torch  # noqa: E402

from siamese_detr.matcher import Matching  # noqa: E402
from siamese_detr.methods.base import pixel_boxes_normalised  # noqa: E402
from siamese_detr.structures import DetectorOutput  # noqa: E402

part = sys.argv[1]
dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
torch.manual_seed(0)
cfg, task, opt = bg.build_pretrain("detr", dev, None if dev.type == "cuda" else 32)
s = cfg.pretrain.siamese
b, h, w = (8, 480, 480) if dev.type == "cuda" else (2, 64, 96)
sb = bg.make_siamese_batch(b, h, w, s.num_regions, s.crop_size, dev)
seen = []
inner = task.run_losses
task.run_losses = lambda *a: (seen.append(a), inner(*a))[1]
task.train()
task(sb).total.backward()
args = tuple(a.detach().clone().requires_grad_(a.requires_grad) if a is not None else None
             for a in seen[0])
logits, pred_boxes, hidden, emb, pooled, boxes, sizes, bi, pi, ti = args


def run() -> torch.Tensor:
    matching = Matching([], bi, pi, ti)
    if part == "all":
        return task.losses(*args)[0]
    if part == "crit":
        rows, m = int(boxes.shape[0]), int(boxes.shape[1])
        norm = pixel_boxes_normalised(boxes, sizes).flatten(0, 1)
        labels = torch.zeros(rows * m, dtype=torch.int64, device=dev)
        return task.criterion.loss_terms(logits, pred_boxes, labels, norm, matching,
                                         float(rows * m))[0]
    if part == "region":
        return task.region_loss(DetectorOutput(logits, pred_boxes, hidden), matching,
                                emb.roll(b, 0))
    return task._global_from_pooled(pooled[:b], pooled[b:])


print(part, "shapes", [tuple(a.shape) if a is not None else None for a in args], flush=True)
if dev.type == "cuda":
    torch.cuda.set_sync_debug_mode("error")
    try:
        run().backward()
        print(part, "eager under sync debug: ok", flush=True)
    except Exception:
        traceback.print_exc()
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="global"):
            out = run()
        print(part, "fwd capture: ok", flush=True)
    except Exception:
        traceback.print_exc()
else:
    print(part, float(run()))
