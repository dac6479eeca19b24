"""Extra heads of Siamese DETR (method.md 3.6 and 3.7).

* :class:`FeatureAlign`: decoder state ``[.., D]`` -> crop-embedding space ``[.., C_feat]``
  (2-layer MLP, ReLU), for the region-level discrimination loss.
* :func:`build_projector` / :func:`build_predictor`: SimSiam-style MLPs with BatchNorm for the
  global discrimination loss (BatchNorm1d here; the engine converts to SyncBatchNorm under DDP).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FeatureAlign", "build_projector", "build_predictor"]


class FeatureAlign(nn.Module):
    """``Linear(D, D) -> ReLU -> Linear(D, C_feat)``; parameters ``layers.{0,1}.*``."""

    def __init__(self, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, out_dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[..., D]`` -> ``[..., C_feat]``."""
        return self.layers[1](self.layers[0](x).relu())


def build_projector(in_dim: int, hidden: int = 256, out_dim: int = 256) -> nn.Sequential:
    """Projector ``psi``: Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN.

    ``[B, in_dim]`` -> ``[B, out_dim]``.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim), nn.BatchNorm1d(out_dim),
    )


def build_predictor(dim: int = 256, hidden: int = 256) -> nn.Sequential:
    """Predictor: Linear-BN-ReLU-Linear; ``[B, dim]`` -> ``[B, dim]``."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, dim),
    )
