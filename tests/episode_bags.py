"""Episode bags for tests of the tools (habc play, habc episodes): written with EpisodeBagWriter.

Imported by tests, not a fixture file. One tick k of an episode is: an Observation stamped
start + k * 20 ms (joint state 0.01 k, one 8x8 view of value k), then the InterventionState
and the ExecutedAction 1 us later (source of the tick, positions 0.01 k + 0.01). Help requests
(habc_msgs/HelpRequest on help_request), when given, go in at their stamps.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore

SEC = 1_000_000_000
TICK_NS = SEC // 50
NUM_JOINTS = 14
TOPICS = {'observation': 'habc_msgs/msg/Observation',
          'intervention': 'habc_msgs/msg/InterventionState',
          'executed_action': 'habc_msgs/msg/ExecutedAction'}

_STORE = None


def typestore():
    """Return one shared habc typestore (building one takes ~0.25 s)."""
    global _STORE
    if _STORE is None:
        _STORE = habc_typestore()
    return _STORE


def _header(stamp_ns: int):
    t = typestore().types
    return t['std_msgs/msg/Header'](
        stamp=t['builtin_interfaces/msg/Time'](sec=stamp_ns // SEC, nanosec=stamp_ns % SEC),
        frame_id='')


def observation(stamp_ns: int, k: int, instruction: str = 'transfer the cube'):
    t = typestore().types
    image = t['sensor_msgs/msg/Image'](header=_header(stamp_ns), height=8, width=8,
                                       encoding='rgb8', is_bigendian=0, step=24,
                                       data=np.full(192, k % 256, dtype=np.uint8))
    joints = t['sensor_msgs/msg/JointState'](
        header=_header(stamp_ns), name=[f'j{i}' for i in range(NUM_JOINTS)],
        position=np.full(NUM_JOINTS, 0.01 * k), velocity=np.zeros(NUM_JOINTS),
        effort=np.zeros(0))
    return t['habc_msgs/msg/Observation'](header=_header(stamp_ns), images=[image],
                                          joint_state=joints, instruction=instruction)


def executed_action(stamp_ns: int, source: int, k: int):
    return typestore().types['habc_msgs/msg/ExecutedAction'](
        header=_header(stamp_ns), source=source, segment_id=0, episode_id='recorded',
        policy_version='1', joint_names=[f'j{i}' for i in range(NUM_JOINTS)],
        positions=np.full(NUM_JOINTS, 0.01 * k + 0.01))


def intervention(stamp_ns: int, source: int, reason: str):
    return typestore().types['habc_msgs/msg/InterventionState'](
        header=_header(stamp_ns), active=source == 1, source=source, segment_id=0,
        episode_id='recorded', reason=reason)


def help_request(stamp_ns: int, active: bool, reason: str, viability: float,
                 policy_version: str = '1'):
    return typestore().types['habc_msgs/msg/HelpRequest'](
        header=_header(stamp_ns), active=active, reason=reason, policy_version=policy_version,
        viability=viability, trace_stamps=np.zeros(0), trace_viability=np.zeros(0, np.float32))


def write_episode(path: Path, sources: Sequence[int], reasons: Sequence[str] | None = None,
                  *, start_ns: int = 100 * SEC, namespace: str = '',
                  early_action: bool = False,
                  help_requests: Sequence[tuple[int, bool, str, float]] = ()) -> Path:
    """Write an episode bag with one tick per source; return its path.

    `early_action` adds an executed action 5 ms before the first observation, which the
    learner skips (nothing a policy could have seen). `help_requests`: (stamp ns, active,
    reason, p_v) of HelpRequest messages, written after the ticks at their stamps.
    """
    reasons = list(reasons) if reasons is not None else [''] * len(sources)
    with EpisodeBagWriter(path, typestore(),
                          custom_data={'habc_instruction': 'transfer the cube'}) as writer:
        for name, msgtype in TOPICS.items():
            writer.add_topic(f'{namespace}/{name}', msgtype)
        if help_requests:
            writer.add_topic(f'{namespace}/help_request', 'habc_msgs/msg/HelpRequest')
        messages = []
        if early_action:
            stamp = start_ns - 5_000_000
            messages.append(('executed_action', stamp, executed_action(stamp, 0, -1)))
        for k, (source, reason) in enumerate(zip(sources, reasons, strict=True)):
            stamp = start_ns + k * TICK_NS
            messages.append(('observation', stamp, observation(stamp, k)))
            messages.append(('intervention', stamp + 1000,
                             intervention(stamp + 1000, source, reason)))
            messages.append(('executed_action', stamp + 1000,
                             executed_action(stamp + 1000, source, k)))
        messages += [('help_request', stamp, help_request(stamp, active, reason, viability))
                     for stamp, active, reason, viability in help_requests]
        # In time order, as a recorder writes them (a stable sort: a tick's order stays).
        for name, stamp, message in sorted(messages, key=lambda item: item[1]):
            writer.write(f'{namespace}/{name}', stamp, message)
    return path
