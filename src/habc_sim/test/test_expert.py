"""The scripted expert on the real simulated robot, and `habc sim expert`."""

import json
import subprocess
import sys

import pytest

from habc_sim.aloha import AlohaConfig, AlohaEnv
from habc_sim.expert import ExpertConfig, run_expert_episode


@pytest.fixture(scope='module')
def cube_env():
    env = AlohaEnv(AlohaConfig(task='transfer_cube', cameras=[]))
    yield env
    env.close()


def test_clean_expert_transfers_the_cube(cube_env):
    episodes = [run_expert_episode(cube_env, seed) for seed in (0, 1, 2)]
    assert all(e['success'] for e in episodes), episodes
    assert all(100 < e['steps'] < 300 for e in episodes)
    # The strict predicate: held by the left gripper only, lifted, off the table.
    state = cube_env.privileged()
    assert state['strict_success'] and state['box_pos'][2] > 0.08


def test_recorded_expert_episode_has_matching_arrays(cube_env):
    episode = run_expert_episode(cube_env, 3, record_track='state')
    n = episode['steps']
    # state track: 14 joint values + the cube's position
    assert episode['observations']['state'].shape == (n, 17)
    assert episode['actions'].shape == (n, 14)


def test_noise_makes_imperfect_demonstrations(cube_env):
    noisy = [run_expert_episode(cube_env, seed, ExpertConfig(waypoint_noise=0.03))
             for seed in range(6)]
    assert sum(e['success'] for e in noisy) < 6


def test_habc_sim_expert_command_prints_json_summary():
    result = subprocess.run(
        [sys.executable, '-m', 'habc.cli', 'sim', 'expert', '--task', 'transfer_cube',
         '--episodes', '2', '--workers', '2', '--json'],
        capture_output=True, text=True, timeout=300, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {'task', 'episodes', 'successes', 'success_rate', 'mean_steps'}
    assert summary['task'] == 'transfer_cube' and summary['episodes'] == 2
    assert summary['success_rate'] == summary['successes'] / 2
