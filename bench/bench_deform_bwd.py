"""The fused Triton deformable-attention kernels at a Deformable DETR encoder's size, and a
sweep of their launch settings (queries per program, warps per program).

Session 8's H100 profile put the backward of the deformable attention at 37.5 ms of a
graphed Deformable DETR pretraining step (batch 2, two views of 800x1088) against 20.0 ms in
fine-tuning: the step is mostly that kernel. My estimate, not yet a measurement: its cost is
the value gradient, added with float32 atomics, and in the encoder the atomics collide.
Every token samples near its own position on every level, so the 221 pixels of the coarsest
level (13x17) take the adds of all 18k tokens. The ``bench_deform_attn.py`` inputs (points
uniform over the maps) do not show this, so the inputs here are an encoder's:

* queries: every token of the four levels (stride 8 to 64 of an HxW image);
* sampling points: the token's centre plus offsets uniform within ``--spread`` pixels of each
  level (``--uniform``: uniform over the maps instead, as a decoder's; ``--init-offsets``:
  the offsets of an untrained layer, point ``p`` of head ``h`` at ``p + 1`` pixels in the
  head's direction on every level);
* attention weights: a softmax over the ``L * P`` points of a head.

For every launch setting it times the forward and the backward apart (CUDA events, median of
``--repeats``) and checks the gradients against the default setting's (the atomics add in
another order: float32 within 1e-4 relative). ``--sem relaxed,acq_rel`` times the atomics'
memory order both ways (``_BWD_ATOMIC_SEM``; acq_rel is Triton's default and was this
kernel's until session 10: ``bench/deform_sass.py`` shows what it compiles to).
``--merge-from`` adds the backward's merged value-gradient rows (``_BWD_MERGE_FROM``: a
program's queries that hit one pixel add one summed row, on the levels from that one on;
needs 16 or more queries per program) to the sweep. Prints a table and the fastest
setting, and writes ``--out`` (JSON) if given.

    python bench/bench_deform_bwd.py [--batch 4] [--size 800x1088] [--dtype bf16]
    python bench/bench_deform_bwd.py --device cpu --small   # Triton's interpreter, tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def encoder_inputs(b: int, h: int, w: int, heads: int, dh: int, points: int, spread: float,
                   uniform: bool, device: Any, dtype: Any, seed: int = 0,
                   init_offsets: bool = False) -> list[Any]:
    """``(value, shapes, starts, locations, weights)`` of one encoder layer."""
    import torch

    from siamese_detr.ops.deform_attn import MSDeformAttn

    g = torch.Generator().manual_seed(seed)
    levels = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64)]
    shapes = torch.tensor(levels, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S, L = int(shapes.prod(1).sum()), len(levels)
    # reference points: the centres of all tokens, level after level, normalised
    refs = torch.cat([torch.stack(torch.meshgrid((torch.arange(lw) + 0.5) / lw,
                                                 (torch.arange(lh) + 0.5) / lh,
                                                 indexing="xy"), -1).reshape(-1, 2)
                      for lh, lw in levels])  # [S, 2] (x, y)
    sizes = shapes.flip(1).to(torch.float32)  # [L, 2] (w, h)
    if uniform:
        loc = torch.rand(b, S, heads, L, points, 2, generator=g)
    elif init_offsets:  # an untrained layer's: its offsets are its bias (weights 0)
        layer = MSDeformAttn(heads * dh, L, heads, points)
        offsets = layer.sampling_offsets.bias.detach().view(1, 1, heads, L, points, 2)
        loc = refs.view(1, S, 1, 1, 1, 2) + offsets / sizes.view(1, 1, 1, L, 1, 2)
        loc = loc.expand(b, S, heads, L, points, 2).contiguous()
    else:
        offsets = (torch.rand(b, S, heads, L, points, 2, generator=g) * 2 - 1) * spread
        loc = refs.view(1, S, 1, 1, 1, 2) + offsets / sizes.view(1, 1, 1, L, 1, 2)
    weights = torch.randn(b, S, heads, L * points, generator=g).softmax(-1)
    value = torch.randn(b, S, heads, dh, generator=g)
    return [value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device),
            weights.view(b, S, heads, L, points).to(device)]


def atomic_rows(loc: Any, shapes: Any, block_q: int) -> list[dict[str, float]]:
    """Per level, the value-gradient rows the backward adds atomically for one image: one per
    in-map (query, head, point, corner), and with merging, one per distinct pixel among a
    program's ``block_q`` queries (for one head, point and corner: what one ``tl.dot``
    merges). Counted on the CPU from the sampling locations alone."""
    import torch

    loc = loc[:1].float().cpu()  # [1, Q, H, L, P, 2]
    _, Q, H, L, P, _ = loc.shape
    prog = (torch.arange(Q) // block_q).view(Q, 1, 1)
    head_point = torch.arange(H * P).view(1, H, P)
    rows = []
    for lvl in range(L):
        hl, wl = (int(v) for v in shapes[lvl])
        x = loc[0, :, :, lvl, :, 0] * wl - 0.5  # [Q, H, P]
        y = loc[0, :, :, lvl, :, 1] * hl - 0.5
        x0, y0 = x.floor().long(), y.floor().long()
        total = distinct = 0
        for c, (dx, dy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl)
            key = ((prog * (H * P) + head_point) * 4 + c) * (hl * wl) + yi * wl + xi
            total += int(inside.sum())
            distinct += int(torch.unique(key[inside]).numel())
        rows.append({"level": lvl, "size": f"{hl}x{wl}", "rows": total, "merged_rows": distinct,
                     "left": distinct / max(total, 1)})
    return rows


def timed(fn: Any, device: Any, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall time on a CPU)."""
    import torch

    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--small", action="store_true",
                    help="one 32x64 image, one launch setting (a dry run in the interpreter)")
    ap.add_argument("--batch", type=int, default=4, help="images (pretraining: 2 x 2 views)")
    ap.add_argument("--size", default="800x1088")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--spread", type=float, default=4.0,
                    help="sampling offsets uniform within this many pixels of each level")
    ap.add_argument("--uniform", action="store_true", help="points uniform over the maps")
    ap.add_argument("--init-offsets", action="store_true",
                    help="the sampling offsets of an untrained layer")
    ap.add_argument("--block-q", default="16,32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--merge-from", default="99",
                    help="backward merging from this level on (99: never), comma-separated")
    ap.add_argument("--vec", default="4",
                    help="backward elements per thread along a row (_BWD_VEC: 4 on Hopper; "
                         "1 for Ampere's scalar atomics), comma-separated")
    ap.add_argument("--sem", default="relaxed",
                    help="memory order of the value-gradient atomics, comma-separated "
                         "(relaxed, acq_rel: Triton's default)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rows-only", action="store_true",
                    help="only count the atomic rows merging would leave (CPU, no kernels)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cpu":  # Triton reads this when its language module is first imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from siamese_detr.ops import deform_attn_triton as kernels

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu" and not args.rows_only:
            sys.exit("bench_deform_bwd: no GPU here; run it with --device cpu --small (Triton's "
                     "interpreter)")
    device = torch.device(args.device)
    if args.small:
        args.batch, args.size, args.repeats = 1, "32x64", 1
        args.block_q, args.warps = "16", "4"
        args.merge_from = ",".join(sorted({"99", *args.merge_from.split(",")}))
    h, w = (int(v) for v in args.size.lower().split("x"))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    value, shapes, starts, loc, weights = encoder_inputs(
        args.batch, h, w, 8, 32, 4, args.spread, args.uniform, device, dtype,
        init_offsets=args.init_offsets)
    grad_out = torch.randn(value.shape[0], loc.shape[1], 8 * 32, device=device, dtype=dtype)
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, weights)]

    def forward() -> Any:
        return kernels.ms_deform_attn_triton(leaves[0], shapes, starts, leaves[1], leaves[2])

    def backward() -> list[Any]:
        out = forward()
        return list(torch.autograd.grad(out, leaves, grad_out))

    points = ("uniform points" if args.uniform else "an untrained layer's points"
              if args.init_offsets else f"points within {args.spread} px")
    result: dict[str, Any] = {"argv": sys.argv, "torch": torch.__version__,
                              "device": (torch.cuda.get_device_name(device)
                                         if device.type == "cuda" else "cpu (interpreter)"),
                              "tokens": int(loc.shape[1]), "rows": []}
    defaults = (kernels._FWD_BQ, kernels._FWD_WARPS, kernels._BWD_BQ, kernels._BWD_WARPS,
                kernels._BWD_MERGE_FROM, kernels._BWD_ATOMIC_SEM, kernels._BWD_VEC)
    if args.rows_only:  # from the locations alone (the same on any device): no kernel runs
        result["atomic_rows"] = {}
        for bq in sorted({int(v) for v in args.block_q.split(",")}):
            stats = atomic_rows(loc, shapes, bq)
            result["atomic_rows"][bq] = stats
            total = sum(r["rows"] for r in stats)
            merged = sum(r["merged_rows"] for r in stats)
            print(f"  atomic value-gradient rows per image, merged in programs of {bq:3d} "
                  f"queries: {merged / total:.3f} of {total} left; per level "
                  + ", ".join(f"{r['size']} {r['left']:.3f}" for r in stats))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return
    reference = [g.float() for g in backward()]
    print(f"{result['device']}: encoder of {args.batch} images at {h}x{w} ({loc.shape[1]} "
          f"tokens, 8 heads, 4 levels x 4 points, {args.dtype} values, "
          f"{points}); "
          f"defaults BQ {defaults[0]}/{defaults[2]}, warps {defaults[1]}/{defaults[3]}")
    try:
        for vec, sem, bq, warps, merge in itertools.product(
                [int(v) for v in args.vec.split(",")],
                args.sem.split(","), [int(v) for v in args.block_q.split(",")],
                [int(v) for v in args.warps.split(",")],
                [int(v) for v in args.merge_from.split(",")]):
            if merge < 4 and bq < 16:
                continue  # tl.dot: 16 queries per program at least
            kernels._FWD_BQ, kernels._FWD_WARPS = bq, warps
            kernels._BWD_BQ, kernels._BWD_WARPS = bq, warps
            kernels._BWD_MERGE_FROM, kernels._BWD_ATOMIC_SEM = merge, sem
            kernels._BWD_VEC = vec
            label = (f"{sem:7s} BQ {bq:4d} warps {warps}" + (f" vec {vec}" if vec != 4 else "")
                     + (f" merge from {merge}" if merge < 4 else ""))
            try:
                grads = backward()  # compiles this setting
                fwd_ms = timed(forward, device, args.repeats)
                total_ms = timed(backward, device, args.repeats)
            except Exception as e:  # a setting the kernel cannot take (registers, shared)
                print(f"  {label}: failed ({e!r})")
                continue
            err = max(float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12))
                      for a, b in zip(grads, reference))
            row = {"vec": vec, "sem": sem, "block_q": bq, "warps": warps, "merge_from": merge,
                   "fwd_ms": fwd_ms,
                   "bwd_ms": total_ms - fwd_ms, "fwd_bwd_ms": total_ms, "max_rel_diff": err}
            result["rows"].append(row)
            print(f"  {label}: forward {fwd_ms:8.2f} ms  backward "
                  f"{row['bwd_ms']:8.2f} ms  (gradients vs default: {err:.1e})", flush=True)
    finally:
        (kernels._FWD_BQ, kernels._FWD_WARPS, kernels._BWD_BQ, kernels._BWD_WARPS,
         kernels._BWD_MERGE_FROM, kernels._BWD_ATOMIC_SEM, kernels._BWD_VEC) = defaults
    if result["rows"]:
        best_f = min(result["rows"], key=lambda r: r["fwd_ms"])
        best_b = min(result["rows"], key=lambda r: r["bwd_ms"])
        result["best"] = {"forward": best_f, "backward": best_b}
        print(f"fastest forward: BQ {best_f['block_q']} warps {best_f['warps']} "
              f"({best_f['fwd_ms']:.2f} ms); fastest backward: {best_b['sem']} BQ "
              f"{best_b['block_q']} warps {best_b['warps']} vec {best_b['vec']} merge from "
              f"{best_b['merge_from']} ({best_b['bwd_ms']:.2f} ms)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
