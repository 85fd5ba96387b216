"""The "middle net" (docs/method.md 1.4) coupling the encoder to the generator latent:
z_hat = z + Bridge(E(x))."""

from __future__ import annotations

from torch import Tensor, nn

from mgm_fast.models.layers import SNLinear


class Bridge(nn.Module):
    """Global average pool -> spectrally normalised Linear ``fc`` (with bias) -> BatchNorm1d
    ``bn`` (affine; batch statistics in training mode, running statistics in eval mode).

    Shapes: (B, feature_dim, h, w) or already pooled (B, feature_dim) float -> (B, z_dim).
    Training mode needs B >= 2 (BatchNorm1d cannot normalise a single sample); eval mode
    accepts B = 1.
    """

    def __init__(self, feature_dim: int, z_dim: int) -> None:
        super().__init__()
        self.fc = SNLinear(feature_dim, z_dim)
        self.bn = nn.BatchNorm1d(z_dim)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() == 4:
            # Pool then flatten (not squeeze): the released squeeze also drops a batch of 1.
            features = features.mean(dim=(2, 3))
        elif features.dim() != 2:
            raise ValueError(f"Bridge expects (B, C, h, w) or (B, C) features, got {tuple(features.shape)}")
        if self.training and features.shape[0] < 2:
            raise ValueError(
                "Bridge in training mode needs a batch of at least 2: its BatchNorm1d normalises "
                "with batch statistics, which a single sample does not have. Use eval() for B=1."
            )
        return self.bn(self.fc(features))
