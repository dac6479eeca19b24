"""Parity checks of the fast paths on the bench's device, for ``bench/bench_gpu.py --check``.

Each check yields ``{"name", "ok", "tolerance", "result"}`` (max errors, relative to the
reference's largest magnitude unless named ``abs``). Checks that need CUDA are reported as
skipped elsewhere. Nothing here is timed except ``deform_attn_core_ms`` (median of 10,
CUDA-synchronised), which is a speed figure, not a check.
"""

from __future__ import annotations

import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from siamese_detr.ops import deform_attn
from siamese_detr.ops.deform_attn import ms_deform_attn, near_integer_pixels

DECODER_LEVELS = [(100, 136), (50, 68), (25, 34), (13, 17)]  # 800x1088 at strides 8-64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class _Backend:
    """Force ms_deform_attn's backend ("torch" or "auto") inside a ``with``."""

    def __init__(self, name: str) -> None:
        self.name, self.old = name, None

    def __enter__(self) -> None:
        self.old = os.environ.get(deform_attn.BACKEND_ENV)
        os.environ[deform_attn.BACKEND_ENV] = self.name

    def __exit__(self, *exc: Any) -> None:
        if self.old is None:
            os.environ.pop(deform_attn.BACKEND_ENV, None)
        else:
            os.environ[deform_attn.BACKEND_ENV] = self.old


def _deform_inputs(levels, B, Q, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, Dh, P, L = 8, 32, 4, len(levels)
    shapes = torch.tensor(levels, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S = int(shapes.prod(1).sum())
    value = torch.randn(B, S, H, Dh, generator=g)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.2 - 0.1
    w = torch.rand(B, Q, H, L * P, generator=g).softmax(-1).view(B, Q, H, L, P)
    return [t.to(device) for t in (value, shapes, starts, loc, w)]


def _fwd_bwd(value, shapes, starts, loc, w, grad, dtype):
    # fresh leaves every call (``value.to(float32)`` would return ``value`` itself, and a
    # later bf16 copy of it would then be a non-leaf without ``.grad``)
    xs = [value.detach().to(dtype).clone().requires_grad_(True),
          loc.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)]
    out = ms_deform_attn(xs[0], shapes, starts, xs[1], xs[2])
    out.backward(grad.to(out.dtype))
    return out, [x.grad for x in xs]


def check_deform_attn(device: torch.device) -> Iterator[dict[str, Any]]:
    """Triton kernels (fp32 and bf16 value) vs the grid_sample path in fp32 (location
    gradients away from integer pixel coordinates: see :func:`near_integer_pixels`)."""
    if not deform_attn.triton_enabled(device):
        yield {"name": "deform_attn_triton", "ok": None, "result": "skipped: no CUDA/Triton"}
        return
    for label, B, Q in (("decoder Q=300", 2, 300), ("encoder Q=S", 2, None)):
        value, shapes, starts, loc, w = _deform_inputs(DECODER_LEVELS, B, Q or 18071, device)
        grad = torch.randn(B, loc.shape[1], 256, device=device)
        with _Backend("torch"):
            ref, ref_g = _fwd_bwd(value, shapes, starts, loc, w, grad, torch.float32)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            out, g = _fwd_bwd(value, shapes, starts, loc, w, grad, dtype)
            near = near_integer_pixels(loc, shapes)
            scale = ref_g[1].abs().max().clamp_min(1e-12)
            res = {"out": _rel(out, ref), "grad_value": _rel(g[0], ref_g[0]),
                   "grad_locations": float((g[1] - ref_g[1]).float().abs()
                                           .masked_fill(near, 0).max() / scale),
                   "grad_locations_all": _rel(g[1], ref_g[1]),
                   "near_integer_points": int(near.sum()),
                   "grad_weights": _rel(g[2], ref_g[2]), "out_dtype": str(out.dtype)}
            ok = all(v < tol * (10 if k == "grad_locations" else 1)
                     for k, v in res.items() if isinstance(v, float) and k != "grad_locations_all")
            yield {"name": f"deform_attn_triton_{str(dtype)[6:]} vs torch fp32 ({label})",
                   "ok": ok, "tolerance": f"{tol} rel (locations x10)", "result": res}


def deform_attn_core_ms(device: torch.device) -> Iterator[dict[str, Any]]:
    """Forward+backward ms of the core at the encoder size (Q = S = 18071, B = 2)."""
    if device.type != "cuda":
        return
    value, shapes, starts, loc, w = _deform_inputs(DECODER_LEVELS, 2, 18071, device)
    grad = torch.randn(2, 18071, 256, device=device)
    res = {}
    variants = [("torch_fp32", "torch", torch.float32)]
    if deform_attn.triton_enabled(device):
        variants += [("triton_fp32", "auto", torch.float32), ("triton_bf16", "auto",
                                                              torch.bfloat16)]
    for label, backend, dtype in variants:
        with _Backend(backend):
            times = []
            for i in range(12):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _fwd_bwd(value, shapes, starts, loc, w, grad, dtype)
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            res[label] = 1e3 * statistics.median(times)
    yield {"name": "deform_attn_core_ms (encoder size, fwd+bwd, median of 10)", "ok": None,
           "result": res}


def check_attention(device: torch.device) -> Iterator[dict[str, Any]]:
    """SDPA multi-head attention vs torch's nn.MultiheadAttention (same weights), fp32, and
    our module under bf16 autocast vs fp32."""
    from siamese_detr.models.attention import MultiheadAttention

    torch.manual_seed(0)
    ref = nn.MultiheadAttention(256, 8, batch_first=True).to(device)
    ours = MultiheadAttention(256, 8).to(device)
    ours.load_state_dict(ref.state_dict())
    q = torch.randn(2, 300, 256, device=device, requires_grad=True)
    mem = torch.randn(2, 1000, 256, device=device)
    pad = torch.zeros(2, 1000, dtype=torch.bool, device=device)
    pad[1, 700:] = True
    outs = []
    for m in (ref, ours):
        out = m(q, mem, mem, key_padding_mask=pad, need_weights=False)[0]
        (gq,) = torch.autograd.grad(out.square().sum(), q)
        outs.append((out, gq))
    res = {"out": _rel(outs[1][0], outs[0][0]), "grad_query": _rel(outs[1][1], outs[0][1])}
    yield {"name": "sdpa_mha vs nn.MultiheadAttention fp32", "ok": max(res.values()) < 1e-4,
           "tolerance": "1e-4 rel", "result": res}
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = ours(q, mem, mem, key_padding_mask=pad)[0]
        res = {"out": _rel(out, outs[1][0])}
        yield {"name": "sdpa_mha bf16 autocast vs fp32", "ok": res["out"] < 3e-2,
               "tolerance": "3e-2 rel", "result": res}


def check_detector(device: torch.device) -> Iterator[dict[str, Any]]:
    """Whole detectors at 800x1088, eval mode: bf16 autocast vs fp32 outputs; for Deformable
    DETR also the Triton vs grid_sample backends in fp32 (outputs and gradients)."""
    from siamese_detr.losses.set_criterion import num_logits
    from siamese_detr.models.detector import build_detector
    from siamese_detr.presets import get_preset
    from siamese_detr.structures import ImageBatch

    if device.type != "cuda":
        return
    size = (800, 1088)
    for variant, preset in (("detr", "finetune/detr/coco"),
                            ("conditional", "finetune/conditional-100q/coco"),
                            ("deformable", "finetune/deformable-ms-300q/coco")):
        cfg = get_preset(preset)
        torch.manual_seed(0)
        det = build_detector(cfg.model, num_logits(cfg.model, cfg.loss)).to(device).eval()
        x = ImageBatch(torch.randn(1, 3, *size), torch.zeros(1, *size, dtype=torch.bool),
                       torch.tensor([size])).to(device)
        with torch.no_grad():
            ref = det(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = det(x)
        res = {"logits": _rel(low.logits, ref.logits),
               "boxes_abs": float((low.boxes.float() - ref.boxes).abs().max())}
        yield {"name": f"{variant} bf16 autocast vs fp32 (eval)",
               "ok": res["logits"] < 0.1 and res["boxes_abs"] < 0.02,
               "tolerance": "logits 0.1 rel, boxes 0.02 abs", "result": res}
        if variant == "deformable" and deform_attn.triton_enabled(device):
            grads = {}
            for backend in ("torch", "auto"):
                with _Backend(backend):
                    det.zero_grad()
                    out = det(x)
                    (out.logits.float().square().mean() + out.boxes.sum()).backward()
                    grads[backend] = (out.logits.detach(), torch.cat(
                        [p.grad.flatten() for p in det.transformer.parameters()
                         if p.grad is not None]))
            res = {"logits": _rel(grads["auto"][0], grads["torch"][0]),
                   "transformer_grads": _rel(grads["auto"][1], grads["torch"][1])}
            yield {"name": "deformable detector Triton vs grid_sample fp32",
                   "ok": max(res.values()) < 1e-3, "tolerance": "1e-3 rel", "result": res}


def check_fused_adamw(device: torch.device) -> Iterator[dict[str, Any]]:
    """The fused AdamW (our build_optimizer) vs the foreach AdamW, 3 steps."""
    from siamese_detr.config import OptimConfig
    from siamese_detr.engine.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    b = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-3)
    fused = build_optimizer(a, cfg)
    ref = torch.optim.AdamW(param_groups(b, cfg.lr, cfg.lr_backbone, cfg.weight_decay),
                            foreach=True)
    for i in range(3):
        x = torch.randn(32, 64, device=device, generator=None)
        for net, opt in ((a, fused), (b, ref)):
            torch.manual_seed(i)
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    err = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    yield {"name": "fused AdamW vs foreach AdamW (3 steps)", "ok": err < 1e-6,
           "tolerance": "1e-6 abs", "result": {"params_abs": err,
                                               "fused": fused.defaults.get("fused")}}


CHECKS: list[Callable[[torch.device], Iterator[dict[str, Any]]]] = [
    check_deform_attn, deform_attn_core_ms, check_attention, check_fused_adamw, check_detector,
]


def run_all(device: torch.device) -> Iterator[dict[str, Any]]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for check in CHECKS:
            try:
                yield from check(device)
            except Exception as e:  # report and go on with the next check
                yield {"name": check.__name__, "ok": False, "result": f"error: {e!r}",
                       "traceback": traceback.format_exc()}
    finally:
        torch.backends.cudnn.allow_tf32 = True
