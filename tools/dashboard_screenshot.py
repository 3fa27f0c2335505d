#!/usr/bin/env python3
"""Render the habc dashboard offscreen with real recorded episodes and save it as a PNG.

    . env.sh && python tools/dashboard_screenshot.py            # writes docs/dashboard.png
    python tools/dashboard_screenshot.py --out /tmp/d.png --keep /tmp/episodes

What is real and what is staged:
  - a real episode_recorder_node (its own process, namespace /robot1, a temporary storage
    folder) records two episodes published here at 50 Hz, as the teleop arbiter would
    publish them (policy -> human -> policy, then one still running: policy, a watchdog
    hold, policy, human, policy); the first is labelled by clicking the dashboard's Success
    button, which goes through the recorder's label service into the SQLite index;
  - the policy's ActionChunks (10 Hz while the human does not drive) carry a staged
    viability p_v (no policy or critic runs here); in the running episode it falls below the
    help threshold, and the policy node's own rule (habc_policy.help_request.HelpMonitor)
    raises a help request (latched on help_request, as the policy node publishes it) that the
    human's takeover answers; after the handback p_v recovers;
  - the earlier rounds (policy versions 1 to 3) are seeded straight into the same index and
    bag folder with the recorder's own classes (EpisodeIndex, EpisodeBagWriter), so that
    the table, the timelines and the per-version plot have some history;
  - learner/status and policy/status are published here with the fields the learner and
    the policy node publish (no training runs; the critic 'ok', a calibrated help threshold,
    and the open request while it is open).
Runs in its own ROS domain (random, unless ROS_DOMAIN_ID is set) on localhost only, so it
cannot disturb a running robot. Takes about 25 s.
"""

import argparse
import json
import math
import os
from pathlib import Path
import random
import subprocess
import sys
import tempfile
import threading
import time

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = 'robot1'
RATE_HZ = 50.0
# Earlier rounds, improving: (version, [(outcome, takeovers), ...]).
HISTORY = [('1', [('failure', 4), ('failure', 3), ('success', 2), ('failure', 4),
                  ('discarded', 5), ('success', 3)]),
           ('2', [('success', 2), ('failure', 3), ('success', 1), ('failure', 2),
                  ('success', 2)]),
           ('3', [('success', 1), ('success', 0), ('failure', 2), ('success', 1),
                  ('success', 1)])]
LIVE_VERSION = '4'
# The policy publishes a chunk every CHUNK_TICKS control ticks (10 Hz at 50 Hz).
CHUNK_TICKS = 5
# The help threshold as `habc calibrate` would have set it (policy/status shows its source).
HELP_THRESHOLD = 0.3
HELP_SOURCE = 'calibrated 0.300 (false alarms <= 0.10 on 60 successes)'


def smooth(t: float, t0: float, t1: float, v0: float, v1: float) -> float:
    """Return v0 before t0, v1 after t1 and a smoothstep between them."""
    x = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
    return v0 + (v1 - v0) * x * x * (3.0 - 2.0 * x)


def wobble(t: float) -> float:
    """Return a small deterministic wiggle, so a staged p_v is not drawn with a ruler."""
    return 0.006 * math.sin(11.0 * t) + 0.004 * math.sin(29.0 * t + 1.0)


def finished_viability(t: float) -> float:
    """p_v of the first episode at `t` s: confident throughout (the takeover was unasked)."""
    return smooth(t, 0.0, 4.4, 0.71, 0.88) + wobble(t)


def live_viability(t: float) -> float:
    """p_v of the running episode at `t` s from its start.

    Rising while the grasp goes well, then falling below HELP_THRESHOLD (the cube slips)
    fast enough that the low rule asks before the stall rule would; after the handback at
    4.9 s it recovers from where the human left the robot.
    """
    if t < 4.9:
        return smooth(t, 2.0, 3.0, smooth(t, 0.0, 2.0, 0.72, 0.85), 0.24) + wobble(t)
    return smooth(t, 4.9, 6.3, 0.46, 0.79) + wobble(t)


def seed_history(storage: Path, now: float) -> None:
    """Write the earlier rounds' episodes (bags + index rows) as the recorder would."""
    from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore
    from habc_episodes.episode import make_episode_id
    from habc_episodes.index import EpisodeIndex
    from habc_policy.episode_recorder import EpisodeCounts

    rng = random.Random(0)
    store = habc_typestore()
    types = store.types
    total = sum(len(episodes) for _, episodes in HISTORY)
    serial = 0
    with EpisodeIndex(storage / 'episodes.sqlite') as index:
        for version, episodes in HISTORY:
            for outcome, takeovers in episodes:
                serial += 1
                started = now - (total - serial + 1) * 95.0 - 120.0
                episode_id = make_episode_id(NAMESPACE, started, serial)
                ticks = episode_ticks(rng, takeovers)
                bag = storage / 'bags' / episode_id
                with EpisodeBagWriter(bag, store) as writer:
                    writer.add_topic(f'/{NAMESPACE}/intervention',
                                     'habc_msgs/msg/InterventionState')
                    for k, (source, segment, reason) in enumerate(ticks):
                        t = started + k / RATE_HZ
                        header = types['std_msgs/msg/Header'](
                            stamp=types['builtin_interfaces/msg/Time'](
                                sec=int(t), nanosec=int(t % 1 * 1e9)), frame_id='')
                        writer.write(f'/{NAMESPACE}/intervention', int(t * 1e9),
                                     types['habc_msgs/msg/InterventionState'](
                                         header=header, active=source == 1, source=source,
                                         segment_id=segment, episode_id=episode_id,
                                         reason=reason))
                counts = EpisodeCounts()  # the recorder's own rule for takeovers
                for source, _, _ in ticks:
                    counts.on_intervention_state(source)
                index.create(episode_id, bag, 'transfer the cube', version, started_at=started,
                             robot=NAMESPACE)
                index.finish(episode_id, len(ticks), counts.interventions,
                             ended_at=started + len(ticks) / RATE_HZ)
                note = {'failure': 'cube dropped at handover',
                        'discarded': 'camera cable in view'}.get(outcome, '')
                index.label(episode_id, outcome, 'alice', note,
                            now=started + len(ticks) / RATE_HZ + 5.0)


def episode_ticks(rng: random.Random, takeovers: int) -> list[tuple[int, int, str]]:
    """Return (source, segment_id, reason) per tick of a plausible 5-9 s episode."""
    length = rng.randint(260, 440)
    sources = [0] * length
    if rng.random() < 0.3:  # a watchdog hold
        start = rng.randint(20, length - 20)
        sources[start:start + 6] = [2] * 6
    # Takeovers in separate slots of the episode, so each one counts once.
    slot = (length - 40) // max(1, takeovers)
    for n in range(takeovers):
        start = 20 + n * slot + rng.randint(0, slot // 3)
        for k in range(start, start + rng.randint(max(10, slot // 4), max(11, slot // 2))):
            sources[k] = 1
    ticks, segment = [], 0
    for k, source in enumerate(sources):
        if k and source != sources[k - 1]:
            segment += 1
        reason = {0: 'policy', 1: 'pedal', 2: 'watchdog'}[source]
        ticks.append((source, segment, reason))
    return ticks


class Recorder:
    """The real episode_recorder_node in its own process."""

    def __init__(self, storage: Path) -> None:
        code = 'from habc_policy.episode_recorder_node import main; main()'
        self.process = subprocess.Popen(
            [sys.executable, '-c', code, '--ros-args', '-r', f'__ns:=/{NAMESPACE}',
             '-p', f'storage_dir:={storage}'], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if 'ready' in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> None:
        if not self._ready.wait(timeout):
            raise RuntimeError('episode recorder did not start:\n' + '\n'.join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: the node closes its index cleanly
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=ROOT / 'docs' / 'dashboard.png')
    parser.add_argument('--keep', type=Path, default=None,
                        help='storage folder to keep (default: a temporary one)')
    parser.add_argument('--size', default='1000x700', help='window size (default 1000x700)')
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split('x'))

    os.environ.setdefault('QT_QPA_PLATFORM', 'offscreen')
    os.environ.setdefault('ROS_DOMAIN_ID', str(random.Random().randint(150, 230)))
    from habc_common.ros_env import apply_project_defaults
    apply_project_defaults()
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'

    temporary = None
    if args.keep is None:
        temporary = tempfile.TemporaryDirectory(prefix='habc_dashboard_')
        storage = Path(temporary.name) / 'episodes'
    else:
        storage = args.keep
        if storage.exists() and any(storage.iterdir()):
            parser.error(f'--keep {storage} is not empty')
    storage.mkdir(parents=True, exist_ok=True)
    seed_history(storage, time.time())
    recorder = Recorder(storage)
    try:
        recorder.wait_ready()
        return render(storage, args.out, width, height)
    finally:
        recorder.stop()
        if temporary is not None:
            temporary.cleanup()


def render(storage: Path, out: Path, width: int, height: int) -> int:
    from python_qt_binding.QtCore import Qt
    from python_qt_binding.QtTest import QTest
    from python_qt_binding.QtWidgets import QApplication
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    from habc_common.qos import COMMANDS, LATCHED, LATCHED_EVENTS
    from habc_msgs.msg import ActionChunk, ExecutedAction, HelpRequest, InterventionState
    from habc_msgs.srv import EpisodeControl
    from habc_policy.help_request import HelpMonitor, HelpRequestParams, RAISED
    from rqt_habc.ros_adapter import DashboardRos
    from rqt_habc.widget import DashboardWidget

    app = QApplication.instance() or QApplication(['habc dashboard'])
    font = app.font()
    font.setPointSizeF(9.0)  # a desktop's default; the offscreen platform picks 12 pt
    app.setFont(font)
    rclpy.init()
    node = rclpy.create_node('dashboard_screenshot')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    ros = DashboardRos(namespace=NAMESPACE)
    widget = DashboardWidget(ros, storage / 'episodes.sqlite', labeler='alice', poll_ms=20,
                             refresh_ms=300)
    widget.resize(width, height)
    widget.show()

    def pump(predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            executor.spin_once(timeout_sec=0.005)
            app.processEvents()
        return predicate()

    try:
        pubs = {'intervention': node.create_publisher(
                    InterventionState, f'/{NAMESPACE}/intervention', COMMANDS),
                'executed_action': node.create_publisher(
                    ExecutedAction, f'/{NAMESPACE}/executed_action', COMMANDS)}
        chunk = node.create_publisher(ActionChunk, f'/{NAMESPACE}/policy/chunk', COMMANDS)
        help_request = node.create_publisher(HelpRequest, f'/{NAMESPACE}/help_request',
                                             LATCHED_EVENTS)
        learner = node.create_publisher(String, f'/{NAMESPACE}/learner/status', LATCHED)
        policy = node.create_publisher(String, f'/{NAMESPACE}/policy/status', LATCHED)
        control = node.create_client(EpisodeControl, f'/{NAMESPACE}/recorder/episode_control')
        if not pump(lambda: control.service_is_ready() and ros.recorder_ready()
                    and pubs['intervention'].get_subscription_count() >= 2
                    and chunk.get_subscription_count() >= 2
                    and help_request.get_subscription_count() >= 2):
            raise RuntimeError('the recorder is not reachable')

        def publish_policy_status(request=None) -> None:
            """Publish policy/status as the policy node does (on every help event too)."""
            policy.publish(String(data=json.dumps({
                'active_version': LIVE_VERSION, 'active_number': 4, 'staged_version': None,
                'last_update': {'source': 'policy/update', 'version': LIVE_VERSION,
                                'result': 'active', 'reason': '',
                                'sha256': '3f9c2a7e51d04b8c'},
                'critic': 'ok', 'executing_version': LIVE_VERSION,
                'help': {'requested': request is not None,
                         'reason': None if request is None else request.reason,
                         'since': None if request is None else request.stamp,
                         'critic_problem': None, 'threshold': HELP_THRESHOLD,
                         'threshold_source': HELP_SOURCE},
                'waiting': None, 'stamp': time.time()})))

        publish_policy_status()
        learner.publish(String(data=json.dumps({
            'state': 'idle', 'version': 4, 'round': 3, 'episodes': 16, 'pending': 1,
            'episodes_per_round': 4, 'method': 'habc', 'metrics': {
                'round/episodes': 16.0, 'round/samples': 5832.0, 'round/seconds': 48.7,
                'losses/actor': 0.0412, 'losses/critic': 0.173, 'advantage/mean': 0.021,
                'advantage/std': 0.31, 'weights/human_share': 0.38}})))

        def send(command: int) -> str:
            future = control.call_async(EpisodeControl.Request(command=command))
            if not pump(future.done):
                raise RuntimeError('no answer from recorder/episode_control')
            result = future.result()
            if not result.accepted:
                raise RuntimeError(result.message)
            return result.episode_id

        def publish_help(event) -> None:
            """Publish a help event as the policy node does (habc_policy.policy_node)."""
            if event is None:
                return
            msg = HelpRequest(active=event.kind == RAISED, reason=event.reason,
                              policy_version=LIVE_VERSION, viability=float(event.p_v))
            msg.header.stamp.sec = int(event.stamp)
            msg.header.stamp.nanosec = int(round((event.stamp % 1.0) * 1e9)) % 1_000_000_000
            msg.trace_stamps = [t for t, _ in event.trace]
            msg.trace_viability = [float(v) for _, v in event.trace]
            help_request.publish(msg)
            publish_policy_status(event if msg.active else None)

        def drive(episode_id: str, plan: list[tuple[int, float, str]], viability) -> None:
            """Publish 50 Hz ticks: plan is (source, seconds, reason) per segment.

            Stamps are the tick times of a 50 Hz control loop; a tick is published once
            its time has come (late on a busy machine, but the stamps stay regular). While
            the human does not drive, every CHUNK_TICKS-th tick also brings an ActionChunk
            planned from that tick's observation, with p_v `viability(seconds from the
            start)`; the policy node's help rule watches it and the takeovers.
            """
            monitor = HelpMonitor(HelpRequestParams(help_threshold=HELP_THRESHOLD))
            tick = 0
            start = time.time()
            chunk_id = 0
            ticks = sum(round(seconds * RATE_HZ) for _, seconds, _ in plan)  # V_e: steps left
            for segment, (source, seconds, reason) in enumerate(plan):
                for n in range(round(seconds * RATE_HZ)):
                    now = start + tick / RATE_HZ
                    pump(lambda now=now: time.time() >= now)
                    state = InterventionState(active=source == 1, source=source,
                                              segment_id=segment, episode_id=episode_id,
                                              reason=reason)
                    state.header.stamp.sec, state.header.stamp.nanosec = (
                        int(now), int(now % 1 * 1e9))
                    stamp = state.header.stamp.sec + state.header.stamp.nanosec * 1e-9
                    action = ExecutedAction(source=source, segment_id=segment,
                                            episode_id=episode_id,
                                            policy_version=LIVE_VERSION,
                                            joint_names=['j0'], positions=[0.01 * tick])
                    action.header = state.header
                    pubs['intervention'].publish(state)
                    pubs['executed_action'].publish(action)
                    if source == 1 and n == 0:
                        publish_help(monitor.on_takeover(stamp))  # answers an open request
                    elif source != 1 and tick % CHUNK_TICKS == 0:
                        chunk_id += 1
                        p_v = min(1.0, max(0.0, viability(tick / RATE_HZ)))
                        msg = ActionChunk(policy_version=LIVE_VERSION, chunk_id=chunk_id,
                                          horizon=1, action_dim=1, joint_names=['j0'],
                                          dt=1.0 / RATE_HZ, actions=[0.01 * tick],
                                          viability=p_v,
                                          efficiency_value=float(tick - ticks))
                        msg.header = state.header
                        chunk.publish(msg)
                        publish_help(monitor.update(stamp, p_v))
                    tick += 1

        finished = send(EpisodeControl.Request.COMMAND_START)
        # Reasons as the arbiter gives them (habc_policy.arbiter.ArbiterOutput.reason).
        drive(finished, [(0, 1.8, 'start'), (1, 1.1, 'engage'), (0, 1.5, 'handback')],
              finished_viability)
        pump(lambda: False, timeout=0.3)
        send(EpisodeControl.Request.COMMAND_END)
        if not pump(lambda: widget.target()[0] == finished):
            raise RuntimeError('the dashboard did not see the episode end')
        widget.note_edit.setText('clean handover')
        QTest.mouseClick(widget.buttons['success'], Qt.LeftButton)
        if not pump(lambda: widget.pending_label is None and widget.table.rowCount() > 0
                    and widget.table.item(0, 1).text() == 'success'):
            raise RuntimeError(f'label not confirmed: {widget.last_message}')

        live = send(EpisodeControl.Request.COMMAND_START)
        # p_v falls below the threshold in the second policy stretch: the robot asks for
        # help (low) and the human's takeover answers it; p_v recovers after the handback.
        drive(live, [(0, 1.4, 'start'), (2, 0.12, 'watchdog'), (0, 2.48, 'start'),
                     (1, 0.9, 'engage'), (0, 1.4, 'handback')], live_viability)
        pump(lambda: False, timeout=0.8)  # bag timelines load a couple per poll
        out.parent.mkdir(parents=True, exist_ok=True)
        if not widget.grab().save(str(out)):
            raise RuntimeError(f'could not write {out}')
        print(f'wrote {out} ({widget.width()}x{widget.height()}): live episode {live}, '
              f'labelled {finished}; index {storage / "episodes.sqlite"}')
        send(EpisodeControl.Request.COMMAND_END)
        return 0
    finally:
        widget.shutdown()
        widget.close()
        ros.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
