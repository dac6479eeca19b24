"""Multi-scale deformable attention (Zhu et al., Deformable DETR) in pure PyTorch.

Shapes used throughout:

* ``B`` batch, ``Q`` queries, ``H`` heads, ``Dh`` channels per head, ``L`` levels,
  ``P`` sampling points per head and level, ``S = sum_l h_l * w_l`` flattened positions.
* ``value``: ``[B, S, H, Dh]``, levels flattened row-major and concatenated.
* ``spatial_shapes``: ``[L, 2]`` int64 ``(h_l, w_l)``; ``level_start_index``: ``[L]`` int64.
* ``sampling_locations``: ``[B, Q, H, L, P, 2]`` normalised ``(x, y)``; ``(0, 0)`` is the
  top-left corner of the map and ``(1, 1)`` the bottom-right corner (so the centre of pixel
  ``(i, j)`` is ``((j + 0.5) / w, (i + 0.5) / h)``).
* ``attention_weights``: ``[B, Q, H, L, P]``.

Sampling is bilinear with zeros outside the map, i.e. ``F.grid_sample(mode="bilinear",
padding_mode="zeros", align_corners=False)``: exactly the semantics of the upstream CUDA
kernel ``ms_deformable_im2col``.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese_detr.structures import device_constant

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MSDeformAttn", "shapes_tensor",
           "level_sizes", "near_integer_pixels", "triton_enabled"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SHAPES_ATTR = "_siamese_detr_level_sizes"
# "auto": the fused Triton kernels on CUDA when triton imports; "torch": always grid_sample
BACKEND_ENV = "SIAMESE_DETR_DEFORM_ATTN"


def shapes_tensor(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """``[L, 2]`` int64 ``(h, w)`` on ``device`` that remembers the Python sizes, so that
    :func:`level_sizes` needs no device-to-host read. Made once per (sizes, device) and
    reused (do not modify it): the training step then copies nothing from the host for it,
    which also lets a CUDA graph capture the step (a host-to-device copy in a graph would
    replay from a host buffer that is gone)."""
    return _shapes_tensor(tuple((int(h), int(w)) for h, w in shapes), torch.device(device))


@cache  # never evicted, as device_constant: graphs read these tensors at every replay
def _shapes_tensor(shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    flat = tuple(v for hw in shapes for v in hw)
    with torch.inference_mode(False):
        t = device_constant(flat, device, torch.long).view(-1, 2)  # type: ignore[arg-type]
    setattr(t, _SHAPES_ATTR, list(shapes))  # on this view, which this cache keeps
    return t


def level_sizes(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    """Python ``(h, w)`` per level: remembered by :func:`shapes_tensor`, else read (a host
    sync on a GPU)."""
    known = getattr(spatial_shapes, _SHAPES_ATTR, None)
    if known is not None:
        return list(known)
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


_level_sizes = level_sizes


@cache
def _triton_importable() -> bool:
    try:
        import siamese_detr.ops.deform_attn_triton  # noqa: F401
    except Exception:  # no triton, or a triton that cannot build for this machine
        return False
    return True


def triton_enabled(device: torch.device) -> bool:
    """Does :func:`ms_deform_attn` take the fused Triton kernels for tensors on ``device``?"""
    return (device.type == "cuda" and os.environ.get(BACKEND_ENV, "auto") != "torch"
            and _triton_importable())


_SELF_TESTED: dict[tuple, bool] = {}


def _triton_works(value: Tensor, sampling_locations: Tensor) -> bool:
    """Once per (device, dtype, heads, channels, levels, points): compile the kernels on a tiny
    case and compare forward and gradients with the ``grid_sample`` path; on an error or a
    mismatch warn once and use ``grid_sample`` for that signature from then on."""
    _, _, H, Dh = value.shape
    _, _, _, L, P, _ = sampling_locations.shape
    key = (value.device, value.dtype, H, Dh, L, P)
    if key not in _SELF_TESTED:
        import warnings

        from siamese_detr.ops.deform_attn_triton import ms_deform_attn_triton

        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(
                    value.device.type, enabled=False):
                g = torch.Generator(device="cpu").manual_seed(0)
                sizes = [(3 + lvl, 4 + lvl) for lvl in range(L)]
                shapes = torch.tensor(sizes, dtype=torch.long, device=value.device)
                starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
                S = sum(h * w for h, w in sizes)
                args = [torch.randn(1, S, H, Dh, generator=g),
                        torch.rand(1, 5, H, L, P, 2, generator=g) * 1.2 - 0.1,
                        torch.rand(1, 5, H, L, P, generator=g)]
                results = []
                for fn in (ms_deform_attn_triton, _ms_deform_attn_torch):
                    xs = [a.to(value.device).requires_grad_(True) for a in args]
                    xs[0] = xs[0].to(value.dtype).detach().requires_grad_(True)
                    out = fn(xs[0], shapes, starts, xs[1], xs[2])
                    out.float().square().sum().backward()
                    results.append([out.detach().float()] + [x.grad.float() for x in xs])
            tol = 1e-4 if value.dtype == torch.float32 else 5e-2
            errs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
                    for a, b in zip(*results)]
            ok = max(errs) < tol
            if not ok:
                warnings.warn(f"deformable attention: Triton kernels differ from grid_sample "
                              f"({errs}); using grid_sample", stacklevel=3)
        except Exception as e:  # a Triton that cannot compile for this GPU
            warnings.warn(f"deformable attention: Triton kernels unavailable ({e!r}); using "
                          f"grid_sample", stacklevel=3)
            ok = False
        _SELF_TESTED[key] = ok
    return _SELF_TESTED[key]


def _ms_deform_attn_fp(
    value: Tensor,
    shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """grid_sample core; all inputs share one floating dtype. Returns ``[B, Q, H*Dh]``."""
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"spatial_shapes {shapes} do not add up to S={S}")
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample coordinates in [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [B, h*w, H, Dh] -> [B*H, Dh, h, w]
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * H, Dh, h, w)
        # [B, Q, H, P, 2] -> [B*H, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*H, Dh, Q, P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*H, Dh, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (stacked * weights).sum(-1).view(B, H * Dh, Q)
    return out.transpose(1, 2).contiguous()


@torch.compiler.disable  # its own kernels (Triton) or per-level grid_sample; not traced
def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core (no projections).

    Args:
        value: ``[B, S, H, Dh]``.
        spatial_shapes: ``[L, 2]`` int64 ``(h, w)`` per level.
        level_start_index: ``[L]`` int64 start of each level in ``S`` (implied by
            ``spatial_shapes``; kept for signature parity with the CUDA kernel).
        sampling_locations: ``[B, Q, H, L, P, 2]`` normalised ``(x, y)``; may lie outside
            ``[0, 1]`` (those samples read zeros).
        attention_weights: ``[B, Q, H, L, P]`` (normally softmax-normalised over ``L*P``).

    Returns:
        ``[B, Q, H*Dh]`` in ``value.dtype``. On CUDA with Triton (see :func:`triton_enabled`)
        the fused kernels of :mod:`siamese_detr.ops.deform_attn_triton` run: the value is read
        in its own dtype (bfloat16 under autocast), locations in float32, float32
        accumulation. Otherwise ``grid_sample`` per level; there half / bfloat16 inputs are
        computed in float32 (with autocast disabled) and cast back, because ``grid_sample``
        needs the grid in the value's dtype and bfloat16 locations are too coarse.
    """
    if triton_enabled(value.device) and _triton_works(value, sampling_locations):
        from siamese_detr.ops.deform_attn_triton import ms_deform_attn_triton

        return ms_deform_attn_triton(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)
    return _ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights)


def _ms_deform_attn_torch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The ``grid_sample`` path of :func:`ms_deform_attn`."""
    del level_start_index  # the split sizes come from spatial_shapes
    shapes = _level_sizes(spatial_shapes)
    out_dtype = value.dtype
    low = any(
        t.dtype in _LOW_PRECISION for t in (value, sampling_locations, attention_weights)
    ) or torch.is_autocast_enabled(value.device.type)
    if not low:
        dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
        dtype = torch.promote_types(dtype, attention_weights.dtype)
        return _ms_deform_attn_fp(
            value.to(dtype), shapes, sampling_locations.to(dtype), attention_weights.to(dtype)
        ).to(out_dtype)
    with torch.autocast(device_type=value.device.type, enabled=False):
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        out = _ms_deform_attn_fp(
            value.to(dtype), shapes, sampling_locations.to(dtype), attention_weights.to(dtype)
        )
    return out.to(out_dtype)


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Slow loop implementation of :func:`ms_deform_attn` for tests (same signature/shapes).

    Every sample point is interpolated explicitly: pixel coordinates
    ``x = loc_x * w - 0.5``, ``y = loc_y * h - 0.5``; the four neighbouring pixels are
    weighted bilinearly and a neighbour outside the map contributes zero.
    """
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = _level_sizes(spatial_shapes)
    starts = [int(s) for s in level_start_index.tolist()]
    out = value.new_zeros(B, Q, H, Dh)
    locs = sampling_locations.tolist()
    attw = attention_weights.tolist()
    for b in range(B):
        for q in range(Q):
            for hd in range(H):
                acc = value.new_zeros(Dh)
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(P):
                        lx, ly = locs[b][q][hd][lvl][p]
                        x = lx * w - 0.5
                        y = ly * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = value.new_zeros(Dh)
                        for dy, wy in ((0, 1.0 - fy), (1, fy)):
                            for dx, wx in ((0, 1.0 - fx), (1, fx)):
                                yi, xi = y0 + dy, x0 + dx
                                if 0 <= yi < h and 0 <= xi < w:
                                    idx = starts[lvl] + yi * w + xi
                                    sample = sample + wy * wx * value[b, idx, hd]
                        acc = acc + attw[b][q][hd][lvl][p] * sample
                out[b, q, hd] = acc
    return out.reshape(B, Q, H * Dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (upstream parameter names and init).

    Args:
        d_model: channels ``D``.
        n_levels: number of feature levels ``L``.
        n_heads: attention heads ``H`` (``D % H == 0``).
        n_points: sampling points ``P`` per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Upstream init: offsets start on a ring of ``H`` directions (L-inf normalised),
        point ``i`` at distance ``i + 1``; uniform attention; xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: ``[B, Q, D]`` (position embedding already added).
            reference_points: ``[B, Q, L, 2]`` normalised ``(x, y)`` in ``[0, 1]`` (padded
                image area included), or ``[B, Q, L, 4]`` boxes ``(cx, cy, w, h)``: offsets
                are then scaled by ``(w, h) * 0.5 / n_points``.
            input_flatten: ``[B, S, D]`` flattened multi-level features.
            spatial_shapes: ``[L, 2]`` int64 ``(h, w)``.
            level_start_index: ``[L]`` int64.
            input_padding_mask: ``[B, S]`` bool, True at padding (their values are zeroed).

        Returns:
            ``[B, Q, D]``.
        """
        B, Q, _ = query.shape
        _, S, _ = input_flatten.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        if int(spatial_shapes.shape[0]) != L:
            raise ValueError(f"got {spatial_shapes.shape[0]} levels, module built for {L}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, H, self.d_model // H)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P)
        weights = F.softmax(weights, -1).view(B, Q, H, L, P)
        if reference_points.shape[-1] == 2:
            # (w, h) per level: offsets are in pixels of each level
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            normalizer = normalizer.to(offsets.dtype)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}"
            )
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


def near_integer_pixels(loc: Tensor, shapes: Tensor, eps: float = 1e-3) -> Tensor:
    """``loc [B, Q, H, L, P, 2]`` (normalised x, y) -> bool, True where the sampling point's
    pixel coordinate (``loc * size - 0.5``) lies within ``eps`` of an integer. There the
    bilinear interpolation's derivative jumps (left and right neighbours differ), and two
    correct implementations can round to different sides: their location gradients may differ
    by the jump, so the location gradient is compared away from those points."""
    size = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(loc)  # [L, 2] as (w, h)
    pix = loc * size[None, None, None, :, None, :] - 0.5
    return (pix - pix.round()).abs() < eps
