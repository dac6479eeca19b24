"""``bench/bench_flops.py`` counts a training step's forward and backward work."""

from __future__ import annotations

import torch


def test_a_linear_layer_s_step_is_three_products(load_bench) -> None:
    """y = x W^T for x [5, 4], W [3, 4]: 2*5*4*3 = 120 FLOPs forward; the backward computes
    the input's and the weight's gradients, one product of the same size each: 360 in all."""
    flops = load_bench("bench_flops")
    layer = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4, requires_grad=True)

    def fwd_bwd() -> None:
        layer(x).sum().backward()

    assert round(flops.step_flops(fwd_bwd) * 1e9) == 360
    x.requires_grad_(False)  # no input gradient: one product fewer
    assert round(flops.step_flops(fwd_bwd) * 1e9) == 240
