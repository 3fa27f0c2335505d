"""`habc play`: replay rosbag2 bags on ROS topics, the pip-environment `ros2 bag play`.

Publishes the raw CDR bytes of every recorded message (rclpy cannot publish rosbags message
objects, but it publishes serialized bytes with a publisher of the message's rclpy type),
spaced as recorded and scaled by --rate. MCAP and sqlite3 bags are read with rosbags; the
decisions (topics, names, timing) are habc_episodes.playback's, the QoS of habc topics
habc_common.qos'; this module is the rclpy edge.

With --record-episode the replay becomes a new episode of a running episode_recorder_node:
START before each pass, END after it, then LABEL when --label is given. A learner_node
watching that recorder's index trains on it like on a live episode; that is how recorded
episodes are fed to a live learner for offline retraining:

    habc play ~/.habc/episodes/bags/robot1-20250101-120000-1 --record-episode --label success

A bag recorded by the habc recorder holds fully qualified names ('/robot1/observation'):
replay it into another namespace with --remap /robot1:=/robot2, and a bag with root names
into a namespace with --namespace robot2 (which also finds the recorder's services there).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from typing import Any, TYPE_CHECKING

from habc_common.messages import message_class
from habc_episodes.vocabulary import LABEL_OUTCOMES, Outcome

if TYPE_CHECKING:
    from habc_episodes.playback import BagTopic, TopicQos

HELP = __doc__ + """
examples:
  habc play BAG                                   replay in real time
  habc play BAG1 BAG2 --rate 2 --loop             twice as fast, one bag after the other
  habc play BAG --topics observation executed_action
  habc play BAG --namespace robot1 --record-episode --label success

Ctrl-C stops; a replay that was being recorded is aborted (the recorder labels it discarded).
Exit codes: 0 done, 1 the recorder refused or was not found, 2 bad arguments or bags,
130 interrupted."""

# Time given to the recorder after the last message was acknowledged and before END: a
# best-effort topic (observation) has no acknowledgement, and the recorder takes queued
# messages one callback at a time.
SETTLE_S = 0.5
ACK_TIMEOUT_S = 5.0
SERVICE_TIMEOUT_S = 15.0


class PlayError(Exception):
    """A failure that ends `habc play` with one line and exit code 1."""


def topic_qos(topic: BagTopic) -> TopicQos:
    """Return the QoS to publish a recorded topic with.

    1. The QoS offers recorded with it (`ros2 bag record` stores them), when they agree.
    2. The habc profile of the topic (habc_common.qos.qos_for_topic): the habc recorder
       stores no offers, and e.g. a reliable publisher of the best-effort observation topic
       would reach subscribers that were never meant to wait for it.
    3. rosbag2's default: reliable, volatile, depth 10.
    """
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    from habc_common.qos import profile_name, qos_for_topic
    from habc_episodes.playback import recorded_qos, TopicQos

    recorded = recorded_qos(topic)
    if recorded is not None:
        return recorded
    profile = qos_for_topic(topic.name, topic.msgtype)
    if profile is None:
        return TopicQos()
    return TopicQos(profile.reliability == ReliabilityPolicy.RELIABLE,
                    profile.durability == DurabilityPolicy.TRANSIENT_LOCAL, profile.depth,
                    profile_name(profile))


def changed_types(topics: dict[str, Any], store: Any = None) -> dict[str, str]:
    """Return topic -> reason for recorded types whose definition differs from the installed.

    Raw bytes of another definition would be misread by every subscriber. The check uses
    the RIHS01 hash stored in the bag against rosbags' hash of the installed habc_msgs and of
    ROS 2 Jazzy's standard types; a type unknown there (or a bag without hashes) passes.
    """
    from habc_episodes.bag_format import habc_typestore

    store = store if store is not None else habc_typestore()
    changed = {}
    for name, topic in topics.items():
        if topic.digest and topic.msgtype in store.fielddefs:
            installed = store.hash_rihs01(topic.msgtype)
            if installed != topic.digest:
                changed[name] = (f'{topic.msgtype} was recorded with another definition '
                                 f'({topic.digest} vs installed {installed})')
    return changed


class Plan:
    """Which recorded topics play, where, with which type and QoS (plain data + classes)."""

    def __init__(self, bags: list[Any], topics: list[str], namespace: str,
                 remaps: list[tuple[str, str]]) -> None:
        from habc_episodes.bag_format import habc_typestore
        from habc_episodes.playback import BagTopic, output_topic

        self.bags = bags
        merged: dict[str, BagTopic] = {}
        for bag in bags:
            for name in topics:
                topic = bag.topics.get(name)
                if topic is None:
                    continue
                seen = merged.get(name)
                if seen is not None and seen.msgtype != topic.msgtype:
                    raise ValueError(f'topic {name} has type {seen.msgtype} in one bag and '
                                     f'{topic.msgtype} in {bag.path}; play them separately')
                offers = (seen.offers if seen else ()) + topic.offers
                merged[name] = BagTopic(name, topic.msgtype, topic.count + (
                    seen.count if seen else 0), topic.digest, offers)
        # Per bag: one bag of several may hold an older definition of a type.
        store = habc_typestore()
        self.skipped: dict[str, str] = {}
        for bag in bags:
            self.skipped.update(changed_types(
                {name: bag.topics[name] for name in topics if name in bag.topics}, store))
        self.classes: dict[str, type] = {}
        for name, topic in merged.items():
            if name in self.skipped:
                continue
            try:
                self.classes[name] = message_class(topic.msgtype)
            except ValueError as exc:
                self.skipped[name] = str(exc)
        self.topics = {name: merged[name] for name in self.classes}
        self.outputs = {name: output_topic(name, namespace, remaps) for name in self.topics}
        self.qos = {name: topic_qos(topic) for name, topic in self.topics.items()}
        targets: dict[str, str] = {}
        for name, output in self.outputs.items():
            if output in targets:
                raise ValueError(f'{targets[output]} and {name} would both play on {output}; '
                                 'change --remap')
            targets[output] = name

    def describe(self) -> list[str]:
        """Return one line per topic for the start-up log."""
        lines = []
        for name, topic in sorted(self.topics.items()):
            qos = self.qos[name]
            kind = ('best effort' if not qos.reliable else 'reliable') + (
                ', latched' if qos.transient_local else '')
            target = '' if self.outputs[name] == name else f' -> {self.outputs[name]}'
            lines.append(f'  {name}{target}  {topic.msgtype}  {topic.count} msgs  '
                         f'QoS {qos.source} ({kind}, depth {qos.depth})')
        for name, reason in sorted(self.skipped.items()):
            lines.append(f'  {name}  SKIPPED: {reason}')
        return lines


class Recorder:
    """Client of an episode_recorder_node's services: one episode per replayed pass."""

    def __init__(self, node: Any, executor: Any, prefix: str) -> None:
        from habc_msgs.srv import EpisodeControl, LabelEpisode

        self.node, self.executor = node, executor
        self.Control, self.Label = EpisodeControl, LabelEpisode
        self.control = node.create_client(EpisodeControl, f'{prefix}/episode_control')
        self.labeler = node.create_client(LabelEpisode, f'{prefix}/label_episode')
        self.episode_id = ''  # the episode recording now, '' between passes

    def wait(self, timeout_s: float) -> None:
        """Wait for both services; raise PlayError naming them when they do not appear."""
        for client in (self.control, self.labeler):
            if not client.wait_for_service(timeout_sec=timeout_s):
                name = self.node.resolve_service_name(client.srv_name)
                raise PlayError(f'no episode recorder: service {name} did not '
                                f'appear within {timeout_s:g} s; start episode_recorder_node '
                                '(habc launch bringup) in the namespace given by --namespace '
                                'or --recorder')

    def _call(self, client: Any, request: Any) -> Any:
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=SERVICE_TIMEOUT_S)
        if not future.done():
            client.remove_pending_request(future)
            raise PlayError(f'{client.srv_name}: no answer within {SERVICE_TIMEOUT_S:g} s')
        return future.result()

    def start(self, instruction: str) -> str:
        response = self._call(self.control, self.Control.Request(
            command=self.Control.Request.COMMAND_START, instruction=instruction))
        if not response.accepted:
            raise PlayError(f'the recorder refused START: {response.message}')
        self.episode_id = response.episode_id
        return response.message

    def end(self, abort: bool = False) -> str:
        command = (self.Control.Request.COMMAND_ABORT if abort
                   else self.Control.Request.COMMAND_END)
        response = self._call(self.control, self.Control.Request(command=command))
        self.episode_id = ''
        if not response.accepted:
            raise PlayError(f'the recorder refused {"ABORT" if abort else "END"}: '
                            f'{response.message}')
        return response.message

    def label(self, episode_id: str, outcome: str, labeler: str, note: str) -> str:
        response = self._call(self.labeler, self.Label.Request(
            episode_id=episode_id, outcome=int(Outcome.from_label(outcome)), labeler=labeler,
            note=note))
        if not response.accepted:
            raise PlayError(f'the recorder refused the label: {response.message}')
        return response.message


class BagPlayer:
    """The rclpy edge of `habc play`: one publisher per topic, raw bytes on time."""

    def __init__(self, plan: Plan, args: argparse.Namespace) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from rclpy.signals import SignalHandlerOptions

        from habc_common.ros_env import apply_project_defaults

        apply_project_defaults()  # before init: the RMW reads the environment there
        self.plan, self.args = plan, args
        self.context = rclpy.Context()
        # No rclpy signal handler: Ctrl-C must reach Python as KeyboardInterrupt while the
        # context still works, so that a recorded replay can be aborted cleanly.
        rclpy.init(args=[], context=self.context,
                   signal_handler_options=SignalHandlerOptions.NO)
        try:
            self.node = rclpy.create_node('habc_player',
                                          namespace='/' + args.namespace.strip('/'),
                                          context=self.context)
            self.executor = SingleThreadedExecutor(context=self.context)
            self.executor.add_node(self.node)
            self.publishers = {}
            for name, qos in plan.qos.items():
                profile = QoSProfile(
                    depth=qos.depth, history=HistoryPolicy.KEEP_LAST,
                    reliability=(ReliabilityPolicy.RELIABLE if qos.reliable
                                 else ReliabilityPolicy.BEST_EFFORT),
                    durability=(DurabilityPolicy.TRANSIENT_LOCAL if qos.transient_local
                                else DurabilityPolicy.VOLATILE))
                self.publishers[name] = self.node.create_publisher(
                    plan.classes[name], plan.outputs[name], profile)
            self.recorder = (Recorder(self.node, self.executor, args.recorder)
                             if args.record_episode else None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        import rclpy

        node = getattr(self, 'node', None)
        if node is not None:
            self.executor.shutdown()
            node.destroy_node()
        if self.context.ok():
            rclpy.shutdown(context=self.context)

    def wait_for_subscribers(self, timeout_s: float) -> None:
        """Wait until every publisher has a subscriber, at most `timeout_s`; log the rest."""
        if timeout_s <= 0:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.get_subscription_count() for p in self.publishers.values()):
                break
            time.sleep(0.05)
        lonely = sorted(self.plan.outputs[n] for n, p in self.publishers.items()
                        if not p.get_subscription_count())
        if lonely:
            print(f'habc play: no subscriber after {timeout_s:g} s on {", ".join(lonely)} '
                  '(played anyway)', file=sys.stderr)
        else:
            # Matching is seen from this side first; give the subscribers' side a moment.
            time.sleep(0.2)

    def play_pass(self, bag: Any, number: int) -> dict[str, int]:
        """Publish one pass of `bag` on time; return the count of messages per topic."""
        from tqdm import tqdm

        from habc_episodes.playback import pass_message_count, timed_messages

        topics = [t for t in self.publishers if t in bag.topics]
        counts = dict.fromkeys(topics, 0)
        bar = tqdm(total=pass_message_count(bag, topics), unit='msg', file=sys.stderr,
                   desc=f'pass {number} {bag.path.name}', disable=self.args.quiet or None,
                   mininterval=0.5, leave=False)
        started = time.monotonic()
        try:
            for due, topic, data in timed_messages(bag, topics, self.args.rate):
                delay = started + due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.publishers[topic].publish(data)
                counts[topic] += 1
                bar.update()
        finally:
            bar.close()
        if not self.args.quiet:
            print(f'pass {number}: {sum(counts.values())} messages of {bag.path} in '
                  f'{time.monotonic() - started:.2f} s (rate {self.args.rate:g})')
        return counts

    def flush(self) -> None:
        """Wait until reliable subscribers acknowledged everything, then let them catch up."""
        from rclpy.duration import Duration

        for name, publisher in self.publishers.items():
            if self.plan.qos[name].reliable and publisher.get_subscription_count():
                publisher.wait_for_all_acked(Duration(seconds=ACK_TIMEOUT_S))
        time.sleep(SETTLE_S)

    def run(self) -> int:
        """Play every pass; with a recorder, record and label one episode per pass."""
        from habc_episodes.playback import playlist

        args = self.args
        if self.recorder is not None:
            self.recorder.wait(args.wait_recorder)
        if args.start_paused:
            input('paused: press Enter to play ')
        for number, bag in enumerate(playlist(self.plan.bags, args.loop), start=1):
            self.wait_for_subscribers(args.wait)
            if self.recorder is not None:
                instruction = args.instruction or bag.custom_data.get('habc_instruction', '')
                print(self.recorder.start(instruction))
            counts = self.play_pass(bag, number)
            if self.recorder is not None:
                self.flush()
                self._finish_episode(bag, counts)
        return 0

    def _finish_episode(self, bag: Any, counts: dict[str, int]) -> None:
        args = self.args
        episode_id = self.recorder.episode_id
        message = self.recorder.end()
        print(message)
        played = sum(n for name, n in counts.items()
                     if self.plan.topics[name].msgtype == 'habc_msgs/msg/ExecutedAction')
        recorded = re.search(r'(\d+) steps', message)
        if recorded and int(recorded.group(1)) < played:
            print(f'habc play: WARNING: the recorder kept {recorded.group(1)} of {played} '
                  'executed actions (a slow recorder, or it does not record this topic; '
                  'try a lower --rate)', file=sys.stderr)
        if args.label:
            note = args.note or f'replay of {bag.path}'
            print(self.recorder.label(episode_id, args.label, args.labeler, note))

    def abort(self) -> None:
        """Abort an episode being recorded (Ctrl-C mid-pass): it must not be trained on."""
        if self.recorder is not None and self.recorder.episode_id:
            episode_id = self.recorder.episode_id
            try:
                self.recorder.end(abort=True)
                print(f'habc play: episode {episode_id} aborted (labelled discarded)',
                      file=sys.stderr)
            except PlayError as exc:
                print(f'habc play: could not abort episode {episode_id}: {exc}',
                      file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc play` options to a parser."""
    parser.add_argument('bags', nargs='+', metavar='BAG',
                        help='rosbag2 folder (MCAP or sqlite3) or a single .mcap/.db3 file')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed factor (default 1: as recorded)')
    parser.add_argument('--loop', action='store_true', help='start over after the last bag')
    parser.add_argument('--topics', nargs='+', metavar='TOPIC',
                        help='play only these: /absolute/name, or a name relative to any '
                        'namespace (observation)')
    parser.add_argument('--namespace', default='',
                        help='push every topic (and the recorder services) into this namespace')
    parser.add_argument('--remap', action='append', default=[], metavar='FROM:=TO',
                        help='rename a topic or namespace prefix, e.g. /robot1:=/robot2 '
                        '(repeatable)')
    parser.add_argument('--wait', type=float, default=None, metavar='S',
                        help='before each pass wait up to S s for every topic to have a '
                        'subscriber (default 0; 5 with --record-episode)')
    parser.add_argument('--start-paused', action='store_true',
                        help='wait for Enter before playing')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress output')
    group = parser.add_argument_group('recording the replay as an episode')
    group.add_argument('--record-episode', action='store_true',
                       help='START/END an episode of a running episode_recorder_node around '
                       'each pass')
    group.add_argument('--label', choices=[o.label for o in LABEL_OUTCOMES],
                       help='label each recorded episode (the learner trains on success and '
                       'failure)')
    group.add_argument('--note', default='', help='label note (default: "replay of BAG")')
    group.add_argument('--labeler', default='habc play', help='label author')
    group.add_argument('--instruction', default='',
                       help='episode instruction (default: the one stored in the bag)')
    group.add_argument('--recorder', default='recorder',
                       help="the recorder's service prefix, relative to --namespace "
                       '(default: recorder)')
    group.add_argument('--wait-recorder', type=float, default=30.0, metavar='S',
                       help="how long to wait for the recorder's services (default 30)")


def run(args: argparse.Namespace) -> int:
    """Replay the bags; see HELP for the exit codes."""
    from habc_episodes.playback import bag_info, check_rate, parse_remap, select_topics

    try:
        check_rate(args.rate)
        if args.label and not args.record_episode:
            raise ValueError('--label needs --record-episode (without it nothing records the '
                             'replay; label recorded episodes with `habc episodes label`)')
        remaps = [parse_remap(item) for item in args.remap]
        bags = [bag_info(path) for path in args.bags]
        available = {name for bag in bags for name in bag.topics}
        plan = Plan(bags, select_topics(available, args.topics), args.namespace, remaps)
    except (ValueError, FileNotFoundError) as exc:
        print(f'habc play: {exc}', file=sys.stderr)
        return 2
    if args.topics and plan.skipped:
        print(f'habc play: cannot play {", ".join(sorted(plan.skipped))}: '
              f'{"; ".join(plan.skipped.values())}', file=sys.stderr)
        return 2
    if not plan.topics:
        print('habc play: nothing to play', file=sys.stderr)
        for line in plan.describe():
            print(line, file=sys.stderr)
        return 2
    if args.wait is None:
        args.wait = 5.0 if args.record_episode else 0.0
    if not args.quiet:
        total = sum(bag.duration_s for bag in bags)
        print(f'playing {len(bags)} bag(s), {total:.2f} s recorded, at rate {args.rate:g}'
              f'{" in a loop" if args.loop else ""}:')
        for line in plan.describe():
            print(line)
    player = None
    # `kill` (a launcher, a test harness) ends a replay as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        player = BagPlayer(plan, args)
        return player.run()
    except KeyboardInterrupt:
        if player is not None:
            player.abort()
        print('habc play: interrupted', file=sys.stderr)
        return 130
    except PlayError as exc:
        if player is not None:
            player.abort()
        print(f'habc play: {exc}', file=sys.stderr)
        return 1
    finally:
        if player is not None:
            player.close()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run `habc play` on its own (python -m habc.play)."""
    parser = argparse.ArgumentParser(prog='habc play', description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == '__main__':
    main()
