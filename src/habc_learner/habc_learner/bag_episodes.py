"""Episodes from recorded bags: one training step per executed control tick (no rclpy).

The episode recorder writes one rosbag2 (MCAP) per episode. The learner needs, per control
tick, what the robot was commanded and by whom (`executed_action`, habc_msgs/ExecutedAction)
and what the policy saw at that time (`observation`, habc_msgs/Observation). Each executed
action becomes one step t of an Episode:

    a_t          = the action's positions (after the arbiter's limits: what the robot got)
    controller_t = the action's source (policy / human / hold)
    s_t          = the newest observation whose header stamp is <= the action's stamp
                   (the one a policy could have acted on; never a later one)

Actions stamped before the first observation have no s_t and are skipped. Alignment uses
header stamps (the time of the tick and of the camera frame set), not the bag's receive
times, so a slow recorder does not shift observations against actions.

Bags from elsewhere (`ros2 bag record` of another stack) will need a topic mapping
(`TopicMapping`); today it only names the two habc topics.
"""

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Reader

from habc_learner.episode import Controller, Episode, EpisodeKind, Outcome
from habc_policy.bag_io import read_episode_messages

OBSERVATION_TYPE = 'habc_msgs/msg/Observation'
EXECUTED_ACTION_TYPE = 'habc_msgs/msg/ExecutedAction'
_CHANNELS = {'rgb8': (3, (0, 1, 2)), 'bgr8': (3, (2, 1, 0)),
             'rgba8': (4, (0, 1, 2)), 'bgra8': (4, (2, 1, 0))}


@dataclass(frozen=True)
class TopicMapping:
    """Which bag topics hold the learner's inputs.

    A relative name (no leading '/') matches the topic in any namespace ('observation'
    matches '/observation' and '/robot1/observation'); an absolute name must match exactly.
    The defaults are the habc topics (docs/ros_interfaces.md). This is the hook for training
    from foreign bags: a mapping from their camera, joint-state and command topics to these
    inputs will extend this class.
    """

    observation: str = 'observation'
    executed_action: str = 'executed_action'


def episode_from_bag(bag_path: str | Path, outcome: str | Outcome, *,
                     cameras: Sequence[int] | None = None, image_size: int | None = None,
                     topics: TopicMapping = TopicMapping(), episode_id: str | None = None,
                     kind: EpisodeKind = EpisodeKind.ROLLOUT) -> Episode:
    """Build an Episode from one recorded episode bag.

    Args:
        bag_path: rosbag2 directory of the episode.
        outcome: its label ('success', 'failure', ... or an Outcome).
        cameras: indices into Observation.images of the views to keep, in this order;
            None keeps every view.
        image_size: resize every image to image_size x image_size pixels; None keeps them.
        topics: which topics hold observations and executed actions.
        episode_id: the id to give the episode; None takes it from the executed actions (or
            the bag directory name when they carry none).
        kind: rollout (default) or demonstration.

    Returns:
        Episode with observations {'state': (T, S) float32 joint positions, 'images':
        (T, V, H, W, 3) uint8}, actions (T, D), controllers, policy versions and header
        timestamps (s) per step.

    Raises:
        FileNotFoundError: no bag at `bag_path`.
        ValueError: the bag lacks a needed topic (the message names what is missing and what
            the bag holds), no action follows an observation, or the messages are
            inconsistent (changing joint names, image sizes or view counts).
    """
    path = Path(bag_path)
    if not (path / 'metadata.yaml').is_file():
        raise FileNotFoundError(f'{path} is not a rosbag2 directory (no metadata.yaml); a bag '
                                'of a crashed recorder needs habc_policy.bag_io.recover_bag()')
    observation_topic, action_topic = _resolve_topics(path, topics)
    observations: list[tuple[int, object]] = []
    actions: list[tuple[int, object]] = []
    for topic, _, message in read_episode_messages(path, [observation_topic, action_topic]):
        stamp = _stamp_ns(message.header.stamp)
        (observations if topic == observation_topic else actions).append((stamp, message))
    # Python's sort is stable: equal stamps keep the order of the bag.
    observations.sort(key=lambda item: item[0])
    actions.sort(key=lambda item: item[0])
    obs_stamps = [stamp for stamp, _ in observations]
    chosen: list[int] = []
    kept: list[object] = []
    stamps: list[int] = []
    for stamp, action in actions:
        newest = bisect_right(obs_stamps, stamp) - 1
        if newest < 0:
            continue  # no observation yet: nothing a policy could have seen
        chosen.append(newest)
        kept.append(action)
        stamps.append(stamp)
    where = f'bag {path}'
    if not kept:
        raise ValueError(f'{where}: no {action_topic} message at or after the first '
                         f'{observation_topic} message ({len(actions)} actions, '
                         f'{len(observations)} observations); nothing to train on')

    # Decode each observation in use once (one may serve several ticks), then index per step.
    used = sorted(set(chosen))
    state = _stack_states([observations[i][1] for i in used], where)
    images = _stack_images([observations[i][1] for i in used], cameras, image_size, where)
    rows = {obs_index: row for row, obs_index in enumerate(used)}
    step_rows = np.array([rows[i] for i in chosen])

    joint_names = list(kept[0].joint_names)
    for action in kept:
        if list(action.joint_names) != joint_names:
            raise ValueError(f'{where}: the executed actions change joint names from '
                             f'{joint_names} to {list(action.joint_names)}')
    try:
        action_array = np.stack([np.asarray(a.positions, dtype=np.float32) for a in kept])
    except ValueError:
        raise ValueError(f'{where}: executed actions have different lengths '
                         f'{sorted({len(a.positions) for a in kept})}') from None
    try:
        controllers = [Controller(int(a.source)) for a in kept]
    except ValueError:
        bad = sorted({int(a.source) for a in kept} - {int(c) for c in Controller})
        raise ValueError(f'{where}: unknown executed_action source values {bad}; expected '
                         f'{[f"{c.value} {c.name.lower()}" for c in Controller]}') from None

    instruction = next((observations[i][1].instruction for i in chosen
                        if observations[i][1].instruction), '')
    if episode_id is None:
        episode_id = next((a.episode_id for a in kept if a.episode_id), path.name)
    observations_out = {'state': state[step_rows]}
    if images is not None:
        observations_out['images'] = images[step_rows]
    return Episode(observations=observations_out, actions=action_array,
                   controllers=controllers, outcome=Outcome.parse(outcome),
                   instruction=instruction, kind=kind,
                   policy_versions=[str(a.policy_version) for a in kept],
                   timestamps=np.array(stamps, dtype=np.float64) * 1e-9,
                   episode_id=episode_id)


def bag_topics(bag_path: str | Path) -> dict[str, tuple[str, int]]:
    """Return topic -> (message type, message count) of a bag."""
    with Reader(Path(bag_path)) as reader:
        return {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}


def match_topic(name: str, available: Sequence[str]) -> list[str]:
    """Return the topics of `available` that the mapping entry `name` matches."""
    if name.startswith('/'):
        return [topic for topic in available if topic == name]
    return [topic for topic in available
            if topic == name or topic == '/' + name or topic.endswith('/' + name)]


def _resolve_topics(path: Path, mapping: TopicMapping) -> tuple[str, str]:
    available = bag_topics(path)
    listing = ', '.join(f'{topic} ({msgtype}, {count})'
                        for topic, (msgtype, count) in sorted(available.items())) or 'nothing'
    resolved, problems = [], []
    for name, msgtype in ((mapping.observation, OBSERVATION_TYPE),
                          (mapping.executed_action, EXECUTED_ACTION_TYPE)):
        matches = match_topic(name, list(available))
        if not matches:
            problems.append(f'no topic {name!r} ({msgtype})')
        elif len(matches) > 1:
            problems.append(f'{name!r} matches several topics {matches}; give its absolute '
                            'name in the TopicMapping')
        elif available[matches[0]][0] != msgtype:
            problems.append(f'topic {matches[0]!r} has type {available[matches[0]][0]}, '
                            f'expected {msgtype}')
        elif available[matches[0]][1] == 0:
            problems.append(f'topic {matches[0]!r} has no messages')
        else:
            resolved.append(matches[0])
            continue
        resolved.append('')
    if problems:
        raise ValueError(f'bag {path} cannot be trained on: {"; ".join(problems)}. '
                         f'It holds: {listing}')
    return resolved[0], resolved[1]


def _stamp_ns(stamp: object) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _stack_states(observations: list, where: str) -> np.ndarray:
    names = list(observations[0].joint_state.name)
    rows = []
    for obs in observations:
        if list(obs.joint_state.name) != names:
            raise ValueError(f'{where}: observation joint names change from {names} to '
                             f'{list(obs.joint_state.name)}')
        rows.append(np.asarray(obs.joint_state.position, dtype=np.float32))
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f'{where}: observation joint states have different lengths '
                         f'{sorted({len(row) for row in rows})}')
    return np.stack(rows)


def _stack_images(observations: list, cameras: Sequence[int] | None, image_size: int | None,
                  where: str) -> np.ndarray | None:
    """Return (N, V, H, W, 3) uint8 of the chosen views, or None when no observation has any."""
    counts = {len(obs.images) for obs in observations}
    if counts == {0}:
        return None
    if len(counts) != 1:
        raise ValueError(f'{where}: observations hold different numbers of images '
                         f'{sorted(counts)}')
    (count,) = counts
    views = list(range(count)) if cameras is None else [int(c) for c in cameras]
    if not views or any(not 0 <= v < count for v in views):
        raise ValueError(f'{where}: camera indices {views} do not fit the {count} images per '
                         f'observation (valid: 0..{count - 1})')
    frames = [[_resize(_image_array(obs.images[v], where), image_size) for v in views]
              for obs in observations]
    shapes = {frame.shape for row in frames for frame in row}
    if len(shapes) != 1:
        raise ValueError(f'{where}: images have different sizes {sorted(shapes)}; pass '
                         'image_size to resize them to one size')
    return np.stack([np.stack(row) for row in frames])


def _image_array(image: object, where: str) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array of a sensor_msgs/Image."""
    encoding = str(image.encoding)
    if encoding not in _CHANNELS:
        raise ValueError(f'{where}: image encoding {encoding!r} is not supported; the sync '
                         f'node publishes rgb8 (supported: {sorted(_CHANNELS)})')
    channels, order = _CHANNELS[encoding]
    height, width, step = int(image.height), int(image.width), int(image.step)
    data = np.asarray(image.data, dtype=np.uint8)
    if step < width * channels or data.size < height * step:
        raise ValueError(f'{where}: a {width}x{height} {encoding} image has step {step} and '
                         f'{data.size} bytes; expected step >= {width * channels} and '
                         f'{height * step} bytes')
    # Rows may be padded to `step` bytes.
    rows = data[:height * step].reshape(height, step)[:, :width * channels]
    return rows.reshape(height, width, channels)[:, :, list(order)]


def _resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resize to size x size: block mean for whole-number factors, else nearest pixel."""
    if size is None:
        return image
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    if height % size == 0 and width % size == 0:
        fy, fx = height // size, width // size
        blocks = image.reshape(size, fy, size, fx, 3).astype(np.float32)
        return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)
    ys = (np.arange(size) * height / size).astype(int)
    xs = (np.arange(size) * width / size).astype(int)
    return np.ascontiguousarray(image[ys][:, xs])
