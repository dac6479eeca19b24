"""Transformers (DETR, Conditional DETR) against torch references and hand values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from siamese_detr.models.heads import MLP, inverse_sigmoid
from siamese_detr.models.transformer.conditional import (
    ConditionalTransformer,
    ProjectionFreeAttention,
    gen_sineembed_for_position,
)
from siamese_detr.models.transformer.vanilla import Transformer, flatten_levels

D, H, FF = 32, 4, 64


def test_mlp_and_inverse_sigmoid() -> None:
    torch.manual_seed(0)
    mlp = MLP(5, 7, 3, 3)
    assert [k for k in mlp.state_dict() if k.endswith("weight")] == [
        "layers.0.weight", "layers.1.weight", "layers.2.weight"]
    x = torch.randn(4, 5)
    l0, l1, l2 = mlp.layers
    torch.testing.assert_close(mlp(x), l2(torch.relu(l1(torch.relu(l0(x))))))
    z = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(inverse_sigmoid(z.sigmoid()), z, rtol=1e-4, atol=1e-4)
    ends = inverse_sigmoid(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([math.log(1e-5), -math.log(1e-5)]))


def test_flatten_levels_shapes_and_ratios() -> None:
    m1 = torch.zeros(2, 4, 6, dtype=torch.bool)
    m1[1, 3:, :] = True  # image 1: 3 of 4 rows valid, all 6 columns
    m1[1, :, 3:] = True  # and 3 of 6 columns
    m2 = torch.zeros(2, 2, 3, dtype=torch.bool)
    srcs = [torch.randn(2, D, 4, 6), torch.randn(2, D, 2, 3)]
    src, mask, pos, shapes, starts, ratios = flatten_levels(srcs, [m1, m2], srcs)
    assert src.shape == (2, 30, D) and mask.shape == (2, 30) and pos.shape == (2, 30, D)
    assert shapes.tolist() == [[4, 6], [2, 3]] and starts.tolist() == [0, 24]
    assert shapes.dtype == starts.dtype == torch.int64
    torch.testing.assert_close(ratios[1, 0], torch.tensor([0.5, 0.75]))  # (w, h)
    torch.testing.assert_close(ratios[0], torch.ones(2, 2))
    torch.testing.assert_close(src[0, 7], srcs[0][0, :, 1, 1])


def _memory(B: int = 2, h: int = 3, w: int = 4):
    torch.manual_seed(1)
    src = torch.randn(B, D, h, w)
    mask = torch.zeros(B, h, w, dtype=torch.bool)
    mask[1, :, -1] = True
    return [src], [mask], [torch.randn(B, D, h, w)]


def test_vanilla_matches_torch_layers_without_positions() -> None:
    """With zero positions, DETR's post-norm layers are torch's Transformer layers."""
    torch.manual_seed(0)
    tr = Transformer(D, H, 2, 2, FF, dropout=0.0).eval()
    srcs, masks, _ = _memory()
    zeros = [torch.zeros_like(srcs[0])]
    memory, mask, pos, *rest = tr.encode(srcs, masks, zeros)
    ref_enc = nn.TransformerEncoderLayer(D, H, FF, 0.0, batch_first=True).eval()
    x = srcs[0].flatten(2).transpose(1, 2)
    for layer in tr.encoder.layers:
        ref_enc.load_state_dict(layer.state_dict())
        x = ref_enc(x, src_key_padding_mask=mask)
    torch.testing.assert_close(memory, x, rtol=1e-4, atol=1e-4)

    tgt = torch.randn(2, 5, D)
    hidden, refs = tr.decode(memory, mask, pos, *rest, torch.zeros_like(tgt), tgt, None)
    assert refs is None and hidden.shape == (2, 2, 5, D)
    ref_dec = nn.TransformerDecoderLayer(D, H, FF, 0.0, batch_first=True).eval()
    y = tgt
    for i, layer in enumerate(tr.decoder.layers):
        ref_dec.load_state_dict(layer.state_dict())
        y = ref_dec(y, memory, memory_key_padding_mask=mask)
        torch.testing.assert_close(hidden[i], tr.decoder.norm(y), rtol=1e-4, atol=1e-4)


def test_projection_free_attention_matches_mha() -> None:
    torch.manual_seed(0)
    att = ProjectionFreeAttention(D, H, 0.0, vdim=D)
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.eye(D).repeat(3, 1))
        mha.in_proj_bias.zero_()
        mha.out_proj.load_state_dict(att.out_proj.state_dict())
    q, k, v = torch.randn(2, 5, D), torch.randn(2, 7, D), torch.randn(2, 7, D)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    am = torch.rand(5, 7) > 0.7
    am[:, 0] = False
    want = mha(q, k, v, key_padding_mask=kpm, attn_mask=am)[0]
    torch.testing.assert_close(att(q, k, v, am, kpm), want, rtol=1e-5, atol=1e-5)


def test_projection_free_attention_wide_keys() -> None:
    """Cross-attention: q/k of width 2d (head h owns channels [h*2d/H, (h+1)*2d/H)), v width d."""
    torch.manual_seed(0)
    att = ProjectionFreeAttention(2 * D, H, 0.0, vdim=D)
    q, k, v = torch.randn(1, 3, 2 * D), torch.randn(1, 6, 2 * D), torch.randn(1, 6, D)
    e, dv = 2 * D // H, D // H
    heads = []
    for h in range(H):
        s = q[0, :, h * e:(h + 1) * e] @ k[0, :, h * e:(h + 1) * e].T / math.sqrt(e)
        heads.append(s.softmax(-1) @ v[0, :, h * dv:(h + 1) * dv])
    want = att.out_proj(torch.cat(heads, -1))
    torch.testing.assert_close(att(q, k, v)[0], want, rtol=1e-5, atol=1e-5)


def test_sine_embedding_hand_values() -> None:
    emb = gen_sineembed_for_position(torch.tensor([[0.25, 0.5]]), 8)  # F = 4 per axis
    y, x = 0.5 * 2 * math.pi, 0.25 * 2 * math.pi
    want = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
            math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    torch.testing.assert_close(emb[0], torch.tensor(want), rtol=0, atol=1e-6)


def test_conditional_structure_and_references() -> None:
    torch.manual_seed(0)
    tr = ConditionalTransformer(D, H, 1, 3, FF, dropout=0.0).eval()
    names = set(dict(tr.named_parameters()))
    assert "decoder.layers.0.ca_qpos_proj.weight" in names
    assert "decoder.layers.1.ca_qpos_sine_proj.weight" in names
    assert not any(".ca_qpos_proj." in n for n in names if not n.startswith("decoder.layers.0."))
    assert tr.decoder.layers[0].cross_attn.out_proj.weight.shape == (D, D)
    assert tuple(tr.decoder.query_scale.layers[1].weight.shape) == (D, D)
    assert tuple(tr.decoder.ref_point_head.layers[1].weight.shape) == (2, D)
    srcs, masks, pos = _memory()
    enc = tr.encode(srcs, masks, pos)
    query_pos = torch.randn(2, 6, D)
    hidden, refs = tr.decode(*enc, query_pos, None, None)
    assert hidden.shape == (3, 2, 6, D) and refs.shape == (3, 2, 6, 2)
    want = tr.decoder.ref_point_head(query_pos).sigmoid()
    for layer_refs in refs:
        torch.testing.assert_close(layer_refs, want)
    # content defaults to zeros
    hidden0, _ = tr.decode(*enc, query_pos, torch.zeros(2, 6, D), None)
    torch.testing.assert_close(hidden0, hidden)


@pytest.mark.parametrize("cls", [Transformer, ConditionalTransformer])
def test_self_attn_mask_blocks_information(cls) -> None:
    torch.manual_seed(0)
    tr = cls(D, H, 1, 2, FF, dropout=0.0).eval()
    enc = tr.encode(*_memory())
    qp = torch.randn(2, 4, D)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:2, :2] = False
    mask[2:, 2:] = False  # two groups of 2
    h1, _ = tr.decode(*enc, qp, None, mask)
    qp2 = qp.clone()
    qp2[:, 2:] = torch.randn(2, 2, D)  # change group 2 only
    h2, _ = tr.decode(*enc, qp2, None, mask)
    torch.testing.assert_close(h2[:, :, :2], h1[:, :, :2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(h2[:, :, 2:], h1[:, :, 2:])
    h_open, _ = tr.decode(*enc, qp, None, None)
    assert not torch.allclose(h_open, h1, atol=1e-4)
