"""HABC's dual-head critic, and loading it with a checkpoint for the robot (no rclpy).

The learner trains a DualHeadCritic on the policy's detached features and saves it as
critic.safetensors next to the policy's weights (habc_learner.trainer.save_checkpoint). The
robot loads it with the actor, version for version, to estimate the running policy's
viability p_v = sigmoid(z_v(s)) = P(success | s) live (habc_policy.help_request).
"""

from dataclasses import dataclass
import json
from pathlib import Path
import re
from typing import Any

import torch
from torch import nn

CRITIC_FILE = 'critic.safetensors'


def mlp_trunk(in_dim: int, hidden_dim: int, num_layers: int) -> nn.Sequential:
    """Build num_layers of Linear -> LayerNorm -> GELU (the critics' shared trunk)."""
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
        self.phi = mlp_trunk(feature_dim, hidden_dim, num_layers)
        self.f_v = nn.Linear(hidden_dim, 1)
        self.f_e = nn.Linear(hidden_dim, 1)
        self.value_scale = value_scale

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return z_v(s) and V_e(s), each (B,)."""
        h = self.phi(features)
        return self.f_v(h).squeeze(-1), self.value_scale * self.f_e(h).squeeze(-1)


@dataclass
class LoadedCritic:
    """A checkpoint's critic, or why there is none (problem, '' when loaded)."""

    critic: DualHeadCritic | None
    problem: str = ''


def efficiency_scale(folder: Path) -> float:
    """Return V_e's scale: a training setting (metrics.json of the checkpoint), not a tensor."""
    try:
        meta = json.loads((Path(folder) / 'metrics.json').read_text())
        return float(meta['method']['efficiency_scale'])
    except (OSError, ValueError, KeyError, TypeError):
        return 100.0


def load_policy_critic(folder: Path, policy: Any, data: bytes | None = None) -> LoadedCritic:
    """Load the critic saved with `policy` in `folder`, on the policy's device, or say why not.

    `data`: the critic file's bytes, already read (None: read them from the folder).
    """
    feature_dim = getattr(policy, 'feature_dim', None)
    if feature_dim is None:
        return LoadedCritic(None, f'{type(policy).__name__} has no critic features')
    loaded = load_critic(folder, feature_dim, efficiency_scale(folder), data)
    if loaded.critic is not None:
        loaded.critic.to(next(policy.parameters()).device)
    return loaded


def estimate(policy: Any, critic: DualHeadCritic, batch: dict[str, Any]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return p_v = sigmoid(z_v(s)) and V_e(s), each (B,), of a batch of observations."""
    with torch.inference_mode():
        return estimate_from_features(critic, policy.encode(batch))


def estimate_from_features(critic: DualHeadCritic, features: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return p_v and V_e, each (B,), from the policy's features of the observations."""
    with torch.inference_mode():
        z_v, v_e = critic(features.float())
    return torch.sigmoid(z_v), v_e


def load_critic(folder: Path, feature_dim: int, value_scale: float = 100.0,
                data: bytes | None = None) -> LoadedCritic:
    """Load folder/critic.safetensors as a DualHeadCritic over features of feature_dim.

    The architecture is read from the tensors' shapes. A missing file, another critic
    (a baseline's value network), or one trained on features of another size gives no
    critic and a problem that says which; it never raises for those. `data`: the file's
    bytes, already read by the caller (None: read the file).
    """
    from safetensors.torch import load, load_file

    path = Path(folder) / CRITIC_FILE
    if data is None and not path.is_file():
        return LoadedCritic(None, f'no {CRITIC_FILE} in {folder} (a checkpoint trained '
                            'without HABC, or copied without its critic)')
    try:
        state = load_file(str(path)) if data is None else load(data)
    except Exception as exc:  # a damaged file is a problem to report, not a crash
        return LoadedCritic(None, f'{path} is unreadable: {type(exc).__name__}: {exc}')
    linear = sorted(int(m.group(1)) for key in state
                    if (m := re.fullmatch(r'phi\.(\d+)\.weight', key))
                    and state[key].ndim == 2)
    if not linear or 'f_v.weight' not in state or 'f_e.weight' not in state:
        return LoadedCritic(None, f'{path} is not a HABC dual-head critic (keys '
                            f'{sorted(state)[:4]}...)')
    hidden_dim, in_dim = state[f'phi.{linear[0]}.weight'].shape
    if in_dim != feature_dim:
        return LoadedCritic(None, f'{path} reads features of size {in_dim}, the policy '
                            f'gives {feature_dim}: a critic of another policy')
    critic = DualHeadCritic(feature_dim, hidden_dim, len(linear), value_scale)
    try:
        critic.load_state_dict(state)
    except RuntimeError as exc:
        return LoadedCritic(None, f'{path} does not fit a dual-head critic: {exc}')
    return LoadedCritic(critic.eval())
