"""The policies habc trains (habc_policy.models): a new one for some data, and what fits one.

`habc train`, `habc bench` (and through it `habc demo`'s SFT) build their untrained policy
with `new_policy`; the learner node and `habc train` check each episode with `fit_problems`
before it goes into a buffer, so that a mismatch is reported per episode instead of failing
a whole training step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

_KINDS = ('auto', 'vla', 'lowdim')


def new_policy(kind: str, state_dim: int, action_dim: int,
               image_shape: Sequence[int] | None, *, horizon: int,
               overrides: Mapping[str, Any] | None = None) -> Any:
    """Build an untrained policy: the small VLA or the low-dimensional chunk regressor.

    Both regress the action chunk with an L2 loss: it fits faster than flow matching on
    small budgets (habc bench's tracks; the flow MLP did not fit the expert on the state
    track's budget, see habc_policy.models.lowdim).

    Args:
        kind: 'vla', 'lowdim', or 'auto' (the VLA when there are images).
        image_shape: (views, height, width, ...) of one step's images, None without images.
        overrides: config values that replace the defaults (keys of the config class).

    Raises:
        ValueError: an unknown kind, a VLA without images, or an override key that the
            config class does not have.
    """
    from habc_policy.models.lowdim import LowDimChunkConfig, LowDimChunkPolicy
    from habc_policy.models.vla import SmallVLA, SmallVLAConfig

    if kind not in _KINDS:
        raise ValueError(f'unknown policy kind {kind!r}; choose one of {list(_KINDS)}')
    if kind == 'auto':
        kind = 'vla' if image_shape is not None else 'lowdim'
    if kind == 'vla' and image_shape is None:
        raise ValueError('the vla policy needs images, and the data has none (record or map '
                         'cameras, or use the lowdim policy)')
    if kind == 'lowdim':
        config_cls, values = LowDimChunkConfig, {'state_dim': state_dim,
                                                 'action_dim': action_dim, 'horizon': horizon}
    else:
        config_cls, values = SmallVLAConfig, {'state_dim': state_dim, 'action_dim': action_dim,
                                              'horizon': horizon, 'num_views': image_shape[0],
                                              'image_size': image_shape[1],
                                              'action_head': 'l2'}
    overrides = dict(overrides or {})
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f'policy config keys {unknown} are not in {config_cls.__name__} '
                         f'({sorted(known)})')
    config = config_cls(**{**values, **overrides})
    return LowDimChunkPolicy(config) if kind == 'lowdim' else SmallVLA(config)


def fit_problems(episode: Any, policy: Any, *, cameras: str,
                 check_image_size: bool = True) -> list[str]:
    """Return why an episode does not fit the policy's inputs and outputs (empty: it fits).

    A policy without images frees the episode's images (they would only fill memory).

    Args:
        cameras: where the caller's user chooses the cameras, for the message (e.g. 'the
            cameras parameter').
        check_image_size: False when the caller keeps recorded image sizes on purpose.
    """
    config = policy.config
    problems = []
    if episode.action_dim != policy.action_dim:
        problems.append(f'actions have {episode.action_dim} values, the policy '
                        f'{policy.action_dim}')
    state_dim = getattr(config, 'state_dim', None)
    state = episode.observations['state']
    if state_dim is not None and state.shape[1] != state_dim:
        problems.append(f'the joint state has {state.shape[1]} values, the policy expects '
                        f'{state_dim}')
    views = getattr(config, 'num_views', None)
    images = episode.observations.get('images')
    size = getattr(config, 'image_size', None)
    if views is None:
        episode.observations.pop('images', None)
    elif images is None:
        problems.append(f'the observations hold no images, the policy needs {views} view(s) '
                        f'(choose the cameras with {cameras})')
    elif images.shape[1] != views:
        problems.append(f'{images.shape[1]} camera view(s), the policy needs {views} (choose '
                        f'them with {cameras})')
    elif check_image_size and size is not None and images.shape[2:4] != (size, size):
        problems.append(f'images are {images.shape[3]}x{images.shape[2]}, the policy needs '
                        f'{size}x{size}')
    return problems
