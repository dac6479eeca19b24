"""Small prediction heads shared by all detector variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "inverse_sigmoid"]


class MLP(nn.Module):
    """DETR's feed-forward network: ``num_layers`` Linear layers with ReLU in between.

    Parameters are named ``layers.{i}.weight`` / ``layers.{i}.bias`` as upstream.

    Args:
        input_dim: width of the input ``[..., input_dim]``.
        hidden_dim: width of every hidden layer.
        output_dim: width of the output ``[..., output_dim]``.
        num_layers: number of Linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("MLP needs num_layers >= 1")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., input_dim]`` -> ``[..., output_dim]``."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` clamped to ``[0, 1]``, with both ``x`` and ``1 - x`` floored at ``eps``
    (Deformable / Conditional DETR's ``inverse_sigmoid``). Any shape."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))
