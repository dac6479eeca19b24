"""SDPA attention against torch's nn.MultiheadAttention and the explicit softmax formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siamese_detr.models.attention import MultiheadAttention, attend
from siamese_detr.models.transformer.conditional import ProjectionFreeAttention


def _pair(d: int = 16, h: int = 4, dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(d, h, dropout=dropout, batch_first=True)
    torch.manual_seed(0)
    ours = MultiheadAttention(d, h, dropout=dropout)
    return ref.double(), ours.double()


def test_same_state_dict_and_same_init_for_the_same_seed() -> None:
    ref, ours = _pair()
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b) == ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                  "out_proj.bias"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_outputs_and_grads_match_torch_module_with_masks() -> None:
    ref, ours = _pair()
    g = torch.Generator().manual_seed(1)
    B, Q, S, D = 2, 5, 7, 16
    src = torch.randn(B, Q, D, generator=g, dtype=torch.float64)
    mem = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -3:] = True
    blocked = torch.zeros(Q, Q, dtype=torch.bool)
    blocked[0, 1:] = True  # query 0 sees only itself
    cases = [
        ((src, src, src), {"attn_mask": blocked}),  # self-attention, key is query
        ((src, mem, mem), {"key_padding_mask": pad}),  # cross-attention with padding
        ((src, src + 1, src), {}),
    ]
    for args, kw in cases:
        outs, grads = [], []
        for m in (ref, ours):
            m.zero_grad()
            x = [a.detach().clone().requires_grad_(True) for a in args]
            if args[1] is args[0]:
                x[1] = x[0]
            if args[2] is args[0]:
                x[2] = x[0]
            out = m(*x, need_weights=False, **kw)[0]
            out.square().sum().backward()
            outs.append(out)
            grads.append([x[0].grad] + [p.grad for p in m.parameters()])
        assert (outs[0] - outs[1]).abs().max() < 1e-12
        for ga, gb in zip(*grads):
            assert (ga - gb).abs().max() < 1e-11


def test_dropout_is_applied_in_training_only() -> None:
    _, ours = _pair(dropout=0.5)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    ours.train()
    torch.manual_seed(0)
    a = ours(x, x, x)[0]
    torch.manual_seed(1)
    b = ours(x, x, x)[0]
    assert not torch.allclose(a, b)
    ours.eval()
    assert torch.equal(ours(x, x, x)[0], ours(x, x, x)[0])


def test_projection_free_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    h, E, V = 4, 32, 16  # query/key width differs from the value width (cross-attention)
    m = ProjectionFreeAttention(E, h, dropout=0.0, vdim=V).double().eval()
    B, Q, S = 2, 3, 6
    q, k = torch.randn(B, Q, E, dtype=torch.float64), torch.randn(B, S, E, dtype=torch.float64)
    v = torch.randn(B, S, V, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    qh = q.view(B, Q, h, E // h).transpose(1, 2) * (E // h) ** -0.5
    kh = k.view(B, S, h, E // h).transpose(1, 2)
    vh = v.view(B, S, h, V // h).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)).masked_fill(pad[:, None, None], float("-inf"))
    expected = m.out_proj((scores.softmax(-1) @ vh).transpose(1, 2).reshape(B, Q, V))
    assert (m(q, k, v, key_padding_mask=pad) - expected).abs().max() < 1e-12


@pytest.mark.parametrize("self_attention", [True, False])
def test_autocast_casts_the_packed_projection_once(self_attention: bool) -> None:
    """Under bf16 autocast the packed in-projection is cast once (not once per slice): the
    outputs and gradients are those of casting each slice, and fewer casts run."""
    from siamese_detr.engine.profiling import OpCounter

    torch.manual_seed(0)
    attn = MultiheadAttention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    kv = x if self_attention else torch.randn(2, 5, 32)

    def per_slice() -> torch.Tensor:  # the formula before: one autocast cast per slice
        w, b, D = attn.in_proj_weight, attn.in_proj_bias, 32
        q = F.linear(x, w[:D], b[:D])
        k = F.linear(kv, w[D:2 * D], b[D:2 * D])
        v = F.linear(kv, w[2 * D:], b[2 * D:])
        out = attend(q.view(2, 7, 4, 8), k.view(2, -1, 4, 8), v.view(2, -1, 4, 8), None, 0.0)
        return attn.out_proj(out)

    results = []
    for fn in (lambda: attn(x, kv, kv)[0], per_slice):
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), OpCounter() as counter:
            out = fn()
        out.float().square().sum().backward()
        results.append((out.detach(), attn.in_proj_weight.grad.clone(), counter.op_names))
    (a, ga, ops_a), (b, gb, ops_b) = results
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b)
    assert torch.allclose(ga, gb, rtol=1e-2, atol=1e-3)  # bf16 matmuls in another grouping
    assert ops_a["_to_copy"] < ops_b["_to_copy"]
