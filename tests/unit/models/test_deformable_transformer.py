"""DeformableTransformer: protocol shapes, padding invariance, self-attention mask, refinement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from siamese_detr.models.transformer.deformable import (
    DeformableTransformer,
    DeformableTransformerEncoder,
    inverse_sigmoid,
)

D = 32


def _model(levels: int, box_refine: bool = False, seed: int = 0) -> DeformableTransformer:
    torch.manual_seed(seed)
    m = DeformableTransformer(d_model=D, nhead=4, num_encoder_layers=2, num_decoder_layers=3,
                              dim_feedforward=64, dropout=0.1, num_feature_levels=levels,
                              enc_n_points=2, dec_n_points=2, box_refine=box_refine)
    return m.eval()


def _inputs(sizes, B=2, seed=0, pad_image0=True):
    g = torch.Generator().manual_seed(seed)
    srcs, masks, pos = [], [], []
    for h, w in sizes:
        srcs.append(torch.randn(B, D, h, w, generator=g))
        pos.append(torch.randn(B, D, h, w, generator=g))
        m = torch.zeros(B, h, w, dtype=torch.bool)
        if pad_image0:
            m[0, :, w - w // 2:] = True  # image 0: right half is padding
            m[0, h - h // 3:, :] = True  # and the bottom third
        masks.append(m)
    return srcs, masks, pos


LEVELS4 = [(8, 10), (4, 5), (2, 3), (1, 2)]


@pytest.mark.parametrize("sizes", [[(6, 7)], LEVELS4])
def test_shapes(sizes):
    m = _model(len(sizes))
    srcs, masks, pos = _inputs(sizes)
    B, Q = 2, 5
    S = sum(h * w for h, w in sizes)
    memory, mask, pos_f, shapes, start, vr = m.encode(srcs, masks, pos)
    assert memory.shape == (B, S, D) and pos_f.shape == (B, S, D) and mask.shape == (B, S)
    assert shapes.dtype == torch.long and shapes.tolist() == [list(s) for s in sizes]
    expected_start = [0]
    for h, w in sizes[:-1]:
        expected_start.append(expected_start[-1] + h * w)
    assert start.tolist() == expected_start
    assert vr.shape == (B, len(sizes), 2)
    h0, w0 = sizes[0]
    torch.testing.assert_close(vr[0, 0], torch.tensor([(w0 - w0 // 2) / w0, (h0 - h0 // 3) / h0]))
    torch.testing.assert_close(vr[1], torch.ones(len(sizes), 2))
    # level embedding is added to the positional encoding
    torch.testing.assert_close(pos_f[:, :h0 * w0],
                               pos[0].flatten(2).transpose(1, 2) + m.level_embed[0])
    qp = torch.randn(B, Q, D)
    hidden, refs = m.decode(memory, mask, pos_f, shapes, start, vr, qp, None, None)
    assert hidden.shape == (3, B, Q, D)
    assert refs.shape == (3, B, Q, 2)
    torch.testing.assert_close(refs[1], m.reference_points(qp).sigmoid())
    torch.testing.assert_close(refs[0], refs[2])
    assert m.num_decoder_layers == 3


def test_wrong_number_of_levels_rejected():
    m = _model(4)
    srcs, masks, pos = _inputs([(6, 7)])
    with pytest.raises(ValueError):
        m.encode(srcs, masks, pos)


def test_encoder_reference_points_are_pixel_centres_of_own_level():
    shapes = torch.tensor([[2, 4], [1, 2]])
    vr = torch.tensor([[[0.5, 1.0], [0.5, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    ref = DeformableTransformerEncoder.get_reference_points(shapes, vr)
    assert ref.shape == (2, 10, 2, 2)
    centres = torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25],
                            [0.125, 0.75], [0.375, 0.75], [0.625, 0.75], [0.875, 0.75]])
    for b in range(2):
        torch.testing.assert_close(ref[b, :8, 0], centres)
        torch.testing.assert_close(ref[b, 8:, 1], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))
    # cross-level: image 0 has valid w-ratio 0.5, so level-0 point x=0.125 (valid-relative 0.25)
    # maps to the same valid-relative place of level 1
    torch.testing.assert_close(ref[0, 0, 1], torch.tensor([0.125, 0.25]))


def test_encoder_and_decoder_invariant_to_padded_content():
    m = _model(4)
    srcs, masks, pos = _inputs(LEVELS4)
    srcs2 = [s.clone() for s in srcs]
    for s, mk in zip(srcs2, masks):
        s.permute(0, 2, 3, 1)[mk] = torch.randn(int(mk.sum()), D) * 50
    enc1 = m.encode(srcs, masks, pos)
    enc2 = m.encode(srcs2, masks, pos)
    valid = ~enc1[1]
    assert enc1[1][0].any() and valid.any()
    torch.testing.assert_close(enc1[0][valid], enc2[0][valid], atol=1e-4, rtol=1e-4)
    qp = torch.randn(2, 6, D)
    h1, _ = m.decode(*enc1, qp, None, None)
    h2, _ = m.decode(*enc2, qp, None, None)
    torch.testing.assert_close(h1, h2, atol=1e-4, rtol=1e-4)
    # sanity: without masks the padded content changes valid outputs
    nomask = [torch.zeros_like(mk) for mk in masks]
    e1 = m.encode(srcs, nomask, pos)[0]
    e2 = m.encode(srcs2, nomask, pos)[0]
    assert (e1[valid] - e2[valid]).abs().max() > 1e-2


def test_self_attn_mask_blocks_information():
    m = _model(2)
    srcs, masks, pos = _inputs([(6, 7), (3, 4)])
    enc = m.encode(srcs, masks, pos)
    B, Q = 2, 6
    qp = torch.randn(B, Q, D)
    tgt = torch.randn(B, Q, D)
    group = torch.arange(Q) // 3  # two groups of 3 queries
    block = group[:, None] != group[None, :]  # True = blocked
    qp2 = qp.clone()
    qp2[:, 3:] = torch.randn(B, 3, D)  # change the second group only
    h1, _ = m.decode(*enc, qp, tgt, block)
    h2, _ = m.decode(*enc, qp2, tgt, block)
    torch.testing.assert_close(h1[:, :, :3], h2[:, :, :3], atol=1e-5, rtol=1e-5)
    assert (h1[:, :, 3:] - h2[:, :, 3:]).abs().max() > 1e-2
    # without the mask the first group sees the change
    u1, _ = m.decode(*enc, qp, tgt, None)
    u2, _ = m.decode(*enc, qp2, tgt, None)
    assert (u1[:, :, :3] - u2[:, :, :3]).abs().max() > 1e-3
    # tgt=None means zero content queries
    z1, _ = m.decode(*enc, qp, None, None)
    z2, _ = m.decode(*enc, qp, torch.zeros(B, Q, D), None)
    torch.testing.assert_close(z1, z2)


def test_box_refine_references():
    m = _model(2, box_refine=True)
    srcs, masks, pos = _inputs([(6, 7), (3, 4)])
    enc = m.encode(srcs, masks, pos)
    qp = torch.randn(2, 5, D)
    with pytest.raises(RuntimeError):
        m.decode(*enc, qp, None, None)
    torch.manual_seed(1)
    bbox_embed = nn.ModuleList(nn.Linear(D, 4) for _ in range(3))
    m.decoder.bbox_embed = bbox_embed
    hidden, refs = m.decode(*enc, qp, None, None)
    assert hidden.shape == (3, 2, 5, D)
    assert refs.shape == (3, 2, 5, 4)
    init = m.reference_points(qp).sigmoid()
    torch.testing.assert_close(refs[0, ..., :2], init)
    torch.testing.assert_close(refs[0, ..., 2:], torch.full_like(init, 0.5))
    assert (refs[1] - refs[0]).abs().max() > 1e-3
    assert (refs[2] - refs[1]).abs().max() > 1e-3
    # the documented box formula reproduces the refinement chain
    for lvl in range(2):
        boxes = (bbox_embed[lvl](hidden[lvl]) + inverse_sigmoid(refs[lvl])).sigmoid()
        torch.testing.assert_close(refs[lvl + 1], boxes, atol=1e-5, rtol=1e-5)
    # refined references are detached: no gradient reaches any parameter through them
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(refs[1:].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    (g_ref,) = torch.autograd.grad(refs[0].sum(), [m.reference_points.weight])
    assert g_ref.abs().max() > 0
    # refinement changes the decoder states too (4-d references move the sampling)
    m.decoder.bbox_embed = None
    m.box_refine = False
    hidden_plain, refs_plain = m.decode(*enc, qp, None, None)
    assert refs_plain.shape == (3, 2, 5, 2)
    torch.testing.assert_close(hidden_plain[0], hidden[0])
    assert (hidden_plain[1] - hidden[1]).abs().max() > 1e-4


def test_parameter_names_and_init():
    m = _model(4)
    names = {n for n, _ in m.named_parameters()}
    for key in ("level_embed", "reference_points.weight", "reference_points.bias",
                "encoder.layers.0.self_attn.sampling_offsets.weight",
                "encoder.layers.1.norm2.weight", "encoder.layers.0.linear1.weight",
                "decoder.layers.0.cross_attn.value_proj.weight",
                "decoder.layers.2.self_attn.in_proj_weight",
                "decoder.layers.0.self_attn.out_proj.weight", "decoder.layers.0.norm3.bias"):
        assert key in names, key
    assert m.level_embed.shape == (4, D)
    assert m.reference_points.bias.abs().max() == 0
    assert m.decoder.layers[0].cross_attn.attention_weights.weight.abs().max() == 0
    # MSDeformAttn reset survives the global xavier init: offsets bias on the direction grid
    bias = m.encoder.layers[0].self_attn.sampling_offsets.bias.view(4, 4, 2, 2)
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0]))
    assert m.encoder.layers[0].self_attn.sampling_offsets.weight.abs().max() == 0
    # xavier on the other matrices: layers differ from each other
    assert not torch.equal(m.encoder.layers[0].linear1.weight, m.encoder.layers[1].linear1.weight)


def test_backward_reaches_encoder_and_level_embed():
    m = _model(2).train()
    # at init the encoder query (src + pos) only acts through zero-initialised offset /
    # attention-weight matrices, so level_embed gets no gradient; perturb one of them
    with torch.no_grad():
        m.encoder.layers[0].self_attn.attention_weights.weight.normal_(0, 0.1)
    srcs, masks, pos = _inputs([(4, 5), (2, 3)])
    enc = m.encode(srcs, masks, pos)
    hidden, refs = m.decode(*enc, torch.randn(2, 4, D), None, None)
    # (a plain sum of LayerNorm outputs has zero gradient: weight it randomly)
    (hidden * torch.randn_like(hidden)).sum().backward()
    for name in ("level_embed", "reference_points.weight", "decoder.layers.1.norm3.weight",
                 "encoder.layers.0.self_attn.value_proj.weight",
                 "decoder.layers.0.cross_attn.sampling_offsets.weight"):
        p = dict(m.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
