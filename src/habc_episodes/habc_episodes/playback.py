"""Bag playback core (no rclpy): what `habc play` publishes, on which topic, with which QoS, when.

`habc play` (habc.play) is the rclpy adapter; everything it decides comes from here, so it can
be tested without DDS:

    bag_info()        the topics, types, counts and recorded QoS offers of a rosbag2 bag
                      (MCAP or sqlite3, read with rosbags)
    select_topics()   the --topics filter ('/robot1/observation' exactly, or 'observation' in
                      any namespace, as habc_episodes.episode_bags.match_topic)
    output_topic()    --remap and --namespace applied to a recorded topic name
    recorded_qos()    the publisher QoS the recorded offers ask for, if they agree (else
                      habc.play uses the habc profile of the topic, habc_common.qos)
    play_offsets()    when each message is due: (t_i - t_0) / rate seconds after the pass
                      starts, t being the bag's receive times as `ros2 bag play` uses them
    playlist()        the order of passes: every bag once, one after another; --loop repeats
    timed_messages()  one pass of one bag: (due seconds, topic, raw CDR bytes), streamed
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
import itertools
from pathlib import Path

from rosbags.interfaces import Qos, QosDurability, QosHistory, QosReliability
from rosbags.rosbag2 import Reader
import yaml

NS_PER_S = 1_000_000_000
# rosbag2's default for a topic recorded without QoS offers: the rclcpp default profile.
DEFAULT_DEPTH = 10


@dataclass(frozen=True)
class TopicQos:
    """A publisher QoS as plain data; the rclpy adapter turns it into a QoSProfile."""

    reliable: bool = True
    transient_local: bool = False
    depth: int = DEFAULT_DEPTH
    # Where it came from, for the log: 'bag', the habc_common.qos profile name, 'default'.
    source: str = 'default'


@dataclass(frozen=True)
class BagTopic:
    """One topic of a bag."""

    name: str
    msgtype: str
    count: int
    # RIHS01 type hash recorded with the topic ('' when the bag has none).
    digest: str = ''
    offers: tuple[Qos, ...] = ()


@dataclass(frozen=True)
class BagInfo:
    """What a bag holds (read once, before playing)."""

    path: Path
    storage: str
    start_ns: int
    end_ns: int
    message_count: int
    topics: dict[str, BagTopic] = field(default_factory=dict)
    custom_data: dict[str, str] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(0, self.end_ns - self.start_ns) / NS_PER_S


def bag_info(path: str | Path) -> BagInfo:
    """Read the metadata of a rosbag2 bag (directory, or a single .mcap / .db3 file).

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: rosbags cannot open it (the message says why; a bag of a crashed
            recorder needs habc_episodes.recovery.recover_bag()).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'bag {path} does not exist')
    try:
        with Reader(path) as reader:
            topics = {}
            for conn in reader.connections:
                offers = tuple(getattr(conn.ext, 'offered_qos_profiles', None) or ())
                topics[conn.topic] = BagTopic(conn.topic, conn.msgtype, conn.msgcount,
                                              conn.digest or '', offers)
            empty = reader.message_count == 0
            # rosbags' end_time is one past the last message's time.
            info = BagInfo(path, _storage_of(path), 0 if empty else reader.start_time,
                           0 if empty else reader.end_time - 1, reader.message_count, topics,
                           _custom_data(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # rosbags raises its own error types
        raise ValueError(f'cannot read bag {path}: {type(exc).__name__}: {exc} (a bag of a '
                         'recorder that crashed needs habc_episodes.recovery.recover_bag())') \
            from None
    return info


def _storage_of(path: Path) -> str:
    files = [path] if path.is_file() else list(path.iterdir())
    suffixes = {p.suffix for p in files}
    return 'mcap' if '.mcap' in suffixes else 'sqlite3' if '.db3' in suffixes else ''


def _custom_data(path: Path) -> dict[str, str]:
    """Return the custom_data of metadata.yaml (the habc recorder stores the episode there)."""
    metadata = path / 'metadata.yaml'
    if not metadata.is_file():
        return {}
    try:
        info = (yaml.safe_load(metadata.read_text()) or {}).get(
            'rosbag2_bagfile_information') or {}
    except (OSError, yaml.YAMLError):
        return {}  # rosbags read the file already; a second opinion is not worth failing
    return {str(k): str(v) for k, v in (info.get('custom_data') or {}).items()}


def match_topic(pattern: str, available: Iterable[str]) -> list[str]:
    """Return the topics a filter entry names: an absolute name exactly, a relative one anywhere.

    'observation' matches '/observation' and '/robot1/observation' (the same rule as
    habc_episodes.episode_bags.match_topic, so one name works for both tools).
    """
    if pattern.startswith('/'):
        return [topic for topic in available if topic == pattern]
    return [topic for topic in available
            if topic == '/' + pattern or topic.endswith('/' + pattern)]


def select_topics(available: Iterable[str], wanted: Sequence[str] | None) -> list[str]:
    """Return the topics to play, sorted: all of them, or those the filter entries name.

    Raises:
        ValueError: an entry matches no topic (the message lists what the bags hold).
    """
    available = sorted(set(available))
    if not wanted:
        return available
    chosen: set[str] = set()
    missing = []
    for pattern in wanted:
        matches = match_topic(pattern.strip(), available)
        if not matches:
            missing.append(pattern)
        chosen.update(matches)
    if missing:
        raise ValueError(f'--topics {missing} match no topic of the bag(s); they hold: '
                         f'{", ".join(available) or "nothing"}')
    return sorted(chosen)


def parse_remap(item: str) -> tuple[str, str]:
    """Parse one --remap entry 'FROM:=TO' (absolute topic names or namespace prefixes).

    Raises:
        ValueError: not 'FROM:=TO', or a name that is not absolute.
    """
    old, sep, new = item.partition(':=')
    old, new = old.strip(), new.strip()
    if not sep or not old.startswith('/') or not new.startswith('/'):
        raise ValueError(f'--remap {item!r}: expected /recorded/name:=/new/name (absolute '
                         'names; a namespace prefix like /robot1:=/robot2 renames every topic '
                         'under it)')
    return old.rstrip('/') or '/', new.rstrip('/') or '/'


def output_topic(name: str, namespace: str = '',
                 remaps: Sequence[tuple[str, str]] = ()) -> str:
    """Return the topic a recorded topic is published on.

    The first remap whose FROM is the name or a namespace prefix of it renames it; then a
    non-empty `namespace` is put in front ('/observation' in namespace robot1 is
    '/robot1/observation').
    """
    for old, new in remaps:
        if name == old or name.startswith(old.rstrip('/') + '/'):
            rest = name[len(old.rstrip('/')):]
            name = (new.rstrip('/') + rest) or '/'
            break
    namespace = namespace.strip('/')
    return f'/{namespace}{name}' if namespace else name


def recorded_qos(topic: BagTopic) -> TopicQos | None:
    """Return the QoS the offers recorded with a topic ask for; None when they do not tell.

    `ros2 bag record` stores the publishers' offers; when they agree on reliability and
    durability, the replay publishes with them (a transient_local offer makes a latched
    publisher, so a subscriber that starts later still gets the last message). Offers that
    disagree, and bags without offers (the habc recorder's), fall through to the topic's
    habc profile, as rosbag2's player falls through to its default.
    """
    offers = [q for q in topic.offers
              if q.reliability in (QosReliability.RELIABLE, QosReliability.BEST_EFFORT)
              and q.durability in (QosDurability.TRANSIENT_LOCAL, QosDurability.VOLATILE)]
    if not offers or len({(q.reliability, q.durability) for q in offers}) != 1:
        return None
    offer = offers[0]
    depth = max((q.depth for q in offers if q.history == QosHistory.KEEP_LAST), default=0)
    return TopicQos(offer.reliability == QosReliability.RELIABLE,
                    offer.durability == QosDurability.TRANSIENT_LOCAL,
                    depth if depth > 0 else DEFAULT_DEPTH, 'bag')


def play_offsets(timestamps_ns: Sequence[int], rate: float = 1.0) -> list[float]:
    """Return when each message is due, in seconds after the first one, at `rate`.

    Raises:
        ValueError: `rate` is not positive.
    """
    check_rate(rate)
    if not timestamps_ns:
        return []
    first = timestamps_ns[0]
    return [(t - first) / NS_PER_S / rate for t in timestamps_ns]


def check_rate(rate: float) -> None:
    """Raise ValueError unless `rate` is a positive, finite number."""
    if not rate > 0 or rate == float('inf'):
        raise ValueError(f'--rate must be a positive number (got {rate}); 1 plays in real '
                         'time, 2 twice as fast')


def playlist(bags: Sequence[BagInfo], loop: bool = False) -> Iterator[BagInfo]:
    """Yield the passes to play: every bag once, in the given order; forever with `loop`.

    Several bags play one after another, each from its own start (one pass per bag, so that
    `--record-episode` records one episode per bag), not merged on one timeline.
    """
    if not bags:
        return
    yield from itertools.cycle(bags) if loop else bags


def timed_messages(bag: BagInfo, topics: Iterable[str],
                   rate: float = 1.0) -> Iterator[tuple[float, str, bytes]]:
    """Yield (due seconds after the pass start, recorded topic, raw CDR bytes) of one pass.

    Messages stream from the bag in receive-time order; time 0 is the first played message.
    """
    check_rate(rate)
    wanted = set(topics)
    with Reader(bag.path) as reader:
        connections = [c for c in reader.connections if c.topic in wanted]
        if not connections:
            return  # Reader.messages() with no connections would yield every topic
        first = None
        for conn, timestamp, data in reader.messages(connections=connections):
            if first is None:
                first = timestamp
            yield (timestamp - first) / NS_PER_S / rate, conn.topic, bytes(data)


def pass_message_count(bag: BagInfo, topics: Iterable[str]) -> int:
    """Return the number of messages one pass of `bag` plays."""
    return sum(bag.topics[t].count for t in topics if t in bag.topics)
