"""The simulated ALOHA robot: real MuJoCo physics and rendering, strict success, errors."""

import numpy as np
import pytest

from habc_sim.aloha import AlohaConfig, AlohaEnv, gripper_to_joint, joint_to_gripper


@pytest.fixture(scope='module')
def cube_env():
    env = AlohaEnv(AlohaConfig(task='transfer_cube', cameras=['angle', 'top'], image_size=64))
    yield env
    env.close()


def test_reset_is_seeded_and_randomises_the_cube(cube_env):
    cube_env.reset(7)
    first = cube_env.object_position('box')
    cube_env.reset(7)
    assert np.allclose(cube_env.object_position('box'), first)
    cube_env.reset(8)
    assert not np.allclose(cube_env.object_position('box'), first)
    assert 0.0 <= first[0] <= 0.2 and 0.4 <= first[1] <= 0.6


def test_observation_layout(cube_env):
    obs = cube_env.reset(0)
    assert obs['state'].shape == (14,) and obs['state'].dtype == np.float32
    assert obs['images'].shape == (2, 64, 64, 3) and obs['images'].dtype == np.uint8
    assert obs['images'].std() > 5  # a rendered scene, not a blank buffer
    assert 'cube' in obs['instruction']
    # start pose: shoulder -0.96 rad on both arms
    assert obs['state'][1] == pytest.approx(-0.96, abs=1e-3)
    assert obs['state'][8] == pytest.approx(-0.96, abs=1e-3)


def test_joint_targets_are_tracked(cube_env):
    obs = cube_env.reset(0)
    target = obs['state'].copy()
    target[0] = 0.3        # left waist
    target[13] = 0.2       # right gripper closes partly
    for _ in range(60):
        result = cube_env.step(target)
    state = result.observation['state']
    assert state[0] == pytest.approx(0.3, abs=0.03)
    assert not result.success and not result.truncated


def test_bad_actions_are_rejected(cube_env):
    cube_env.reset(0)
    with pytest.raises(ValueError, match='action must have 14 values'):
        cube_env.step(np.zeros(7))
    with pytest.raises(ValueError, match='NaN'):
        cube_env.step(np.full(14, np.nan))


def test_diverging_physics_ends_the_episode_as_failure():
    env = AlohaEnv(AlohaConfig(cameras=[]))
    obs = env.reset(0)
    env.data.qvel[:] = 1e12   # what a wild controller can cause
    result = env.step(obs['state'])
    assert result.physics_error and result.truncated and not result.success
    env.close()


def test_time_limit_truncates():
    env = AlohaEnv(AlohaConfig(cameras=[], max_steps=5))
    obs = env.reset(0)
    results = [env.step(obs['state']) for _ in range(5)]
    assert [r.truncated for r in results] == [False] * 4 + [True]


def test_object_knocked_off_the_table_ends_the_episode():
    env = AlohaEnv(AlohaConfig(cameras=[]))
    obs = env.reset(0)
    address = env.model.joint('red_box_joint').qposadr[0]
    env.data.qpos[address:address + 3] = [0.9, 0.5, -0.2]   # below the table, off its edge
    result = env.step(obs['state'])
    assert result.truncated and not result.success and env.steps == 1
    env.close()


def test_gripper_conversion_round_trip():
    assert joint_to_gripper(gripper_to_joint(0.3)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match='unknown task'):
        AlohaConfig(task='stack')
    with pytest.raises(ValueError, match='cameras must be'):
        AlohaConfig(cameras=['nope'])
