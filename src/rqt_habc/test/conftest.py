"""Fixtures of the dashboard tests: an offscreen QApplication and recorded episodes."""

from pathlib import Path

import numpy as np
import pytest

from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore
from habc_episodes.index import EpisodeIndex


@pytest.fixture(scope='session')
def qapp():
    """Return the QApplication of the test process (offscreen: the root conftest sets it)."""
    from python_qt_binding.QtWidgets import QApplication
    return QApplication.instance() or QApplication(['rqt_habc_tests'])


def write_intervention_bag(path: Path, ticks: list[tuple[float, int, int]],
                           episode_id: str) -> None:
    """Write a bag with InterventionState ticks (stamp_s, source, segment_id) as recorded."""
    store = habc_typestore()
    types = store.types
    with EpisodeBagWriter(path, store) as writer:
        writer.add_topic('/intervention', 'habc_msgs/msg/InterventionState')
        writer.add_topic('/executed_action', 'habc_msgs/msg/ExecutedAction')
        for stamp, source, segment_id in ticks:
            head = types['std_msgs/msg/Header'](stamp=types['builtin_interfaces/msg/Time'](
                sec=int(stamp), nanosec=round((stamp % 1) * 1e9)), frame_id='')
            writer.write('/intervention', int(stamp * 1e9), types[
                'habc_msgs/msg/InterventionState'](header=head, active=source == 1,
                                                   source=source, segment_id=segment_id,
                                                   episode_id=episode_id, reason=''))
            writer.write('/executed_action', int(stamp * 1e9), types[
                'habc_msgs/msg/ExecutedAction'](header=head, source=source,
                                                segment_id=segment_id, episode_id=episode_id,
                                                policy_version='', joint_names=['a'],
                                                positions=np.zeros(1)))


@pytest.fixture
def episodes(tmp_path):
    """Return a function adding a finished, recorded episode to an index under tmp_path."""
    index_path = tmp_path / 'episodes' / 'episodes.sqlite'

    def add(episode_id: str, ticks: list[tuple[float, int, int]], *, version: str = '1',
            outcome: str = '', robot: str = 'robot', takeovers: int = 0) -> Path:
        bag = tmp_path / 'episodes' / 'bags' / episode_id
        write_intervention_bag(bag, ticks, episode_id)
        with EpisodeIndex(index_path) as index:
            index.create(episode_id, bag, 'task', version, started_at=ticks[0][0], robot=robot)
            index.finish(episode_id, len(ticks), takeovers, ended_at=ticks[-1][0])
            if outcome:
                index.label(episode_id, outcome, 'seed', '', now=ticks[-1][0] + 1.0)
        return index_path
    return add
