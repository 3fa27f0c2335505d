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


def test_a_transformers_vla_needs_images_and_a_backbone_and_takes_only_its_image_size(
        tiny_backbone):
    sizes = {'prefix_layers': 1, 'expert_hidden_dim': 32, 'expert_layers': 1,
             'expert_heads': 2}
    with pytest.raises(ValueError, match='transformers_vla policy needs images'):
        new_policy('transformers_vla', 14, 14, None, horizon=5,
                   overrides={'backbone_dir': str(tiny_backbone)})
    with pytest.raises(ValueError, match=r'needs a backbone: a local VLM folder.*--backbone'):
        new_policy('transformers_vla', 14, 14, (1, 32, 32), horizon=5, overrides=sizes)
    with pytest.raises(ValueError, match=r"keys \['hidden_dim'\] are not in "
                       'TransformersVLAConfig'):
        new_policy('transformers_vla', 14, 14, (1, 32, 32), horizon=5,
                   overrides={'backbone_dir': str(tiny_backbone), 'hidden_dim': 8})
    vla = new_policy('transformers_vla', 14, 14, (2, 32, 32), horizon=5,
                     overrides={'backbone_dir': str(tiny_backbone), **sizes})
    assert type(vla).__name__ == 'TransformersVLA'
    assert (vla.config.num_views, vla.config.image_size, vla.horizon) == (2, 32, 5)
    assert vla.config.backbone_dir == str(tiny_backbone.resolve())
    assert fit_problems(episode(images=(2, 32, 32)), vla, cameras='x') == []
    assert fit_problems(episode(state_dim=7, images=(1, 32, 32)), vla, cameras='x') == [
        'the joint state has 7 values, the policy expects 14',
        '1 camera view(s), the policy needs 2 (choose them with x)']
    # It takes only its own size, so even a caller that keeps recorded sizes hears of it.
    assert fit_problems(episode(images=(2, 48, 64)), vla, cameras='x',
                        check_image_size=False) == ['images are 64x48, the policy needs 32x32']


def test_the_actor_optimizer_holds_only_the_trained_parameters(tiny_backbone):
    from habc_learner.methods import Algorithm, MethodConfig

    vla = new_policy('transformers_vla', 14, 14, (1, 32, 32), horizon=5,
                     overrides={'backbone_dir': str(tiny_backbone), 'prefix_layers': 1})
    algorithm = Algorithm(vla, MethodConfig(method='habc', horizon=5))
    optimized = {id(p) for group in algorithm.actor_optimizer.param_groups
                 for p in group['params']}
    names = {name for name, p in vla.named_parameters() if id(p) in optimized}
    assert names == {name for name, p in vla.named_parameters() if p.requires_grad}
    assert names and not any(name.startswith('backbone.') for name in names)
    assert any(name.startswith('backbone.') for name, _ in vla.named_parameters())
