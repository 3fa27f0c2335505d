"""Pytest fixtures that write habc episode bags (a plugin of every test; see conftest.py).

`typestore`: the habc typestore; `episode_bag(name, sources)`: a plausible episode, one
observation and one executed action per tick; `bags`: message builders and `write` for tests
that assemble a bag message by message.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore

SEC = 1_000_000_000
NUM_JOINTS = 14


@pytest.fixture(scope='session')
def typestore():
    return habc_typestore()


def _header(store, stamp_ns: int):
    t = store.types
    return t['std_msgs/msg/Header'](
        stamp=t['builtin_interfaces/msg/Time'](sec=stamp_ns // SEC, nanosec=stamp_ns % SEC),
        frame_id='')


def observation_message(store, stamp_ns: int, state: Sequence[float], pixel: int, *,
                        views: int = 1, size: int = 8, pad: int = 0,
                        instruction: str = 'transfer the cube'):
    """Return an Observation whose view v is filled with pixel + 10 v (rows padded by `pad`)."""
    t = store.types
    images = []
    for view in range(views):
        step = size * 3 + pad
        rows = np.full((size, step), 255, dtype=np.uint8)  # padding bytes must be cut off
        rows[:, :size * 3] = (pixel + 10 * view) % 256
        images.append(t['sensor_msgs/msg/Image'](
            header=_header(store, stamp_ns), height=size, width=size, encoding='rgb8',
            is_bigendian=0, step=step, data=rows.reshape(-1)))
    joints = t['sensor_msgs/msg/JointState'](
        header=_header(store, stamp_ns), name=[f'j{i}' for i in range(len(state))],
        position=np.asarray(state, dtype=np.float64), velocity=np.zeros(len(state)),
        effort=np.zeros(0))
    return t['habc_msgs/msg/Observation'](header=_header(store, stamp_ns), images=images,
                                          joint_state=joints, instruction=instruction)


def action_message(store, stamp_ns: int, source: int, positions: Sequence[float], *,
                   episode_id: str = 'ep', policy_version: str = '1', segment_id: int = 0):
    return store.types['habc_msgs/msg/ExecutedAction'](
        header=_header(store, stamp_ns), source=source, segment_id=segment_id,
        episode_id=episode_id, policy_version=policy_version,
        joint_names=[f'j{i}' for i in range(len(positions))],
        positions=np.asarray(positions, dtype=np.float64))


def write_bag(path: Path, store, messages: list[tuple[str, int, object]]) -> Path:
    """Write (topic, log time ns, rosbags message) in the given order; return the bag path."""
    with EpisodeBagWriter(path, store) as writer:
        for topic, log_time, message in messages:
            writer.add_topic(topic, message.__msgtype__)
            writer.write(topic, log_time, message)
    return path


def write_episode(path: Path, store, sources: Sequence[int], *, episode_id: str,
                  namespace: str = '', views: int = 1, size: int = 8,
                  start_ns: int = 100 * SEC) -> Path:
    """Write a plausible episode: per tick one observation, then the executed action."""
    messages = []
    dt = SEC // 50
    for k, source in enumerate(sources):
        stamp = start_ns + k * dt
        state = np.full(NUM_JOINTS, 0.01 * k)
        messages.append((f'{namespace}/observation', stamp,
                         observation_message(store, stamp, state, k, views=views, size=size)))
        messages.append((f'{namespace}/executed_action', stamp + 1000,
                         action_message(store, stamp + 1000, source, state + 0.01,
                                        episode_id=episode_id, segment_id=0)))
    return write_bag(path, store, messages)


@pytest.fixture
def episode_bag(tmp_path, typestore):
    """Return write(name, sources, **kwargs) -> bag path under tmp_path/bags."""
    def write(name: str, sources: Sequence[int], **kwargs) -> Path:
        return write_episode(tmp_path / 'bags' / name, typestore, sources, episode_id=name,
                             **kwargs)
    return write


@pytest.fixture
def bags(typestore):
    """Return the message and bag helpers above, bound to the habc typestore."""
    from types import SimpleNamespace
    return SimpleNamespace(
        observation=lambda *a, **k: observation_message(typestore, *a, **k),
        action=lambda *a, **k: action_message(typestore, *a, **k),
        write=lambda path, messages: write_bag(path, typestore, messages),
        SEC=SEC)


