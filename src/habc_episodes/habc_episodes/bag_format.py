"""Episode bags (no rclpy): write and read rosbag2 MCAP files with the rosbags library.

One episode is one rosbag2 directory holding one MCAP file and metadata.yaml, readable by
`ros2 bag`, rosbags and the mcap tools. The habc_msgs types are registered from their .msg
text, so the type hashes in the bag equal rosidl's (rosbags computes RIHS01 itself).

What a writer killed mid-episode leaves behind, and why `EpisodeBagWriter.flush()` exists:
  - metadata.yaml is written only by close(), so rosbags (and ros2 bag) refuse the directory;
  - the MCAP file has no summary section and no footer, and rosbags' MCAP reader requires the
    footer (it does not fall back to a linear scan);
  - rosbags keeps the current chunk (up to 1 MiB, and the first chunk holds every schema and
    channel record) in memory and writes it only when it is full or the bag is closed: at
    low data rates a crash loses minutes of messages, or leaves a file with no records at all.
`flush()` writes the pending chunk and flushes the file; the writer does it on its own every
`flush_interval_s`. `habc_episodes.recovery.recover_bag()` then rewrites the complete records
of such a file into a proper bag, and the last chunk written before the crash is the last one
kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import functools
import os
from pathlib import Path
import struct
import time

from rosbags.interfaces import Connection, MessageDefinitionFormat, Qos
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.storage_mcap import McapWriter
from rosbags.serde import SerdeError
from rosbags.typesys import get_types_from_idl, get_types_from_msg, get_typestore, Stores
from rosbags.typesys.store import Typestore

from habc_episodes.cdr_fast import FastParser
from habc_episodes.cdr_fast import TYPES as FAST_TYPES
from habc_episodes.mcap_lean import chunk_messages

MSG_PACKAGE = 'habc_msgs'
# rosbag2 metadata version 8 is what ROS 2 Jazzy's rosbag2 writes; version 9 (later
# distributions) changes how QoS profiles are stored, which Jazzy's tools may not read.
BAG_VERSION = 8

_IDL_SEPARATOR = '=' * 80 + '\n'


# Types ---------------------------------------------------------------------------------------

def habc_msg_dir() -> Path:
    """Return the directory holding the habc_msgs .msg files.

    The installed share directory comes first (it is what rosidl built the Python and C
    types from); the source tree next to this package is the fallback for a workspace that
    is not built or not sourced.

    Raises:
        FileNotFoundError: neither location holds .msg files.
    """
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory(MSG_PACKAGE)) / 'msg')
    except (ImportError, LookupError, ValueError):
        pass  # not installed, or no ament index on this machine: use the source tree
    candidates.append(Path(__file__).resolve().parents[2] / MSG_PACKAGE / 'msg')
    for candidate in candidates:
        if any(candidate.glob('*.msg')):
            return candidate
    raise FileNotFoundError(
        f'no {MSG_PACKAGE} .msg files in {[str(c) for c in candidates]}; build and source '
        'the workspace (. env.sh) or run from a source checkout')


@functools.lru_cache(maxsize=4)
def _msg_types(msg_dir: Path) -> dict:
    types: dict = {}
    for path in sorted(msg_dir.glob('*.msg')):
        types.update(get_types_from_msg(path.read_text(), f'{MSG_PACKAGE}/msg/{path.stem}'))
    return types


def habc_typestore() -> Typestore:
    """Return a new ROS 2 Jazzy typestore with every habc_msgs message type registered."""
    typestore = get_typestore(Stores.ROS2_JAZZY)
    typestore.register(_msg_types(habc_msg_dir()))
    return typestore


@functools.lru_cache(maxsize=1)
def _shared_typestore() -> Typestore:
    # Building a typestore takes ~0.25 s; readers only deserialize, so they can share one.
    return habc_typestore()


def _types_from_definition(msgtype: str, encoding: str, text: str) -> dict:
    """Parse a message definition as stored in a bag (ros2msg or ros2idl, with dependencies)."""
    if encoding in ('ros2msg', 'msg'):
        return get_types_from_msg(text, msgtype)
    if encoding not in ('ros2idl', 'idl'):
        raise ValueError(f'unsupported schema encoding {encoding!r} for {msgtype}')
    types: dict = {}
    if text.startswith(f'{_IDL_SEPARATOR}IDL: '):
        for part in text.split(_IDL_SEPARATOR)[1:]:
            types.update(get_types_from_idl(part.split('\n', 1)[1]))
    else:
        types.update(get_types_from_idl(text))
    return types


def typestore_from_definition(msgtype: str, encoding: str, text: str) -> Typestore:
    typestore = get_typestore(Stores.EMPTY)
    typestore.register(_types_from_definition(msgtype, encoding, text))
    return typestore


# Writing -------------------------------------------------------------------------------------

class EpisodeBagWriter:
    """Write one episode into a new rosbag2 directory with one MCAP file.

    Messages are either raw CDR bytes (what an rclpy subscription with raw=True delivers) or
    rosbags message objects of the typestore. Use as a context manager, or call close().
    Not thread-safe: call it from one thread (in a node, one mutually exclusive callback
    group).
    """

    def __init__(self, path: str | Path, typestore: Typestore, *,
                 flush_interval_s: float | None = 1.0,
                 custom_data: Mapping[str, str] | None = None) -> None:
        """Create the bag directory `path` (it must not exist) and open the MCAP file.

        Args:
            path: bag directory to create.
            typestore: typestore that knows every type to be written (see habc_typestore()).
            flush_interval_s: write the pending chunk to disk when this long has passed since
                the last flush (checked on write); what was flushed survives a crash of this
                process. None flushes only on close() and when rosbags' 1 MiB chunk is full.
            custom_data: string pairs stored in metadata.yaml (lost if the writer crashes).
        """
        if flush_interval_s is not None and flush_interval_s < 0:
            raise ValueError(f'flush_interval_s must be >= 0 or None (got {flush_interval_s})')
        self.path = Path(path)
        self.typestore = typestore
        self.flush_interval_s = flush_interval_s
        self.message_count = 0
        self._connections: dict[str, Connection] = {}
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
        for key, value in (custom_data or {}).items():
            self._writer.set_custom_data(key, value)
        self._writer.open()
        self._last_flush = time.monotonic()
        self._closed = False

    @property
    def topics(self) -> dict[str, str]:
        """Return topic name -> message type of every added topic."""
        return {topic: conn.msgtype for topic, conn in self._connections.items()}

    def add_topic(self, name: str, msgtype: str, qos: Sequence[Qos] = ()) -> None:
        """Declare a topic before writing to it; `qos` is stored as its offered QoS profiles.

        Raises:
            ValueError: the type is unknown to the typestore, or the topic was added with
                another type.
        """
        self._check_open()
        if name in self._connections:
            if self._connections[name].msgtype != msgtype:
                raise ValueError(f'topic {name!r} was already added with type '
                                 f'{self._connections[name].msgtype}, not {msgtype}')
            return
        if msgtype not in self.typestore.fielddefs:
            raise ValueError(f'message type {msgtype!r} of topic {name!r} is not in the '
                             'typestore; register it (typestore.register(get_types_from_msg('
                             'text, name))) or use habc_typestore() for habc_msgs types')
        self._connections[name] = self._writer.add_connection(
            name, msgtype, typestore=self.typestore, offered_qos_profiles=list(qos))

    def write(self, topic: str, timestamp_ns: int,
              message: bytes | bytearray | memoryview | object) -> None:
        """Write one message received at `timestamp_ns` (nanoseconds since the epoch).

        Raises:
            KeyError: the topic was not added.
            TypeError: the message is neither CDR bytes nor a rosbags message of the topic's
                type (an rclpy message object, for instance).
            ValueError: bytes that are not CDR of the topic's type, or a negative timestamp.

        Raw bytes are stored cut to the length of the message they hold (see _exact_cdr()).
        """
        self._check_open()
        connection = self._connections.get(topic)
        if connection is None:
            raise KeyError(f'topic {topic!r} was not added to bag {self.path}; call '
                           'add_topic(topic, msgtype) first')
        if timestamp_ns < 0:
            raise ValueError(f'timestamp_ns must not be negative (got {timestamp_ns})')
        if isinstance(message, (bytes, bytearray, memoryview)):
            data = self._exact_cdr(topic, connection.msgtype, message)
        else:
            msgtype = getattr(message, '__msgtype__', None)
            if msgtype is None:
                raise TypeError(
                    f'cannot write a {type(message).__module__}.{type(message).__name__} to '
                    f'{topic!r}: pass raw CDR bytes (rclpy.serialization.serialize_message, '
                    'or a subscription with raw=True) or a rosbags message object')
            if msgtype != connection.msgtype:
                raise TypeError(f'topic {topic!r} has type {connection.msgtype}, got a '
                                f'{msgtype} message')
            data = self.typestore.serialize_cdr(message, msgtype)
        self._writer.write(connection, int(timestamp_ns), data)
        self.message_count += 1
        if (self.flush_interval_s is not None
                and time.monotonic() - self._last_flush >= self.flush_interval_s):
            self.flush()

    def _exact_cdr(self, topic: str, msgtype: str,
                   data: bytes | bytearray | memoryview) -> memoryview:
        try:
            return decode_cdr(self.typestore, msgtype, data)[1]
        except ValueError as exc:
            raise ValueError(f'data for topic {topic!r}: {exc}') from None

    def flush(self, fsync: bool = False) -> None:
        """Write buffered messages to the file so that they survive a crash of this process.

        `fsync=True` also asks the OS to put them on disk (survives a power cut; slower).
        """
        self._check_open()
        storage = self._writer.storage
        # rosbags has no public flush; its MCAP writer buffers the current chunk in memory.
        # This relies on McapWriter internals of rosbags 0.11 (test_bag_format covers it).
        if not isinstance(storage, McapWriter) or not hasattr(storage, 'close_chunk'):
            raise RuntimeError('this rosbags version has no McapWriter.close_chunk(); '
                               'EpisodeBagWriter.flush() needs updating')
        # Close only chunks that hold messages: a chunk of schema and channel records alone
        # gets a start time after its end time, which some readers trip over.
        if storage.chunk.msgs:
            storage.close_chunk()
        storage.bio.flush()
        if fsync:
            os.fsync(storage.bio.fileno())
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Finish the MCAP file (summary, footer) and write metadata.yaml; safe to repeat."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> EpisodeBagWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Close even after an exception: a bag with the messages so far beats no bag.
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f'bag {self.path} is closed')


def decode_cdr(typestore: Typestore, msgtype: str,
               data: bytes | bytearray | memoryview) -> tuple[object, memoryview]:
    """Return the `msgtype` message in CDR `data` and `data` cut to the message's length.

    rclpy's serialize_message (rmw_fastrtps) returns a buffer sized by an upper-bound
    estimate, with uninitialised bytes after the message; rosbags refuses to read such data
    back. Walking the message once (~5 us small, ~0.05 ms for two VGA images; the arrays are
    not copied) gives its true length and proves it matches the type.

    Raises:
        ValueError: `data` is not CDR, or not a `msgtype` message.
    """
    view = memoryview(data).cast('B')
    # A plain CDR stream starts with 00 00 (big endian) or 00 01 (little endian).
    if len(view) < 4 or bytes(view[:2]) not in (b'\x00\x00', b'\x00\x01'):
        raise ValueError('not CDR (no encapsulation header); pass what rclpy '
                         'serialize_message or a raw=True subscription gives')
    msgdef = typestore.get_msgdef(msgtype)
    deserialize = msgdef.deserialize_cdr_le if view[1] else msgdef.deserialize_cdr_be
    try:
        message, end = deserialize(view[4:], 0, msgdef.cls, typestore)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise ValueError(f'not a {msgtype} message: {exc}') from None
    return message, view[:4 + end]


# Reading -------------------------------------------------------------------------------------

def topic_summary(path: str | Path) -> tuple[dict[str, tuple[str, int]], int | None]:
    """Return topic -> (message type, message count) of a bag, and its last message time.

    The time is in ns (None for a bag without messages); nothing is deserialized.
    """
    with Reader(Path(path)) as reader:
        topics = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
        return topics, (reader.end_time if reader.message_count else None)


def read_episode_messages(path: str | Path, topics: Sequence[str] | None = None,
                          typestore: Typestore | None = None) -> Iterator[tuple[str, int, object]]:
    """Yield (topic, timestamp_ns, message) of a bag in timestamp order.

    Messages are deserialized with `typestore` (default: the habc typestore). A type the
    typestore lacks, or whose hash differs from the one recorded in the bag (a message
    definition changed since recording), is deserialized with the definition stored in the
    bag instead.

    Args:
        path: bag directory (run recover_bag() first on the bag of a crashed writer).
        topics: only these topics; None for all.
        typestore: typestore for deserialization.
    """
    with Reader(Path(path)) as reader:
        yield from read_messages(reader, topics, typestore)


def read_messages(reader: Reader, topics: Sequence[str] | None = None,
                  typestore: Typestore | None = None, *,
                  lean: bool = False) -> Iterator[tuple[str, int, object]]:
    """Yield (topic, timestamp_ns, message) of an open rosbags Reader, as read_episode_messages().

    For a caller that has opened the bag already (opening parses metadata.yaml: ~10 ms).
    `lean=True` is the episode loader's way, same messages in the same order, less work:
    uncompressed MCAP chunks are read by mcap_lean.chunk_messages() (without rosbags' two
    copies of each message) and the loader's common types are parsed by cdr_fast (joint
    names decoded once per bag). The numeric arrays of a message of 64 KiB or more are then
    views of its ~1 MiB chunk, which stays in memory while they live (the loader drops such
    messages at once).
    """
    store = typestore if typestore is not None else _shared_typestore()
    wanted = [c for c in reader.connections if topics is None or c.topic in topics]
    if not wanted:
        return  # Reader.messages() with no connections would yield every topic
    stores = {}
    for conn in wanted:
        known = conn.msgtype in store.fielddefs and (
            not conn.digest or store.hash_rihs01(conn.msgtype) == conn.digest)
        if known or conn.msgdef.format == MessageDefinitionFormat.NONE:
            stores[conn.id] = store
        else:
            encoding = ('ros2msg' if conn.msgdef.format == MessageDefinitionFormat.MSG
                        else 'ros2idl')
            stores[conn.id] = typestore_from_definition(conn.msgtype, encoding, conn.msgdef.data)
    messages = chunk_messages(reader, wanted) if lean else None
    if messages is None:
        messages = reader.messages(connections=wanted)
    parsers: dict[int, FastParser] = {}
    if lean:
        for conn in wanted:
            if conn.msgtype in FAST_TYPES and id(stores[conn.id]) not in parsers:
                parsers[id(stores[conn.id])] = FastParser(stores[conn.id], _shared_typestore())
    for conn, timestamp, raw in messages:
        conn_store = stores[conn.id]
        parser = parsers.get(id(conn_store))
        message = parser.parse(raw, conn.msgtype) if parser is not None else None
        if message is None:
            message = deserialize_view(conn_store, raw, conn.msgtype)
        yield conn.topic, timestamp, message


def deserialize_view(typestore: Typestore, raw: bytes | bytearray | memoryview,
                     msgtype: str) -> object:
    """Return the `msgtype` message in CDR `raw`, as typestore.deserialize_cdr() does, uncopied.

    rosbags' deserialize_cdr() starts with `raw[4:]`, which copies the whole message (two
    camera frames: ~180 kB) before reading it; the slice of a memoryview is free. rosbags'
    own generated deserializer then reads the same bytes, so the message is the same, except
    that its numeric arrays (uint8[] image data, float64[] positions) are numpy views into
    `raw` (read-only for bytes) that keep `raw` alive while they live. Same checks and
    errors as rosbags.

    Raises:
        SerdeError: not CDR, not a `msgtype` message, or bytes left over.
    """
    if len(raw) < 4 or bytes(raw[:2]) not in (b'\x00\x00', b'\x00\x01'):
        raise SerdeError('Invalid or unsupported CDR encapsulation.')
    msgdef = typestore.get_msgdef(msgtype)
    deserialize = msgdef.deserialize_cdr_le if raw[1] else msgdef.deserialize_cdr_be
    try:
        message, end = deserialize(memoryview(raw).cast('B')[4:], 0, msgdef.cls, typestore)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise SerdeError(f'Could not deserialize {msgtype!r}: {exc}') from exc
    if end + 4 + 3 < len(raw):
        raise SerdeError(f'CDR message size mismatch for {msgtype!r}.')
    return message
