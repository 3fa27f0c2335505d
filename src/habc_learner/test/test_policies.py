"""A new policy for some data, and why an episode does not fit a policy."""

import numpy as np
import pytest

from habc_episodes.episode import Episode
from habc_learner.policies import fit_problems, new_policy


def episode(state_dim=14, action_dim=14, images=(1, 96, 96)):
    steps = 3
    observations = {'state': np.zeros((steps, state_dim), np.float32)}
    if images is not None:
        observations['images'] = np.zeros((steps, *images, 3), np.uint8)
    return Episode(observations=observations, actions=np.zeros((steps, action_dim), np.float32),
                   controllers=['policy'] * steps, outcome='success', episode_id='e')


def test_auto_builds_the_vla_for_images_and_the_regressor_without():
    vla = new_policy('auto', 14, 14, (2, 64, 64, 3), horizon=5,
                     overrides={'hidden_dim': 32})
    assert (vla.config.num_views, vla.config.image_size, vla.config.action_head) == (2, 64, 'l2')
    lowdim = new_policy('auto', 17, 14, None, horizon=5)
    assert (lowdim.config.state_dim, lowdim.horizon) == (17, 5)
    with pytest.raises(ValueError, match='needs images'):
        new_policy('vla', 14, 14, None, horizon=5)
    with pytest.raises(ValueError, match=r"keys \['nope'\] are not in LowDimChunkConfig"):
        new_policy('lowdim', 14, 14, None, horizon=5, overrides={'nope': 1})


def test_fit_problems_name_every_mismatch():
    vla = new_policy('vla', 14, 14, (1, 96, 96), horizon=5)
    assert fit_problems(episode(), vla, cameras='x') == []
    problems = fit_problems(episode(state_dim=10, action_dim=7, images=(2, 96, 96)), vla,
                            cameras='the cameras parameter')
    assert problems == ['actions have 7 values, the policy 14',
                        'the joint state has 10 values, the policy expects 14',
                        '2 camera view(s), the policy needs 1 (choose them with the cameras '
                        'parameter)']
    small = episode(images=(1, 48, 64))
    assert fit_problems(small, vla, cameras='x') == ['images are 64x48, the policy needs 96x96']
    assert fit_problems(small, vla, cameras='x', check_image_size=False) == []
    lowdim = new_policy('lowdim', 14, 14, None, horizon=5)
    with_images = episode()
    assert fit_problems(with_images, lowdim, cameras='x') == []
    assert 'images' not in with_images.observations  # freed: the policy never sees them
