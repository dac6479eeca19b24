"""Where a training step's time goes, phase by phase: fine-tuning against Siamese pretraining.

Issue 13's last missed target is "the pretraining step at most 1.5x our fine-tuning step"
with ``engine.cuda_graphs`` on (1.66-1.82x on the H100 in session 7, while the eager steps
are at 1.11-1.48x). This bench says why. For each step kind (``ours``/``pretrain`` eager,
``ours_graphed``/``pretrain_graphed``) it runs steps with a device synchronisation between
four phases and reports, per phase, the wall time and the GPU kernel time inside it (one step
under ``torch.profiler``; kernels attributed to the phase whose synchronised window holds
them):

* ``dense_fwd``: the input preparation and the dense part's forward (a graph replay when
  graphed): backbone, transformer, and for pretraining the crops' frozen backbone;
* ``rest_fwd``: what follows until the loss: matching (the step's one host read), losses;
* ``backward``: the eager losses' backward and the dense part's backward (a graph replay);
* ``update``: gradient clipping and fused AdamW.

A phase whose wall time is much above its kernel time waits on the host (launches, Python,
the matching); one near it is bound by GPU work. The synchronisations cost a little, so the
sum of the phases is above the plain step time of ``bench_gpu.py``.

    PYTHONPATH=src python bench/bench_phases.py --variant detr --dtype bf16 --batch 8 \
        --size 480x480 --out phases.json
    PYTHONPATH=src python bench/bench_phases.py --device cpu --small   # CPU: a dry run

Times on a CPU or a shared machine are not results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu as bg  # noqa: E402

PHASES = ("dense_fwd", "rest_fwd", "backward", "update")


class PhaseStep:
    """One training step of a task (``DetectionTask`` or ``SiameseDETR``) with a device sync and
    a timestamp after each phase; ``marks`` holds the last step's ``perf_counter`` times."""

    def __init__(self, task: Any, opt: torch.optim.Optimizer, batch: Any,
                 device: torch.device, dtype: str) -> None:
        self.task, self.opt, self.batch, self.device, self.dtype = task, opt, batch, device, dtype
        self.marks: list[float] = []
        inner = task.run_dense

        def run_dense(*args: Any) -> Any:
            out = inner(*args)
            self._mark()
            return out

        task.run_dense = run_dense
        self.step = bg.Step(self._fwd_bwd, opt)

    def _mark(self) -> None:
        bg.sync(self.device)
        # a named instant that torch.profiler records on its own clock (kernel_split)
        with torch.profiler.record_function(f"phase_mark_{len(self.marks)}"):
            pass
        self.marks.append(time.perf_counter())

    def _fwd_bwd(self) -> None:
        with bg.autocast(self.device, self.dtype, weight_cache=False):
            loss = self.task(self.batch).total
        self._mark()
        loss.backward()
        self._mark()

    def __call__(self) -> list[float]:
        """Run one step; the four phase times in seconds."""
        self.marks = []
        self._mark()
        self.step.fwd_bwd()
        self.step.update()
        self._mark()
        m = self.marks
        return [m[i + 1] - m[i] for i in range(len(m) - 1)]


def kernel_split(step: PhaseStep, device: torch.device) -> dict[str, Any]:
    """One step under ``torch.profiler``: per phase its GPU kernel ms and kernel count (CUDA),
    plus the heaviest kernels of the whole step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    top: dict[str, float] = {}
    for e in events:
        top[e.name[:70]] = top.get(e.name[:70], 0.0) + e.time_range.elapsed_us()
    out: dict[str, Any] = {
        "kernel_ms": sum(e.time_range.elapsed_us() for e in events) / 1e3,
        "kernels": len(events),
        "top_kernels_ms": {k: round(v / 1e3, 3) for k, v in
                           sorted(top.items(), key=lambda kv: -kv[1])[:15]},
    }
    # each phase ends with a device sync, then a named mark: the kernels that start between
    # two marks (the profiler's clock, shared by host and device events) are that phase's
    marks = sorted(e.time_range.start for e in prof.events()
                   if e.name.startswith("phase_mark_"))
    if len(marks) == len(PHASES) + 1:
        per = {p: [0.0, 0] for p in PHASES}
        for e in events:
            for i, p in enumerate(PHASES):
                if marks[i] <= e.time_range.start < marks[i + 1]:
                    per[p][0] += e.time_range.elapsed_us() / 1e3
                    per[p][1] += 1
        out["phase_kernel_ms"] = {p: round(v[0], 3) for p, v in per.items()}
        out["phase_kernels"] = {p: v[1] for p, v in per.items()}
    return out


def build_steps(args: argparse.Namespace, device: torch.device
                ) -> dict[str, Callable[[], PhaseStep]]:
    from siamese_detr.methods.supervised import DetectionTask

    b, (h, w) = args.batch, args.size
    makers: dict[str, Callable[[], PhaseStep]] = {}

    def finetune(graphed: bool) -> PhaseStep:
        cfg, (model, criterion), opt = bg.build_ours(args.variant, device)
        task = DetectionTask(model, criterion)
        if graphed:
            task.enable_cuda_graphs(max_graphs=4, pad_multiple=32)
        images = bg.make_images(b, h, w, device)
        targets = bg.make_targets(b, cfg.model.num_classes, device)
        return PhaseStep(task, opt, (images, targets), device, args.dtype)

    def pretrain(graphed: bool, losses_graph: bool = True, **build: Any) -> PhaseStep:
        cfg, task, opt = bg.build_pretrain(args.variant, device, args.crop, **build)
        if graphed:
            # losses_graph False: the losses after the matching eager (before session 8)
            task.enable_cuda_graphs(max_graphs=4, pad_multiple=32, losses=losses_graph)
        s = cfg.pretrain.siamese
        batch = bg.make_siamese_batch(b, h, w, s.num_regions, s.crop_size, device)
        return PhaseStep(task, opt, batch, device, args.dtype)

    makers["ours"] = lambda: finetune(False)
    makers["pretrain"] = lambda: pretrain(False)
    if device.type == "cuda":
        makers["ours_graphed"] = lambda: finetune(True)
        makers["pretrain_graphed"] = lambda: pretrain(True)
        makers["pretrain_graphed_dense_only"] = lambda: pretrain(True, losses_graph=False)
        # the frozen trunk as cuDNN's fused convolutions, in channels-last memory
        makers["pretrain_graphed_cl_fused"] = lambda: pretrain(True, channels_last=True,
                                                               fused=True)
    return makers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="images 64x96, crops 32 (CPU sizes)")
    ap.add_argument("--variant", default="detr", choices=list(bg.VARIANTS))
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 (default bf16 on CUDA)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", default=None, help="HxW (default 800x1088; 64x96 with --small)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-fused", action="store_true",
                    help="leave out the rows with model.backbone.fused_conv_relu")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.size = bg.parse_size(args.size or ("64x96" if args.small else "800x1088"))
    args.crop = 32 if args.small else None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)

    result: dict[str, Any] = {
        "argv": sys.argv, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "variant": args.variant, "dtype": args.dtype, "batch": args.batch,
        "size_hw": list(args.size), "rows": {}}

    def flush() -> None:
        if args.out:
            tmp = Path(args.out + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(args.out)

    steps: dict[str, PhaseStep] = {}
    for k, make in build_steps(args, device).items():
        if k.endswith("_fused") and args.no_fused:
            continue
        try:
            steps[k] = make()
        except Exception as e:  # a row less (e.g. a capture that fails), not a failed bench
            result.setdefault("errors", {})[k] = repr(e)
            print(f"!! {k} could not be built: {e!r}")
    times: dict[str, list[list[float]]] = {k: [] for k in steps}
    names = list(steps)
    for i in range(args.warmup + args.steps):  # interleaved, rotating order
        for k in names[i % len(names):] + names[:i % len(names)]:
            try:
                phases = steps[k]()
            except Exception as e:  # drop the row, keep timing the others
                result.setdefault("errors", {})[k] = repr(e)
                print(f"!! {k} failed: {e!r}")
                names.remove(k)
                continue
            if i >= args.warmup:
                times[k].append(phases)
    print(f"{args.variant} {args.dtype}: batch {args.batch} at {args.size[0]}x{args.size[1]} "
          f"on {result['device']} (ms, median of {args.steps}; kernel ms from one profiled "
          "step)")
    for k in names:
        med = [1e3 * statistics.median(t[j] for t in times[k]) for j in range(len(PHASES))]
        row: dict[str, Any] = {"phase_ms": dict(zip(PHASES, med)), "total_ms": sum(med)}
        if device.type == "cuda":
            try:
                row.update(kernel_split(steps[k], device))
            except Exception as e:  # a figure less, not a failed bench
                row["profile_error"] = repr(e)
        result["rows"][k] = row
        flush()
        kern = row.get("phase_kernel_ms", {})
        cells = "  ".join(f"{p} {row['phase_ms'][p]:6.1f}"
                          + (f" ({kern[p]:5.1f})" if p in kern else "") for p in PHASES)
        print(f"  {k:27s} total {row['total_ms']:6.1f}  {cells}")
    for a, b in (("pretrain", "ours"), ("pretrain_graphed", "ours_graphed")):
        if a in result["rows"] and b in result["rows"]:
            ra, rb = result["rows"][a], result["rows"][b]
            line = {p: round(ra["phase_ms"][p] - rb["phase_ms"][p], 2) for p in PHASES}
            result[f"{a}_minus_{b}_ms"] = line
            print(f"  {a} - {b}: " + ", ".join(f"{p} {v:+.1f}" for p, v in line.items()))
    flush()


if __name__ == "__main__":
    main()
