"""Fixtures of the learner tests: an episode index and a tiny VLA checkpoint.

The bag fixtures (typestore, episode_bag, bags) come from tests/bag_fixtures.py.
"""

from pathlib import Path

import pytest


@pytest.fixture
def index(tmp_path):
    from habc_episodes.index import EpisodeIndex
    with EpisodeIndex(tmp_path / 'index' / 'episodes.sqlite') as opened:
        yield opened


def add_labelled(index, bag: Path, episode_id: str, outcome: str, steps: int,
                 *, now: float = 1000.0) -> None:
    """Create, finish and label an episode row in the index."""
    index.create(episode_id, str(bag), 'transfer the cube', '1', started_at=now)
    index.finish(episode_id, steps, 0, ended_at=now + 1.0)
    index.label(episode_id, outcome, 'test', now=now + 2.0)


@pytest.fixture(scope='session')
def init_checkpoint(tmp_path_factory):
    """Return a tiny SmallVLA saved as the SFT checkpoint (version 1)."""
    import torch

    from habc_policy.models.vla import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(state_dim=14, action_dim=14, horizon=10, num_views=1,
                                     image_size=32, hidden_dim=32, num_layers=1,
                                     cnn_channels=[8, 16], action_head='l2'))
    policy.version = '1'
    directory = tmp_path_factory.mktemp('sft') / 'checkpoint'
    policy.save(directory)
    return directory


@pytest.fixture
def labelled(index):
    """Return add(bag, episode_id, outcome, steps): an index row created, finished, labelled."""
    return lambda *a, **k: add_labelled(index, *a, **k)
