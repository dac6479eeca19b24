"""Fused multi-scale deformable attention core in Triton (forward and backward).

Same contract as :func:`siamese_detr.ops.deform_attn.ms_deform_attn` (shapes and sampling
convention in that module's docstring), computed in one kernel per direction instead of one
``grid_sample`` per level plus a weighted sum:

* forward: one program per (batch, head, block of queries); for every level and point it
  reads the location, the four bilinear neighbours' ``Dh``-channel value rows (zero outside
  the map) and accumulates ``weight * bilinear`` in float32 registers; one write of
  ``[B, Q, H*Dh]`` in the value's dtype. The level shapes are read on the device, so the
  host never needs ``spatial_shapes``' values (no sync).
* backward: recomputes the same geometry; gradient of the attention weights (dot of the
  output gradient with the sampled row), of the locations (through the bilinear weights,
  times the level's width / height) and of the value (float32 atomic adds into a float32
  buffer, cast to the value's dtype at the end). The adds are relaxed: on Hopper they compile
  to fire-and-forget vector reductions (``REDG...F32x4``), where Triton's default order
  (acq_rel) put a GPU-wide memory barrier before each and an L1 invalidation after it
  (``bench/deform_sass.py`` reads the machine code without a GPU).

Dtypes: ``value`` float32 / bfloat16 / float16 is read as is (bfloat16 under autocast: no
float32 copy of the value map); locations are used in float32 (bfloat16 would put sampling
points off by up to a third of a pixel on a 150-pixel level); weights in their own dtype;
all arithmetic and accumulation in float32.

The kernels run on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["ms_deform_attn_triton"]


@triton.jit
def _pixel(yi, xi, hl, wl, start, qm):
    """The flat index of integer pixel (yi, xi) of one level, and whether it is on the map."""
    return start + yi * wl + xi, qm & (yi >= 0) & (yi < hl) & (xi >= 0) & (xi < wl)


@triton.jit
def _corner(v_base, yi, xi, hl, wl, start, qm, ds, dm, H: tl.constexpr, D: tl.constexpr):
    """Pointers and mask of the value rows at integer pixel (yi, xi) of one level."""
    s, valid = _pixel(yi, xi, hl, wl, start, qm)
    ptrs = v_base + (s * (H * D))[:, None] + ds[None, :]
    return ptrs, valid[:, None] & dm[None, :]


@triton.jit
def _fwd_kernel(value, shapes, starts, loc, attw, out, S, Q,
                H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                BQ: tl.constexpr, BD: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qs = pid_q * BQ + tl.arange(0, BQ)
    qm = qs < Q
    ds = tl.arange(0, BD)
    dm = ds < D
    v_base = value + b.to(tl.int64) * S * H * D + h * D
    row = ((b * Q + qs) * H + h).to(tl.int64)
    acc = tl.zeros((BQ, BD), dtype=tl.float32)
    for lvl in tl.static_range(L):
        hl = tl.load(shapes + 2 * lvl).to(tl.int32)
        wl = tl.load(shapes + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts + lvl).to(tl.int32)
        for p in tl.static_range(P):
            idx = row * (L * P) + lvl * P + p
            lx = tl.load(loc + 2 * idx, mask=qm, other=0.0).to(tl.float32)
            ly = tl.load(loc + 2 * idx + 1, mask=qm, other=0.0).to(tl.float32)
            a = tl.load(attw + idx, mask=qm, other=0.0).to(tl.float32)
            x = lx * wl.to(tl.float32) - 0.5
            y = ly * hl.to(tl.float32) - 0.5
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            ptrs, m = _corner(v_base, y0, x0, hl, wl, start, qm, ds, dm, H, D)
            acc += (a * (1 - fy) * (1 - fx))[:, None] * tl.load(ptrs, mask=m, other=0.0).to(
                tl.float32)
            ptrs, m = _corner(v_base, y0, x0 + 1, hl, wl, start, qm, ds, dm, H, D)
            acc += (a * (1 - fy) * fx)[:, None] * tl.load(ptrs, mask=m, other=0.0).to(
                tl.float32)
            ptrs, m = _corner(v_base, y0 + 1, x0, hl, wl, start, qm, ds, dm, H, D)
            acc += (a * fy * (1 - fx))[:, None] * tl.load(ptrs, mask=m, other=0.0).to(
                tl.float32)
            ptrs, m = _corner(v_base, y0 + 1, x0 + 1, hl, wl, start, qm, ds, dm, H, D)
            acc += (a * fy * fx)[:, None] * tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    optrs = out + (row * D)[:, None] + ds[None, :]
    tl.store(optrs, acc.to(out.dtype.element_ty), mask=qm[:, None] & dm[None, :])


@triton.jit
def _bwd_corner(acc_a, acc_x, acc_y, g, a, cw, dcx, dcy, v_base, gv_base, yi, xi, hl, wl, start,
                qm, ds, dm, H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr,
                MERGE: tl.constexpr, SEM: tl.constexpr):
    ptrs, m = _corner(v_base, yi, xi, hl, wl, start, qm, ds, dm, H, D)
    v = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    gv = tl.sum(g * v, axis=1)
    gptrs, _ = _corner(gv_base, yi, xi, hl, wl, start, qm, ds, dm, H, D)
    contrib = (a * cw)[:, None] * g
    if MERGE:
        # the program's queries that hit the same pixel add their rows here first, and only
        # the first of them adds the sum to memory: one atomic row per distinct pixel instead
        # of one per query (the rows of a coarse level collide: neighbouring tokens sample it
        # at the same pixels). Off-map corners get keys of their own and add nothing.
        qi = tl.arange(0, BQ)
        s, valid = _pixel(yi, xi, hl, wl, start, qm)
        key = tl.where(valid, s, -1 - qi)
        same = key[:, None] == key[None, :]  # [BQ, BQ], symmetric
        first = tl.max((same & (qi[None, :] < qi[:, None])).to(tl.int32), axis=1) == 0
        contrib = tl.dot(same.to(tl.float32), tl.where(valid[:, None], contrib, 0.0),
                         input_precision="tf32x3")
        m = m & first[:, None]
    tl.atomic_add(gptrs, contrib, mask=m, sem=SEM)
    return acc_a + cw * gv, acc_x + dcx * gv, acc_y + dcy * gv


@triton.jit
def _bwd_kernel(value, shapes, starts, loc, attw, grad_out, grad_value, grad_loc, grad_attw,
                S, Q, H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                BQ: tl.constexpr, BD: tl.constexpr, BLP: tl.constexpr, MERGE_FROM: tl.constexpr,
                SEM: tl.constexpr, VEC: tl.constexpr):
    # Every 2-D tile here is [BQ, 4k] float32 with VEC contiguous elements per thread (the
    # max_contiguous hints keep bfloat16 loads from taking 8), the layout of the float32
    # atomics (VEC 4 on Hopper): so the compiler moves no tile through shared memory (one
    # conversion and its barriers per atomic otherwise). A query's 2*L*P locations and L*P
    # weights are loaded as one row each, and their gradients stored as one row each: the
    # per-point values are picked out of, and put back into, those rows in registers.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qs = pid_q * BQ + tl.arange(0, BQ)
    qm = qs < Q
    ds = tl.max_contiguous(tl.arange(0, BD), VEC)
    dm = ds < D
    cs = tl.max_contiguous(tl.arange(0, BLP), VEC)  # a query's (level, point, x/y) columns
    offset = b.to(tl.int64) * S * H * D + h * D
    v_base = value + offset
    gv_base = grad_value + offset
    row = ((b * Q + qs) * H + h).to(tl.int64)
    g = tl.load(grad_out + (row * D)[:, None] + ds[None, :], mask=qm[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    loc_rows = tl.load(loc + (row * (2 * L * P))[:, None] + cs[None, :],
                       mask=qm[:, None] & (cs < 2 * L * P)[None, :], other=0.0).to(tl.float32)
    attw_rows = tl.load(attw + (row * (L * P))[:, None] + cs[None, :],
                        mask=qm[:, None] & (cs < L * P)[None, :], other=0.0).to(tl.float32)
    grad_loc_rows = tl.zeros((BQ, BLP), dtype=tl.float32)
    grad_attw_rows = tl.zeros((BQ, BLP), dtype=tl.float32)
    for lvl in tl.static_range(L):
        hl = tl.load(shapes + 2 * lvl).to(tl.int32)
        wl = tl.load(shapes + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts + lvl).to(tl.int32)
        merge = lvl >= MERGE_FROM  # a constant: lvl is
        for p in tl.static_range(P):
            j = lvl * P + p
            lx = tl.sum(tl.where(cs[None, :] == 2 * j, loc_rows, 0.0), axis=1)
            ly = tl.sum(tl.where(cs[None, :] == 2 * j + 1, loc_rows, 0.0), axis=1)
            a = tl.sum(tl.where(cs[None, :] == j, attw_rows, 0.0), axis=1)
            x = lx * wl.to(tl.float32) - 0.5
            y = ly * hl.to(tl.float32) - 0.5
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            ga = tl.zeros((BQ,), dtype=tl.float32)
            gx = tl.zeros((BQ,), dtype=tl.float32)
            gy = tl.zeros((BQ,), dtype=tl.float32)
            ga, gx, gy = _bwd_corner(ga, gx, gy, g, a, (1 - fy) * (1 - fx), -(1 - fy), -(1 - fx),
                                     v_base, gv_base, y0, x0, hl, wl, start, qm, ds, dm, H, D,
                                     BQ, merge, SEM)
            ga, gx, gy = _bwd_corner(ga, gx, gy, g, a, (1 - fy) * fx, 1 - fy, -fx,
                                     v_base, gv_base, y0, x0 + 1, hl, wl, start, qm, ds, dm, H, D,
                                     BQ, merge, SEM)
            ga, gx, gy = _bwd_corner(ga, gx, gy, g, a, fy * (1 - fx), -fy, 1 - fx,
                                     v_base, gv_base, y0 + 1, x0, hl, wl, start, qm, ds, dm, H, D,
                                     BQ, merge, SEM)
            ga, gx, gy = _bwd_corner(ga, gx, gy, g, a, fy * fx, fy, fx,
                                     v_base, gv_base, y0 + 1, x0 + 1, hl, wl, start, qm, ds, dm,
                                     H, D, BQ, merge, SEM)
            grad_attw_rows += tl.where(cs[None, :] == j, ga[:, None], 0.0)
            grad_loc_rows += tl.where(cs[None, :] == 2 * j, (a * gx * wl.to(tl.float32))[:, None],
                                      0.0)
            grad_loc_rows += tl.where(cs[None, :] == 2 * j + 1,
                                      (a * gy * hl.to(tl.float32))[:, None], 0.0)
    tl.store(grad_loc + (row * (2 * L * P))[:, None] + cs[None, :],
             grad_loc_rows.to(grad_loc.dtype.element_ty),
             mask=qm[:, None] & (cs < 2 * L * P)[None, :])
    tl.store(grad_attw + (row * (L * P))[:, None] + cs[None, :],
             grad_attw_rows.to(grad_attw.dtype.element_ty),
             mask=qm[:, None] & (cs < L * P)[None, :])


# queries per program and warps per program of each kernel: module settings, which
# bench/bench_deform_bwd.py sweeps on a GPU (the backward's value-gradient atomics are its cost)
_FWD_BQ = 64
_FWD_WARPS = 4
_BWD_BQ = 64
_BWD_WARPS = 4
# the backward merges the value-gradient rows of a program's queries that hit the same pixel
# (one tl.dot per corner) on the levels from this one on; a number >= the level count: never.
# Needs _BWD_BQ >= 16 (tl.dot). Swept by bench_deform_bwd.py; untimed, so off.
_BWD_MERGE_FROM = 99
# memory order of the value-gradient atomics: "relaxed", as CUDA's atomicAdd (the upstream
# kernel's) and Inductor's scatter-adds; Triton's default is "acq_rel", which orders each add
# against the program's other memory accesses, and nothing here reads what another program
# added before the kernel ends. Swept by bench_deform_bwd.py (--sem).
_BWD_ATOMIC_SEM = "relaxed"
# elements per thread along a row in the backward's tiles (the max_contiguous hints): 4 is the
# float32 vector atomics' layout on Hopper. Ampere has no vector atomics, so there its
# atomics' layout is 1 per thread and 4 costs a layout conversion per atomic (767 block
# barriers per program in the sm_80 code), while 1 costs 2.6x the instructions (row sums
# over 32 lanes) and no barrier: which is faster there is untimed (bench_deform_bwd.py --vec).
_BWD_VEC = 4


def _block_sizes(D: int, L: int, P: int) -> tuple[int, int]:
    """The kernels' tile widths: ``BD`` over a head's channels, and ``BLP`` over a query's
    ``2 * L * P`` location columns (the backward's rows); powers of two, at least 16."""
    return max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(2 * L * P))


def _launch_shape(value: Tensor, loc: Tensor) -> tuple[int, int, int, int, int, int, int]:
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    if max(value.numel(), loc.numel()) >= 2**31:
        raise ValueError("ms_deform_attn_triton: tensors over 2**31 elements")
    return B, S, H, D, Q, L, P


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor,  # type: ignore[override]
                attw: Tensor) -> Tensor:
        value, shapes, starts = value.contiguous(), shapes.contiguous(), starts.contiguous()
        loc, attw = loc.contiguous(), attw.contiguous()
        B, S, H, D, Q, L, P = _launch_shape(value, loc)
        out = value.new_empty(B, Q, H, D)
        grid = (triton.cdiv(Q, _FWD_BQ), B * H)
        _fwd_kernel[grid](value, shapes, starts, loc, attw, out, S, Q, H=H, D=D, L=L, P=P,
                          BQ=_FWD_BQ, BD=_block_sizes(D, L, P)[0], num_warps=_FWD_WARPS)
        ctx.save_for_backward(value, shapes, starts, loc, attw)
        return out.view(B, Q, H * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        value, shapes, starts, loc, attw = ctx.saved_tensors
        B, S, H, D, Q, L, P = _launch_shape(value, loc)
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_loc = torch.empty_like(loc)
        grad_attw = torch.empty_like(attw)
        grid = (triton.cdiv(Q, _BWD_BQ), B * H)
        BD, BLP = _block_sizes(D, L, P)
        _bwd_kernel[grid](value, shapes, starts, loc, attw, grad_out.contiguous(), grad_value,
                          grad_loc, grad_attw, S, Q, H=H, D=D, L=L, P=P, BQ=_BWD_BQ,
                          BD=BD, BLP=BLP,
                          MERGE_FROM=_BWD_MERGE_FROM if _BWD_BQ >= 16 else 99,
                          SEM=_BWD_ATOMIC_SEM, VEC=_BWD_VEC,
                          num_warps=_BWD_WARPS)
        return grad_value.to(value.dtype), None, None, grad_loc, grad_attw


def ms_deform_attn_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The fused kernels behind :func:`~siamese_detr.ops.deform_attn.ms_deform_attn`'s
    signature. Returns ``[B, Q, H*Dh]`` in ``value.dtype``; locations are used in float32 and
    their gradient comes back in their own dtype."""
    return _MSDeformAttnTriton.apply(value, spatial_shapes, level_start_index,
                                     sampling_locations.float(), attention_weights)
