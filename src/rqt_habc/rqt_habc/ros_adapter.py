"""The dashboard's ROS side: a thin rclpy adapter the Qt widget polls (no Qt here).

It subscribes to one robot namespace (`intervention`, `recorder/events`, `policy/chunk`,
`policy/status`, `learner/status`), to `help_request` of every robot it is told to watch (a
robot that asks for help must be heard whichever one the dashboard follows), to the light
topics of every live robot for the fleet view (`intervention`, `recorder/events`,
`policy/status`), calls the recorder's `recorder/label_episode` service, and hands every
received message to the widget as an `Update` through a queue. The queue is what lets the
same widget run in two settings: standalone, where this adapter owns its node and the widget
spins it from a QTimer (`poll()`), and inside rqt, where rqt_gui_py owns the node and spins
it in its own thread while the widget only drains the queue.
"""

from __future__ import annotations

from dataclasses import dataclass
import queue
import time
from typing import Any

from rclpy.context import Context
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from habc_common.qos import COMMANDS, LATCHED, LATCHED_EVENTS
from habc_episodes.vocabulary import LABEL_OUTCOMES
from habc_msgs.msg import ActionChunk, EpisodeEvent, HelpRequest, InterventionState
from habc_msgs.srv import LabelEpisode
from rqt_habc.model import (
    live_namespaces,
    live_topic_candidates,
    namespaces_with,
    normalize_namespace,
    qualified,
)

# recorder/events is latched with depth 1 on the recorder's side; a deeper reader queue
# keeps events sent back to back (END, then LABELLED) until they are taken, and
# transient_local still delivers the latest one when the dashboard starts.
EVENTS_QOS = QoSProfile(depth=20, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)

# A poll spins until this many spins in a row found nothing to do (a service answer takes
# one spin to arrive and one more to run its done callback), or until its budget is spent.
_IDLE_SPINS = 2
_POLL_BUDGET_S = 0.03


@dataclass(frozen=True)
class Update:
    """One thing that arrived, and time.monotonic() at its arrival.

    `kind` is 'intervention', 'event', 'chunk', 'learner_status', 'policy_status',
    'label_result' or 'help' (whose `namespace` says which robot asks), and for the fleet
    view 'fleet_intervention', 'fleet_event' and 'fleet_policy_status' (of the robot in
    `namespace`, whichever is followed).
    """

    kind: str
    payload: Any
    received: float
    namespace: str = ''


@dataclass(frozen=True)
class LabelResult:
    """The recorder's answer to a label request."""

    episode_id: str
    outcome: str
    accepted: bool
    message: str


class DashboardRos:
    """Subscriptions and the label client of one robot namespace, behind a queue.

    Besides the followed robot: the help requests of every robot it is told to watch
    (watch_help) and the light topics of every robot of the fleet view (watch_fleet).
    """

    def __init__(self, node: Node | None = None, namespace: str = '/',
                 context: Context | None = None) -> None:
        """Use `node` (spun by its owner, e.g. rqt) or, when None, create and spin one.

        Creating a node needs an initialised rclpy context (standalone.py makes one):
        `context`, or else the default one.
        """
        self.owns_node = node is None
        if node is None:
            import rclpy
            from rclpy.executors import SingleThreadedExecutor
            self.node = rclpy.create_node('habc_dashboard', context=context)
            self.executor = SingleThreadedExecutor(context=context)
            self.executor.add_node(self.node)
        else:
            self.node, self.executor = node, None
        self._queue: queue.SimpleQueue[tuple[int | None, Update]] = queue.SimpleQueue()
        self._activity = 0
        # Messages of a namespace left behind may still sit in the queue; each is tagged
        # with the generation of the subscriptions that took it and dropped when stale
        # (help requests with None: they are kept, see _help_taker).
        self._generation = 0
        self._entities: list[Any] = []
        self._help_subscriptions: dict[str, Any] = {}  # namespace -> help_request
        self._fleet_subscriptions: dict[str, list[Any]] = {}  # namespace -> its light topics
        self._label_client = None
        self.namespace = '/'
        self.set_namespace(namespace)

    # Subscriptions --------------------------------------------------------------------------

    def set_namespace(self, namespace: str) -> str:
        """Follow another robot namespace; returns it normalised ('/robot1').

        Raises:
            ValueError: not a valid namespace (nothing is changed then).
        """
        namespace = normalize_namespace(namespace)
        self._destroy_entities()
        self._generation += 1
        self.namespace = namespace
        node = self.node
        self._entities = [
            node.create_subscription(InterventionState, qualified(namespace, 'intervention'),
                                     self._taker('intervention'), COMMANDS),
            node.create_subscription(EpisodeEvent, qualified(namespace, 'recorder/events'),
                                     self._taker('event'), EVENTS_QOS),
            # ActionChunk: its p_v (viability); COMMANDS as the policy publishes it.
            node.create_subscription(ActionChunk, qualified(namespace, 'policy/chunk'),
                                     self._taker('chunk'), COMMANDS),
            node.create_subscription(String, qualified(namespace, 'policy/status'),
                                     self._taker('policy_status'), LATCHED),
            node.create_subscription(String, qualified(namespace, 'learner/status'),
                                     self._taker('learner_status'), LATCHED),
        ]
        if namespace != '/':
            # One learner may serve several robots from the root namespace.
            self._entities.append(node.create_subscription(
                String, '/learner/status', self._taker('learner_status'), LATCHED))
        self._label_client = node.create_client(
            LabelEpisode, qualified(namespace, 'recorder/label_episode'))
        self.watch_help([namespace])
        return namespace

    def watch_help(self, namespaces: list[str]) -> list[str]:
        """Also hear the help requests of the robots in `namespaces`; return the new ones.

        These subscriptions stay when the followed namespace changes, until close().
        """
        added = []
        for namespace in namespaces:
            namespace = normalize_namespace(namespace)
            if namespace in self._help_subscriptions:
                continue
            # LATCHED_EVENTS as the policy publishes it: a request raised before this
            # dashboard started still arrives, with the ones that cleared around it.
            self._help_subscriptions[namespace] = self.node.create_subscription(
                HelpRequest, qualified(namespace, 'help_request'),
                self._help_taker(namespace), LATCHED_EVENTS)
            added.append(namespace)
        return added

    def watched_help(self) -> list[str]:
        """Return the namespaces whose help requests this adapter hears, sorted."""
        return sorted(self._help_subscriptions)

    def watch_fleet(self, namespaces: list[str]) -> tuple[list[str], list[str]]:
        """Hear the light topics of exactly the robots in `namespaces`; return (added, removed).

        A robot gone from the list (no longer live) loses its subscriptions, so the fleet
        view holds only running robots however many came and went.
        """
        wanted = {normalize_namespace(ns) for ns in namespaces}
        removed = sorted(set(self._fleet_subscriptions) - wanted)
        for namespace in removed:
            for subscription in self._fleet_subscriptions.pop(namespace):
                self.node.destroy_subscription(subscription)
        added = sorted(wanted - set(self._fleet_subscriptions))
        for namespace in added:
            # The QoS of each publisher: COMMANDS ticks, latched events and status (a robot
            # that ran before the dashboard still shows its episode and version).
            self._fleet_subscriptions[namespace] = [
                self.node.create_subscription(
                    InterventionState, qualified(namespace, 'intervention'),
                    self._fleet_taker('fleet_intervention', namespace), COMMANDS),
                self.node.create_subscription(
                    EpisodeEvent, qualified(namespace, 'recorder/events'),
                    self._fleet_taker('fleet_event', namespace), EVENTS_QOS),
                self.node.create_subscription(
                    String, qualified(namespace, 'policy/status'),
                    self._fleet_taker('fleet_policy_status', namespace), LATCHED),
            ]
        return added, removed

    def watched_fleet(self) -> list[str]:
        """Return the namespaces whose light topics the fleet view hears, sorted."""
        return sorted(self._fleet_subscriptions)

    def _fleet_taker(self, kind: str, namespace: str):
        def take(msg: Any) -> None:
            self._activity += 1
            # No generation: the fleet view is about every robot, followed or not.
            self._queue.put((None, Update(kind, msg, time.monotonic(), namespace)))
        return take

    def _taker(self, kind: str):
        generation = self._generation

        def take(msg: Any) -> None:
            self._activity += 1
            self._queue.put((generation, Update(kind, msg, time.monotonic())))
        return take

    def _help_taker(self, namespace: str):
        def take(msg: Any) -> None:
            self._activity += 1
            # Tagged with no generation: a robot's help request is news whichever namespace
            # the dashboard follows, before and after a change.
            self._queue.put((None, Update('help', msg, time.monotonic(), namespace)))
        return take

    def _destroy_entities(self) -> None:
        for entity in self._entities:
            self.node.destroy_subscription(entity)
        self._entities = []
        if self._label_client is not None:
            self.node.destroy_client(self._label_client)
            self._label_client = None

    # Polling -------------------------------------------------------------------------------

    def poll(self) -> list[Update]:
        """Spin the own node briefly (if this adapter owns it) and return what arrived."""
        if self.executor is not None:
            deadline = time.monotonic() + _POLL_BUDGET_S
            idle = 0
            while idle < _IDLE_SPINS and time.monotonic() < deadline:
                before = self._activity
                self.executor.spin_once(timeout_sec=0.0)
                idle = idle + 1 if self._activity == before else 0
        updates = []
        while True:
            try:
                generation, update = self._queue.get_nowait()
            except queue.Empty:
                return updates
            if generation is None or generation == self._generation:
                updates.append(update)

    # Services ------------------------------------------------------------------------------

    def recorder_ready(self) -> bool:
        """Return True when the recorder's label service of this namespace is reachable."""
        return self._label_client is not None and self._label_client.service_is_ready()

    def label(self, episode_id: str, outcome: str, note: str = '', labeler: str = '') -> None:
        """Ask the recorder to label `episode_id`; the answer comes as a 'label_result' update.

        Raises:
            ValueError: unknown outcome name.
            RuntimeError: the recorder's label service is not available.
        """
        labels = {o.label: o for o in LABEL_OUTCOMES}
        if outcome not in labels:
            raise ValueError(f'invalid outcome {outcome!r}; choose one of {list(labels)}')
        if not self.recorder_ready():
            raise RuntimeError(f'no episode recorder serves '
                               f'{qualified(self.namespace, "recorder/label_episode")}')
        request = LabelEpisode.Request(episode_id=episode_id, outcome=int(labels[outcome]),
                                       note=note, labeler=labeler)
        future = self._label_client.call_async(request)

        def done(finished: Any) -> None:
            self._activity += 1
            try:
                response = finished.result()
                result = LabelResult(episode_id, outcome, bool(response.accepted),
                                     response.message)
            except Exception as exc:  # noqa: BLE001 - reported in the dashboard, not raised
                result = LabelResult(episode_id, outcome, False, f'label call failed: {exc}')
            # Tagged current: an answer is shown even after a namespace change, since the
            # operator asked for it.
            self._queue.put((self._generation, Update('label_result', result,
                                                      time.monotonic())))
        future.add_done_callback(done)

    # Graph ---------------------------------------------------------------------------------

    def robot_namespaces(self) -> list[str]:
        """Return the namespaces with an episode recorder or a policy that may ask for help."""
        names = [name for name, _types in self.node.get_topic_names_and_types()]
        return sorted(set(namespaces_with(names)) | set(namespaces_with(names, 'help_request')))

    def live_robots(self) -> list[str]:
        """Return the namespaces where a robot stack runs now, sorted.

        Those with a publisher on `policy/status` or `intervention` (model.LIVE_TOPICS):
        publishers, since the names stay in the graph while this dashboard subscribes.
        """
        names = [name for name, _types in self.node.get_topic_names_and_types()]
        return live_namespaces({topic: self.node.count_publishers(topic)
                                for topic in live_topic_candidates(names)})

    def now(self) -> float:
        """Return the node clock's time in seconds (ROS time, as the message stamps)."""
        return self.node.get_clock().now().nanoseconds * 1e-9

    def close(self) -> None:
        """Destroy the subscriptions, the client and, when owned, the node."""
        self._destroy_entities()
        for subscription in self._help_subscriptions.values():
            self.node.destroy_subscription(subscription)
        self._help_subscriptions.clear()
        self.watch_fleet([])
        if self.owns_node:
            self.executor.shutdown()
            self.node.destroy_node()
