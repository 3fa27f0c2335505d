"""Critic networks over (detached) policy features (no rclpy)."""

import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812 - the usual alias


def _trunk(in_dim: int, hidden_dim: int, num_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(size, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
        size = hidden_dim
    return nn.Sequential(*layers)


class DualHeadCritic(nn.Module):
    """Shared trunk phi(s) with a viability logit head f_v and an efficiency head f_e.

    V_e is in control steps (targets in [-T_max, 0]); the head outputs V_e / value_scale so
    that the network works with numbers of order one whatever the episode length.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 256, num_layers: int = 2,
                 value_scale: float = 100.0) -> None:
        super().__init__()
        self.phi = _trunk(feature_dim, hidden_dim, num_layers)
        self.f_v = nn.Linear(hidden_dim, 1)
        self.f_e = nn.Linear(hidden_dim, 1)
        self.value_scale = value_scale

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return z_v(s) and V_e(s), each (B,)."""
        h = self.phi(features)
        return self.f_v(h).squeeze(-1), self.value_scale * self.f_e(h).squeeze(-1)


class ScalarValue(nn.Module):
    """A single state-value head V(s) (the AWR baseline)."""

    def __init__(self, feature_dim: int, hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.trunk = _trunk(feature_dim, hidden_dim, num_layers)
        self.head = nn.Linear(hidden_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(features)).squeeze(-1)


class DistributionalValue(nn.Module):
    """A categorical value distribution over fixed bins (the Imit-Recap baseline).

    Trained with cross-entropy against the two-hot projection of a scalar target; the value
    is the expectation over the bins.
    """

    def __init__(self, feature_dim: int, v_min: float, v_max: float, num_bins: int = 101,
                 hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if not v_min < v_max or num_bins < 2:
            raise ValueError(f'need v_min < v_max and >= 2 bins, got [{v_min}, {v_max}], '
                             f'{num_bins}')
        self.trunk = _trunk(feature_dim, hidden_dim, num_layers)
        self.head = nn.Linear(hidden_dim, num_bins)
        self.register_buffer('support', torch.linspace(v_min, v_max, num_bins))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the bins (B, K)."""
        return self.head(self.trunk(features))

    def expected_value(self, logits: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(logits, dim=-1) * self.support).sum(-1)

    def two_hot(self, target: torch.Tensor) -> torch.Tensor:
        """Project scalar targets onto the two nearest bins (B, K)."""
        support = self.support
        target = target.clamp(support[0], support[-1])
        upper = torch.searchsorted(support, target.contiguous()).clamp(1, len(support) - 1)
        lower = upper - 1
        width = support[upper] - support[lower]
        upper_weight = (target - support[lower]) / width
        probs = torch.zeros(target.shape[0], len(support), device=target.device)
        probs.scatter_(1, lower[:, None], (1.0 - upper_weight)[:, None])
        probs.scatter_add_(1, upper[:, None], upper_weight[:, None])
        return probs

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy against the two-hot target (B,)."""
        return -(self.two_hot(target.detach()) * F.log_softmax(logits, dim=-1)).sum(-1)
