"""Multi-scale deformable attention: grid_sample version vs explicit loop, gradients, values."""

from __future__ import annotations

import pytest
import torch

from siamese_detr.ops.deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference


def _shapes(levels: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = torch.tensor(levels, dtype=torch.long)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return shapes, start


def _random_inputs(levels, B=2, Q=3, H=2, Dh=3, P=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes, start = _shapes(levels)
    S = int(shapes.prod(1).sum())
    L = len(levels)
    value = torch.randn(B, S, H, Dh, generator=g, dtype=dtype)
    # locations in [-0.3, 1.3]: a good share falls outside the map or in the border band
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    w = torch.rand(B, Q, H, L * P, generator=g, dtype=dtype).softmax(-1).view(B, Q, H, L, P)
    return value, shapes, start, loc, w


def test_matches_loop_reference_several_levels():
    levels = [(5, 7), (3, 4), (2, 2), (1, 3)]
    value, shapes, start, loc, w = _random_inputs(levels)
    # make sure some samples are fully outside and some inside
    loc[0, 0, 0, 0, 0] = torch.tensor([-0.5, 0.5], dtype=loc.dtype)
    loc[0, 0, 0, 1, 0] = torch.tensor([1.2, 1.1], dtype=loc.dtype)
    loc[1, 1, 1, 0, 1] = torch.tensor([0.5, 0.5], dtype=loc.dtype)
    assert ((loc < 0) | (loc > 1)).any() and ((loc > 0) & (loc < 1)).all(-1).any()
    out = ms_deform_attn(value, shapes, start, loc, w)
    ref = ms_deform_attn_reference(value, shapes, start, loc, w)
    assert out.shape == (2, 3, 2 * 3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # not trivially zero
    assert ref.abs().max() > 0.1


def test_reference_is_not_nearest_neighbour():
    """Sanity of the comparison itself: a shifted location changes the result."""
    levels = [(4, 4)]
    value, shapes, start, loc, w = _random_inputs(levels, B=1, Q=1, H=1, P=1)
    loc[:] = 0.4
    a = ms_deform_attn_reference(value, shapes, start, loc, w)
    b = ms_deform_attn_reference(value, shapes, start, loc + 0.03, w)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(ms_deform_attn(value, shapes, start, loc + 0.03, w), b)


def test_gradcheck():
    levels = [(3, 4), (2, 2)]
    value, shapes, start, loc, w = _random_inputs(levels, B=1, Q=2, H=2, Dh=2, P=2, seed=3)
    # keep away from integer pixel coordinates (kinks of bilinear interpolation)
    loc = loc.clamp(-0.2, 1.2)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, l_, a: ms_deform_attn(v, shapes, start, l_, a), (value, loc, w),
        eps=1e-6, atol=1e-5,
    )


def test_hand_computed_values():
    # 1 level 2x2 map, one head, one channel: [[1, 2], [3, 4]]
    shapes, start = _shapes([(2, 2)])
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    points = torch.tensor(
        [
            [0.25, 0.25],  # centre of pixel (0, 0) -> 1
            [0.75, 0.25],  # centre of pixel (0, 1) -> 2
            [0.5, 0.5],  # midpoint of the four centres -> 2.5
            [0.5, 0.25],  # midpoint of top row -> 1.5
            [0.0, 0.0],  # image corner: 1/4 of pixel (0, 0), rest zero padding -> 0.25
            [1.5, 0.5],  # fully outside -> 0
        ],
        dtype=torch.float64,
    )
    expected = torch.tensor([1.0, 2.0, 2.5, 1.5, 0.25, 0.0], dtype=torch.float64)
    Q = points.shape[0]
    loc = points.view(1, Q, 1, 1, 1, 2)
    w = torch.ones(1, Q, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, start, loc, w)
    torch.testing.assert_close(out.view(Q), expected)
    ref = ms_deform_attn_reference(value, shapes, start, loc, w)
    torch.testing.assert_close(ref.view(Q), expected)
    # attention weights scale linearly
    out2 = ms_deform_attn(value, shapes, start, loc, 0.5 * w)
    torch.testing.assert_close(out2.view(Q), 0.5 * expected)


def test_half_inputs_computed_in_fp32_and_cast_back():
    levels = [(4, 5), (2, 3)]
    value, shapes, start, loc, w = _random_inputs(levels, dtype=torch.float32, seed=5)
    out32 = ms_deform_attn(value, shapes, start, loc, w)
    out16 = ms_deform_attn(value.half(), shapes, start, loc.half(), w.half())
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), out32, atol=2e-2, rtol=2e-2)
    outbf = ms_deform_attn(value.bfloat16(), shapes, start, loc, w)
    assert outbf.dtype == torch.bfloat16


def test_module_init_matches_upstream():
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    names = {n for n, _ in m.named_parameters()}
    assert names == {
        f"{a}.{b}" for a in ("sampling_offsets", "attention_weights", "value_proj",
                             "output_proj") for b in ("weight", "bias")
    }
    assert m.sampling_offsets.weight.abs().max() == 0
    assert m.attention_weights.weight.abs().max() == 0 and m.attention_weights.bias.abs().max() == 0
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 (theta = pi/2) along +y; point i at distance i + 1
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[0, 1, :, 1], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, :, 0], torch.zeros(3), atol=1e-6, rtol=0)
    # L-inf normalised: max |component| of every direction is 1
    torch.testing.assert_close(bias[:, :, 0].abs().amax(-1), torch.ones(4, 2))
    assert m.value_proj.bias.abs().max() == 0 and m.output_proj.bias.abs().max() == 0


def _module_inputs(seed=0, B=2, Q=4, D=16, ref_dim=2):
    g = torch.Generator().manual_seed(seed)
    shapes, start = _shapes([(4, 5), (2, 3)])
    S = int(shapes.prod(1).sum())
    query = torch.randn(B, Q, D, generator=g)
    x = torch.randn(B, S, D, generator=g)
    ref = torch.rand(B, Q, 2, ref_dim, generator=g) * 0.6 + 0.2
    return query, ref, x, shapes, start


def test_module_padding_invariance():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    with torch.no_grad():  # non-trivial attention/offsets
        m.attention_weights.weight.normal_(0, 0.5)
        m.sampling_offsets.weight.normal_(0, 0.5)
    query, ref, x, shapes, start = _module_inputs()
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[0, 10:20] = True  # right part of level 0 of image 0
    mask[1, 20:] = True  # all of level 1 of image 1
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), 16) * 100
    out1 = m(query, ref, x, shapes, start, mask)
    out2 = m(query, ref, x2, shapes, start, mask)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    # without the mask the padded content does leak
    out3 = m(query, ref, x2, shapes, start, None)
    assert (out3 - out1).abs().max() > 1e-2


def test_module_box_references_scale_offsets():
    torch.manual_seed(1)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    with torch.no_grad():
        m.attention_weights.weight.normal_(0, 0.5)
    query, ref, x, shapes, start = _module_inputs(ref_dim=4)
    out = m(query, ref, x, shapes, start)
    assert out.shape == query.shape
    # w, h -> 0 collapses all samples onto the box centre: equals a 2-d reference with
    # zero sampling offsets
    tiny = torch.cat([ref[..., :2], torch.zeros_like(ref[..., 2:])], -1)
    out_tiny = m(query, tiny, x, shapes, start)
    with torch.no_grad():
        m.sampling_offsets.bias.zero_()
        m.sampling_offsets.weight.zero_()
    out_point = m(query, ref[..., :2].contiguous(), x, shapes, start)
    torch.testing.assert_close(out_tiny, out_point, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, out_tiny, atol=1e-3)
    with pytest.raises(ValueError):
        m(query, ref[..., :3], x, shapes, start)


def test_module_gradients_flow_to_all_parameters():
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2).double()
    query, ref, x, shapes, start = _module_inputs()
    out = m(query.double(), ref.double(), x.double(), shapes, start)
    out.pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # zero-initialised weights included


def test_module_under_cpu_autocast_close_to_fp32():
    torch.manual_seed(2)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    query, ref, x, shapes, start = _module_inputs()
    out32 = m(query, ref, x, shapes, start)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = m(query, ref, x, shapes, start)
    assert out_ac.dtype == torch.bfloat16  # output_proj runs in bf16 under autocast
    torch.testing.assert_close(out_ac.float(), out32, atol=5e-2, rtol=5e-2)
