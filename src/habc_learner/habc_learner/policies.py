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

_KINDS = ('auto', 'vla', 'lowdim', 'transformers_vla')


def new_policy(kind: str, state_dim: int, action_dim: int,
               image_shape: Sequence[int] | None, *, horizon: int,
               overrides: Mapping[str, Any] | None = None) -> Any:
    """Build an untrained policy: a VLA or the low-dimensional chunk regressor.

    The small VLA and the regressor regress the action chunk with an L2 loss: it fits faster
    than flow matching on small budgets (habc bench's tracks; the flow MLP did not fit the
    expert on the state track's budget, see habc_policy.models.lowdim). The transformers VLA
    keeps its flow-matching expert (pi0 / SmolVLA's recipe on a pretrained VLM).

    Args:
        kind: 'vla' (SmallVLA), 'lowdim', 'transformers_vla' (TransformersVLA on the local
            VLM folder that overrides['backbone_dir'] names), or 'auto' (the small VLA when
            there are images, else lowdim).
        image_shape: (views, height, width, ...) of one step's images, None without images.
        overrides: config values that replace the defaults (keys of the config class).

    Raises:
        ValueError: an unknown kind, a VLA without images, a transformers VLA without a
            backbone_dir, or an override key that the config class does not have.
        FileNotFoundError: the backbone folder or one of its files is missing.
    """
    if kind not in _KINDS:
        raise ValueError(f'unknown policy kind {kind!r}; choose one of {list(_KINDS)}')
    if kind == 'auto':
        kind = 'vla' if image_shape is not None else 'lowdim'
    if kind in ('vla', 'transformers_vla') and image_shape is None:
        alternative = ', or use the lowdim policy' if kind == 'vla' else ''
        raise ValueError(f'the {kind} policy needs images, and the data has none (record or '
                         f'map cameras{alternative})')
    overrides = dict(overrides or {})
    if kind == 'lowdim':
        from habc_policy.models.lowdim import LowDimChunkConfig, LowDimChunkPolicy

        config_cls, policy_cls = LowDimChunkConfig, LowDimChunkPolicy
        values = {'state_dim': state_dim, 'action_dim': action_dim, 'horizon': horizon}
    elif kind == 'vla':
        from habc_policy.models.vla import SmallVLA, SmallVLAConfig

        config_cls, policy_cls = SmallVLAConfig, SmallVLA
        values = {'state_dim': state_dim, 'action_dim': action_dim, 'horizon': horizon,
                  'num_views': image_shape[0], 'image_size': image_shape[1],
                  'action_head': 'l2'}
    else:
        if not overrides.get('backbone_dir'):
            raise ValueError('the transformers_vla policy needs a backbone: a local VLM '
                             'folder (SmolVLM, PaliGemma) as backbone_dir (habc train '
                             '--backbone DIR)')
        # Imported only here: transformers' VLM code costs seconds and memory.
        from habc_policy.models.transformers_vla import TransformersVLA, TransformersVLAConfig

        config_cls, policy_cls = TransformersVLAConfig, TransformersVLA
        values = {'state_dim': state_dim, 'action_dim': action_dim, 'horizon': horizon,
                  'num_views': image_shape[0], 'image_size': image_shape[1]}
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f'policy config keys {unknown} are not in {config_cls.__name__} '
                         f'({sorted(known)})')
    return policy_cls(config_cls(**{**values, **overrides}))


def fit_problems(episode: Any, policy: Any, *, cameras: str,
                 check_image_size: bool = True) -> list[str]:
    """Return why an episode does not fit the policy's inputs and outputs (empty: it fits).

    A policy without images frees the episode's images (they would only fill memory).

    Args:
        cameras: where the caller's user chooses the cameras, for the message (e.g. 'the
            cameras parameter').
        check_image_size: False when the caller keeps recorded image sizes on purpose; a
            policy that takes only its own size (Policy.exact_image_size) is checked anyway.
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
    elif (check_image_size or getattr(policy, 'exact_image_size', False)) and (
            size is not None and images.shape[2:4] != (size, size)):
        problems.append(f'images are {images.shape[3]}x{images.shape[2]}, the policy needs '
                        f'{size}x{size}')
    return problems
