"""The baselines' value networks over (detached) policy features (no rclpy).

HABC's DualHeadCritic lives in habc_policy.models.critic: the robot runs it too.
"""

import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812 - the usual alias

from habc_policy.models.critic import mlp_trunk


class ScalarValue(nn.Module):
    """A single state-value head V(s) (the AWR baseline)."""

    def __init__(self, feature_dim: int, hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.trunk = mlp_trunk(feature_dim, hidden_dim, num_layers)
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
        self.trunk = mlp_trunk(feature_dim, hidden_dim, num_layers)
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
