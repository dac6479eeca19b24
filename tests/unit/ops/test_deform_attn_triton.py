"""The fused Triton deformable-attention kernels against the grid_sample path.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, tiny shapes); the
``gpu`` tests compile them on CUDA at a Deformable-DETR decoder size. Tolerances: float32
outputs and gradients within 1e-5 relative to their largest magnitude (the two paths sum in
different orders); bfloat16 value maps within 2e-2 relative.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import siamese_detr
from siamese_detr.ops import deform_attn
from siamese_detr.ops.deform_attn import ms_deform_attn, shapes_tensor

pytest.importorskip("triton")


def _inputs(levels, B, Q, H, Dh, P, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S, L = int(shapes.prod(1).sum()), len(levels)
    value = torch.randn(B, S, H, Dh, generator=g)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.2 - 0.1  # some points off the map
    w = torch.rand(B, Q, H, L * P, generator=g).softmax(-1).view(B, Q, H, L, P)
    return [t.to(device) for t in (value, shapes, starts, loc, w)]


def _fwd_bwd(fn, value, shapes, starts, loc, w, grad):
    xs = [t.detach().clone().requires_grad_(True) for t in (value, loc, w)]
    out = fn(xs[0], shapes, starts, xs[1], xs[2])
    out.backward(grad.to(out.dtype))
    return out.float(), [x.grad.float() for x in xs]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


_INTERPRETED = """
import json, sys
import torch
sys.path.insert(0, {here!r})
import test_deform_attn_triton as t
from siamese_detr.ops import deform_attn_triton as k
from siamese_detr.ops.deform_attn_triton import ms_deform_attn_triton
got = {{"fp32": t.compare_fp32(ms_deform_attn_triton),
        "bf16": t.compare_bf16(ms_deform_attn_triton),
        "integer": t.compare_on_integer_pixels(ms_deform_attn_triton)}}
# the launch settings bench/bench_deform_bwd.py sweeps: 2 queries per program (3 programs
# for 5 queries, the last one masked), 1 and 2 warps
k._FWD_BQ, k._FWD_WARPS, k._BWD_BQ, k._BWD_WARPS = 2, 1, 2, 2
got["fp32_bq2"] = t.compare_fp32(ms_deform_attn_triton)
# the backward's merged value-gradient rows (tl.dot needs 16 queries per program): on every
# level, then from level 1 on; and tokens crowding the same pixels, with and without merging
k._BWD_BQ, k._BWD_MERGE_FROM = 16, 0
got["merge_all"] = t.compare_fp32(ms_deform_attn_triton)
got["merge_bf16"] = t.compare_bf16(ms_deform_attn_triton)
got["crowded_merge"] = t.compare_crowded(ms_deform_attn_triton)
k._BWD_MERGE_FROM = 1
got["merge_from_1"] = t.compare_fp32(ms_deform_attn_triton)
k._BWD_MERGE_FROM = 99
got["crowded"] = t.compare_crowded(ms_deform_attn_triton)
print(json.dumps(got))
"""


def compare_fp32(kernel) -> dict[str, float]:
    """Relative max errors of ``kernel`` against the grid_sample path, float32."""
    levels = [(5, 7), (3, 4), (2, 3), (1, 2)]
    value, shapes, starts, loc, w = _inputs(levels, B=2, Q=5, H=2, Dh=4, P=2)
    grad = torch.randn(2, 5, 2 * 4, generator=torch.Generator().manual_seed(3))
    ref, ref_grads = _fwd_bwd(ms_deform_attn, value, shapes, starts, loc, w, grad)
    out, grads = _fwd_bwd(kernel, value, shapes, starts, loc, w, grad)
    errs = {"out": _rel(out, ref), "nonzero": float(out.abs().sum() > 0)}
    for name, a, b in zip(("value", "locations", "weights"), grads, ref_grads):
        errs[name] = _rel(a, b)
    return errs


def compare_bf16(kernel) -> dict[str, float]:
    """bfloat16 value map (float32 locations and weights) against the float32 path."""
    levels = [(4, 6), (2, 3)]
    value, shapes, starts, loc, w = _inputs(levels, B=1, Q=4, H=2, Dh=8, P=3, seed=1)
    grad = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(4))
    ref, ref_grads = _fwd_bwd(ms_deform_attn, value, shapes, starts, loc, w, grad)
    xs = [value.bfloat16().requires_grad_(True), loc.clone().requires_grad_(True),
          w.clone().requires_grad_(True)]
    out = kernel(xs[0], shapes, starts, xs[1], xs[2])
    out.backward(grad.bfloat16())
    errs = {"out": _rel(out.float(), ref), "out_is_bf16": float(out.dtype == torch.bfloat16),
            "grad_dtypes_ok": float(xs[0].grad.dtype == torch.bfloat16
                                    and xs[1].grad.dtype == torch.float32)}
    for name, a, b in zip(("value", "locations", "weights"), [x.grad.float() for x in xs],
                          ref_grads):
        errs[name] = _rel(a, b)
    return errs


def compare_crowded(kernel) -> dict[str, float]:
    """40 queries (three programs of 16, the last part-masked) sampling within half a pixel
    of the same place on a 3x4 and a 1x2 level, some points off the map: most corners of a
    program land on pixels that others of it hit too (``shared``: the fraction of in-map
    (query, point, corner) hits whose pixel another query of the same program hits)."""
    levels = [(3, 4), (1, 2)]
    value, shapes, starts, loc, w = _inputs(levels, B=1, Q=40, H=2, Dh=4, P=2, seed=2)
    g = torch.Generator().manual_seed(5)
    loc = 0.45 + 0.25 * torch.rand(loc.shape, generator=g)
    loc[:, ::7, :, :, 0, 0] = 1.2  # off the map on the right
    grad = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(6))
    ref, ref_grads = _fwd_bwd(ms_deform_attn, value, shapes, starts, loc, w, grad)
    out, grads = _fwd_bwd(kernel, value, shapes, starts, loc, w, grad)
    errs = {"out": _rel(out, ref)}
    for name, a, b in zip(("value", "locations", "weights"), grads, ref_grads):
        errs[name] = _rel(a, b)
    hw = shapes.flip(1).to(loc).view(1, 1, 1, 2, 1, 2)  # (w, h) per level
    base = (loc * hw - 0.5).floor().long()  # [B, Q, H, L, P, 2]
    hits, shared = 0, 0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xy = base + torch.tensor([dx, dy])
        inside = ((xy >= 0) & (xy < hw.long())).all(-1)  # [B, Q, H, L, P]
        key = torch.where(inside, xy[..., 1] * 100 + xy[..., 0], -1)
        for q in range(40):
            prog = range(q // 16 * 16, min(q // 16 * 16 + 16, 40))
            others = key[:, [o for o in prog if o != q]]  # [B, Q', H, L, P]
            mine = key[:, q : q + 1]
            hit = inside[:, q]
            # same head and level, any point of another query of the program
            same = (others.unsqueeze(-1) == mine.unsqueeze(-2)).any(-2).any(1)  # [B, H, L, P]
            hits += int(hit.sum())
            shared += int((same & hit).sum())
    errs["shared"] = shared / hits
    return errs


def compare_on_integer_pixels(kernel) -> dict[str, float]:
    """The x sampling coordinates of every other query on an integer pixel coordinate, where
    bilinear interpolation's x-derivative jumps: the outputs and the y-gradients still agree,
    the x-gradients agree away from those points (``near_integer_pixels``: the other queries'
    x coordinates), and there the two paths may take either one-sided derivative."""
    levels = [(5, 7), (3, 4)]
    value, shapes, starts, loc, w = _inputs(levels, B=1, Q=16, H=2, Dh=4, P=2)
    widths = shapes[:, 1].to(loc).view(1, 1, -1, 1)
    even = loc[:, ::2, ..., 0]  # [B, Q/2, H, L, P]
    pixel = (even * widths - 0.5).round().clamp(min=0.0)
    loc[:, ::2, ..., 0] = (torch.minimum(pixel, widths - 1) + 0.5) / widths
    grad = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(3))
    ref, ref_grads = _fwd_bwd(ms_deform_attn, value, shapes, starts, loc, w, grad)
    out, grads = _fwd_bwd(kernel, value, shapes, starts, loc, w, grad)
    near = deform_attn.near_integer_pixels(loc, shapes)
    scale = float(ref_grads[1].abs().max())
    diff = (grads[1] - ref_grads[1]).abs()
    return {"out": _rel(out, ref), "y": float(diff[..., 1].max()) / scale,
            "x_away": float(diff.masked_fill(near, 0.0).max()) / scale,
            "near_fraction": float(near[..., 0].float().mean()),
            "x_away_count": float((~near[..., 0]).sum())}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, float]]:
    """Both comparisons run in a fresh interpreter with ``TRITON_INTERPRET=1`` (Triton reads
    it when its language module is first imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    src = str(Path(siamese_detr.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    code = _INTERPRETED.format(here=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh Python with torch and Triton's interpreter: ~15 s here
def test_interpreted_kernels_match_grid_sample_path(interpreted) -> None:
    errs = interpreted["fp32"]
    assert errs.pop("nonzero") == 1.0
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.slow
def test_interpreted_kernels_with_other_launch_settings(interpreted) -> None:
    """Queries per program and warps are launch settings (swept by bench_deform_bwd.py):
    with 2 queries per program, several programs, the last one part-masked, give the same
    results."""
    errs = interpreted["fp32_bq2"]
    assert errs.pop("nonzero") == 1.0
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.slow
@pytest.mark.parametrize("case", ["merge_all", "merge_from_1", "crowded", "crowded_merge"])
def test_interpreted_backward_merging_rows_of_the_same_pixel(interpreted, case: str) -> None:
    """``_BWD_MERGE_FROM``: the value-gradient rows of a program's queries that hit one pixel
    are summed (a 0/1 matrix product) before one atomic add, on the levels from that one on.
    Same gradients as the grid_sample path, on random points and on crowded ones, where most
    hits share their pixel with another query of the program."""
    errs = dict(interpreted[case])
    errs.pop("nonzero", None)
    if case.startswith("crowded"):
        assert errs.pop("shared") > 0.9, errs
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.slow
def test_interpreted_merged_backward_bf16(interpreted) -> None:
    errs = interpreted["merge_bf16"]
    assert errs.pop("out_is_bf16") == 1.0 and errs.pop("grad_dtypes_ok") == 1.0
    assert all(e < 2e-2 for e in errs.values()), errs


@pytest.mark.slow
def test_interpreted_kernels_bf16_value_fp32_accumulation(interpreted) -> None:
    errs = interpreted["bf16"]
    assert errs.pop("out_is_bf16") == 1.0 and errs.pop("grad_dtypes_ok") == 1.0
    assert all(e < 2e-2 for e in errs.values()), errs


@pytest.mark.slow
def test_interpreted_location_gradient_at_integer_pixels(interpreted) -> None:
    """The premise of ``bench/gpu_checks``' masked location-gradient comparison."""
    errs = interpreted["integer"]
    # half of the x coordinates were put on an integer pixel (a random one lands within
    # 1e-3 of one with probability 2e-3), so the x comparison away from them has 64 entries
    assert 0.5 <= errs["near_fraction"] < 0.6 and errs["x_away_count"] >= 60, errs
    assert errs["out"] < 1e-5 and errs["y"] < 1e-5 and errs["x_away"] < 1e-5, errs


def test_near_integer_pixels() -> None:
    shapes = torch.tensor([[4, 10]])  # h 4, w 10: pixel = loc * (10, 4) - 0.5
    loc = torch.tensor([[0.25, 0.375], [0.2500004, 0.3], [0.31, 0.125]]).view(1, 3, 1, 1, 1, 2)
    near = deform_attn.near_integer_pixels(loc, shapes).view(3, 2)
    assert near.tolist() == [[True, True], [True, False], [False, True]]


def test_shapes_tensor_remembers_sizes_without_a_read() -> None:
    t = shapes_tensor([(3, 4), (1, 2)], torch.device("cpu"))
    assert t.tolist() == [[3, 4], [1, 2]] and t.dtype == torch.long
    assert deform_attn.level_sizes(t) == [(3, 4), (1, 2)]
    assert deform_attn.level_sizes(t.clone()) == [(3, 4), (1, 2)]  # read back when forgotten


def test_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not deform_attn.triton_enabled(torch.device("cpu"))
    monkeypatch.setenv(deform_attn.BACKEND_ENV, "torch")
    assert not deform_attn.triton_enabled(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge_from", [99, 0])
def test_cuda_kernels_match_grid_sample_path(monkeypatch: pytest.MonkeyPatch,
                                             dtype: torch.dtype, merge_from: int) -> None:
    """``merge_from`` 0: the backward merges the rows of one pixel on every level (tl.dot
    in tf32x3 on the tensor cores)."""
    import siamese_detr.ops.deform_attn_triton as kernels

    monkeypatch.setattr(kernels, "_BWD_MERGE_FROM", merge_from)
    levels = [(100, 150), (50, 75), (25, 38), (13, 19)]
    value, shapes, starts, loc, w = _inputs(levels, B=2, Q=300, H=8, Dh=32, P=4, device="cuda")
    grad = torch.randn(2, 300, 256, device="cuda")
    assert deform_attn.triton_enabled(value.device)
    out, grads = _fwd_bwd(ms_deform_attn, value.to(dtype), shapes, starts, loc, w, grad)
    monkeypatch.setenv(deform_attn.BACKEND_ENV, "torch")
    ref, ref_grads = _fwd_bwd(ms_deform_attn, value, shapes, starts, loc, w, grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(out, ref) < tol
    for name, a, b in zip(("value", "locations", "weights"), grads, ref_grads):
        assert _rel(a, b) < tol * (10 if name == "locations" else 1), name
    assert math.isfinite(float(out.sum()))


@pytest.mark.parametrize("broken", ["raises", "wrong"])
def test_self_test_falls_back_to_grid_sample(monkeypatch: pytest.MonkeyPatch,
                                             broken: str) -> None:
    import siamese_detr.ops.deform_attn_triton as kernels

    def bad(value, shapes, starts, loc, w):
        if broken == "raises":
            raise RuntimeError("no compiler for this GPU")
        return deform_attn._ms_deform_attn_torch(value, shapes, starts, loc, w) * 1.5

    monkeypatch.setattr(kernels, "ms_deform_attn_triton", bad)
    monkeypatch.setattr(deform_attn, "_SELF_TESTED", {})
    value, loc = torch.randn(1, 10, 2, 4), torch.rand(1, 3, 2, 2, 2, 2)
    with pytest.warns(UserWarning, match="using grid_sample"):
        assert not deform_attn._triton_works(value, loc)
    assert not deform_attn._triton_works(value, loc)  # remembered, no second warning
