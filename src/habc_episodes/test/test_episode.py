"""Episode data model and segments."""

import numpy as np
import pytest

from habc_episodes.episode import Episode, segment_ids, segments
from habc_episodes.vocabulary import Controller, Outcome


def make_episode(controllers, outcome='success'):
    n = len(controllers)
    return Episode(observations={'state': np.zeros((n, 3))},
                   actions=np.arange(n * 2, dtype=np.float32).reshape(n, 2),
                   controllers=controllers, outcome=outcome)


def test_parsing_and_validation():
    episode = make_episode(['policy', 'human', 'hold'])
    assert list(episode.controllers) == [0, 1, 2]
    assert episode.outcome == Outcome.SUCCESS
    assert Outcome.parse(None) == Outcome.UNLABELLED
    assert Outcome.parse(False) == Outcome.FAILURE
    assert Controller.parse(1) == Controller.HUMAN
    with pytest.raises(ValueError, match='2 controller entries for 3 actions'):
        Episode(observations={}, actions=np.zeros((3, 2)), controllers=[0, 0])
    with pytest.raises(ValueError, match="observation 'state' has 2 steps, actions have 3"):
        Episode(observations={'state': np.zeros((2, 3))}, actions=np.zeros((3, 2)),
                controllers=[0, 0, 0])


def test_segments_and_interventions():
    controllers = [0, 0, 1, 1, 0, 1, 2]
    assert list(segment_ids(controllers)) == [0, 0, 1, 1, 2, 3, 4]
    assert segments(controllers) == [(0, 2, Controller.POLICY), (2, 4, Controller.HUMAN),
                                     (4, 5, Controller.POLICY), (5, 6, Controller.HUMAN),
                                     (6, 7, Controller.HOLD)]
    assert make_episode(controllers).num_interventions == 2
    assert make_episode([1, 1, 0]).num_interventions == 1
