"""Benchmark of the pure-PyTorch multi-scale deformable attention.

Prints forward+backward time of ``ms_deform_attn`` at a Deformable-DETR decoder size
(B=2, Q=300, H=8, L=4, P=4, Dh=32, levels 100x150 / 50x75 / 25x38 / 13x19) on CPU and, when
available, CUDA; then the max abs difference against the loop reference on a small case.

    python bench/bench_deform_attn.py [--repeats 5] [--queries 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from siamese_detr.ops.deform_attn import ms_deform_attn, ms_deform_attn_reference

LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]


def make_inputs(levels, B, Q, H, Dh, P, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S = int(shapes.prod(1).sum())
    L = len(levels)
    value = torch.randn(B, S, H, Dh, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    w = torch.rand(B, Q, H, L * P, generator=g, dtype=dtype).softmax(-1).view(B, Q, H, L, P)
    return [t.to(device) for t in (value, shapes, start, loc, w)]


def bench(device: str, B: int, Q: int, repeats: int) -> None:
    value, shapes, start, loc, w = make_inputs(LEVELS, B, Q, 8, 32, 4, device)
    for t in (value, loc, w):
        t.requires_grad_(True)

    def step() -> None:
        out = ms_deform_attn(value, shapes, start, loc, w)
        out.sum().backward()

    step()  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"{device:5s} B={B} Q={Q} H=8 L=4 P=4 Dh=32 S={value.shape[1]}: "
          f"fwd+bwd median {1e3 * times[len(times) // 2]:.2f} ms, min {1e3 * times[0]:.2f} ms "
          f"({repeats} runs)")


def parity() -> None:
    levels = [(5, 7), (3, 4), (2, 3), (1, 2)]
    value, shapes, start, loc, w = make_inputs(levels, 2, 4, 2, 3, 2, "cpu", torch.float64)
    out = ms_deform_attn(value, shapes, start, loc, w)
    ref = ms_deform_attn_reference(value, shapes, start, loc, w)
    print(f"parity vs loop reference (float64, small case): max abs diff "
          f"{(out - ref).abs().max().item():.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench("cpu", args.batch, args.queries, args.repeats)
    if torch.cuda.is_available():
        bench("cuda", args.batch, args.queries, args.repeats)
    parity()


if __name__ == "__main__":
    main()
