"""Multi-head attention on ``F.scaled_dot_product_attention`` (fused kernels on GPU).

:class:`MultiheadAttention` replaces ``nn.MultiheadAttention(batch_first=True)`` for
``embed_dim == kdim == vdim``: same parameters (``in_proj_weight``, ``in_proj_bias``,
``out_proj.{weight,bias}``, so checkpoints are unchanged), same initialisation in the same
random order, same call (``(out, None)``; masks are bool, True = blocked, as in torch's module)
and the same dropout on the attention weights (inside SDPA). It skips the generic module's
argument checks and mask conversions, and projects query and key with one matmul when they
are the same tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiheadAttention", "sdpa_mask"]


def sdpa_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
    """Blocked-masks (True = blocked) ``attn_mask [Q, S]`` and ``key_padding_mask [B, S]`` as
    one SDPA mask (True = may attend) broadcasting to ``[B, heads, Q, S]``; None if both are."""
    if key_padding_mask is None and attn_mask is None:
        return None
    if key_padding_mask is None:
        assert attn_mask is not None
        return ~attn_mask
    blocked = key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        blocked = blocked | attn_mask
    return ~blocked


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with torch's ``nn.MultiheadAttention`` state dict.

    Args:
        embed_dim: ``D`` (query, key and value width); num_heads: ``h`` (``D % h == 0``);
        dropout: on the attention weights, in training only.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 batch_first: bool = True) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("only batch_first=True is supported")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.batch_first = True
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)  # torch's order: out_proj init first
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.constant_(self.in_proj_bias, 0.0)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = False,
                attn_mask: Tensor | None = None) -> tuple[Tensor, None]:
        """``query [B, Q, D]``, ``key, value [B, S, D]``; ``key_padding_mask [B, S]`` and
        ``attn_mask [Q, S]`` bool, True = blocked -> ``([B, Q, D], None)``."""
        if need_weights:
            raise ValueError("need_weights=True is not supported (SDPA returns no weights)")
        B, Q, D = query.shape
        S, h = key.shape[1], self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            # one cast of the packed projection instead of one per slice (autocast caches
            # only leaf weights, and a slice is not one): the same values, fewer kernels
            dtype = torch.get_autocast_dtype(device_type)
            w, b = w.to(dtype), b.to(dtype)
        if key is query:
            q, k = F.linear(query, w[: 2 * D], b[: 2 * D]).chunk(2, -1)
        else:
            q = F.linear(query, w[:D], b[:D])
            k = F.linear(key, w[D : 2 * D], b[D : 2 * D])
        v = F.linear(value, w[2 * D :], b[2 * D :])
        out = attend(q.view(B, Q, h, -1), k.view(B, S, h, -1), v.view(B, S, h, -1),
                     sdpa_mask(attn_mask, key_padding_mask),
                     self.dropout if self.training else 0.0)
        return self.out_proj(out), None


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """``q [B, Q, h, E]``, ``k [B, S, h, E]``, ``v [B, S, h, V]``, SDPA ``mask`` (True = may
    attend) -> ``[B, Q, h * V]``; scores scaled by ``E ** -0.5``."""
    B, Q = q.shape[:2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(B, Q, -1)
