"""Faster CDR parsing of the few message types the episode loader reads most (no rclpy).

rosbags' generated deserializers decode every string of every message; a joint-state-like
message spends most of its time on its 10-20 joint names, which are the same bytes in every
message of a topic. `FastParser` parses little-endian CDR of

    sensor_msgs/Image, sensor_msgs/JointState, habc_msgs/Observation, habc_msgs/ExecutedAction

into the same message objects (the typestore's classes) as rosbags' deserializer, with the
same checks; a `string[]` field whose bytes equal those of the previous message's same
field reuses the decoded names (a new list of the same strings). Numeric arrays are numpy
views of the message bytes, as with bag_format.deserialize_view(). Anything else (big
endian, a type of another definition, data that rosbags would reject) is not parsed here:
parse() returns None and the caller deserializes with rosbags, which raises its own error.
"""

import functools
import struct

import numpy as np
from rosbags.typesys.store import Typestore

IMAGE = 'sensor_msgs/msg/Image'
JOINT_STATE = 'sensor_msgs/msg/JointState'
OBSERVATION = 'habc_msgs/msg/Observation'
EXECUTED_ACTION = 'habc_msgs/msg/ExecutedAction'
TYPES = (IMAGE, JOINT_STATE, OBSERVATION, EXECUTED_ACTION)
_DEPENDENCIES = ('std_msgs/msg/Header', 'builtin_interfaces/msg/Time')
_U32 = struct.Struct('<I').unpack_from
_U8 = struct.Struct('<B').unpack_from
_TIME = struct.Struct('<iI').unpack_from
_OFFSET = 4  # the CDR encapsulation header before the message


class _RejectError(Exception):
    """The bytes are not what this parser handles: rosbags decides."""


class FastParser:
    """Parse messages of TYPES from CDR bytes, for one stream of messages (one bag).

    Holds the last decoded `string[]` block per field, so use one parser per bag read.
    """

    def __init__(self, typestore: Typestore, reference: Typestore) -> None:
        """Parse the TYPES whose definitions in `typestore` equal those in `reference`.

        `reference` is the typestore this module was written against (the habc typestore:
        ROS 2 Jazzy's sensor_msgs and the habc_msgs of this workspace).
        """
        self.max_sequence = int(typestore.max_sequence_length)
        parsers = {IMAGE: self._image_message, JOINT_STATE: self._joint_state_message,
                   OBSERVATION: self._observation, EXECUTED_ACTION: self._executed_action}
        self.types = {name: parsers[name] for name in _supported(typestore, reference)}
        if self.types:
            self.time = typestore.get_msgdef('builtin_interfaces/msg/Time').cls
            self.header = typestore.get_msgdef('std_msgs/msg/Header').cls
        self.classes = {name: typestore.get_msgdef(name).cls for name in self.types}
        self._blocks: dict[str, tuple[bytes, list[str]]] = {}

    def parse(self, raw: bytes | memoryview, msgtype: str) -> object | None:
        """Return the `msgtype` message in CDR `raw`, or None to leave it to rosbags."""
        parser = self.types.get(msgtype)
        if parser is None or len(raw) < 4 or raw[0] != 0 or raw[1] != 1:
            return None  # not a type of ours, or not plain little-endian CDR
        try:
            message, end = parser(raw, 0)
        except (_RejectError, struct.error, ValueError, IndexError, UnicodeDecodeError):
            return None
        if end + _OFFSET + 3 < len(raw):
            return None  # bytes left over: rosbags reports the size mismatch
        return message

    # Fields. `pos` counts from the end of the encapsulation header, as CDR alignment does.

    def _string(self, raw: bytes | memoryview, pos: int) -> tuple[str, int]:
        pos = (pos + 3) & -4
        (length,) = _U32(raw, _OFFSET + pos)
        end = _OFFSET + pos + 4 + length
        if length < 1 or end > len(raw) or raw[end - 1] != 0:
            raise _RejectError
        return bytes(raw[_OFFSET + pos + 4:end - 1]).decode(), pos + 4 + length

    def _count(self, raw: bytes | memoryview, pos: int, minimum: int) -> tuple[int, int]:
        pos = (pos + 3) & -4
        (size,) = _U32(raw, _OFFSET + pos)
        pos += 4
        if _OFFSET + pos + size * minimum > len(raw) or size > self.max_sequence:
            raise _RejectError
        return size, pos

    def _strings(self, raw: bytes | memoryview, pos: int, field: str) -> tuple[list[str], int]:
        start = (pos + 3) & -4
        known = self._blocks.get(field)
        if known is not None:
            block, names = known
            if raw[_OFFSET + start:_OFFSET + start + len(block)] == block:
                # The same bytes from a 4-aligned start: the same strings, the same end.
                return list(names), start + len(block)
        size, pos = self._count(raw, start, 5)
        names = []
        for _ in range(size):
            name, pos = self._string(raw, pos)
            names.append(name)
        self._blocks[field] = (bytes(raw[_OFFSET + start:_OFFSET + pos]), names)
        return list(names), pos

    def _numbers(self, raw: bytes | memoryview, pos: int, dtype: type,
                 itemsize: int) -> tuple[np.ndarray, int]:
        size, pos = self._count(raw, pos, itemsize)
        if size and itemsize > 4:
            pos = (pos + itemsize - 1) & -itemsize
        if _OFFSET + pos + size * itemsize > len(raw):
            raise _RejectError
        return (np.frombuffer(raw, dtype=dtype, count=size, offset=_OFFSET + pos),
                pos + size * itemsize)

    def _uint32(self, raw: bytes | memoryview, pos: int) -> tuple[int, int]:
        pos = (pos + 3) & -4
        return _U32(raw, _OFFSET + pos)[0], pos + 4

    def _header(self, raw: bytes | memoryview, pos: int) -> tuple[object, int]:
        pos = (pos + 3) & -4
        sec, nanosec = _TIME(raw, _OFFSET + pos)
        frame_id, pos = self._string(raw, pos + 8)
        return self.header(self.time(sec, nanosec), frame_id), pos

    # Messages.

    def _image(self, raw: bytes | memoryview, pos: int, cls: type) -> tuple[object, int]:
        header, pos = self._header(raw, pos)
        height, pos = self._uint32(raw, pos)
        width, pos = self._uint32(raw, pos)
        encoding, pos = self._string(raw, pos)
        (is_bigendian,) = _U8(raw, _OFFSET + pos)
        step, pos = self._uint32(raw, pos + 1)
        data, pos = self._numbers(raw, pos, np.uint8, 1)
        return cls(header, height, width, encoding, is_bigendian, step, data), pos

    def _joint_state(self, raw: bytes | memoryview, pos: int, cls: type,
                     field: str) -> tuple[object, int]:
        header, pos = self._header(raw, pos)
        names, pos = self._strings(raw, pos, field)
        position, pos = self._numbers(raw, pos, np.float64, 8)
        velocity, pos = self._numbers(raw, pos, np.float64, 8)
        effort, pos = self._numbers(raw, pos, np.float64, 8)
        return cls(header, names, position, velocity, effort), pos

    def _image_message(self, raw: bytes | memoryview, pos: int) -> tuple[object, int]:
        return self._image(raw, pos, self.classes[IMAGE])

    def _joint_state_message(self, raw: bytes | memoryview, pos: int) -> tuple[object, int]:
        return self._joint_state(raw, pos, self.classes[JOINT_STATE], JOINT_STATE)

    def _observation(self, raw: bytes | memoryview, pos: int) -> tuple[object, int]:
        if IMAGE not in self.classes or JOINT_STATE not in self.classes:
            raise _RejectError
        header, pos = self._header(raw, pos)
        count, pos = self._count(raw, pos, 1)
        images = []
        for _ in range(count):
            image, pos = self._image(raw, pos, self.classes[IMAGE])
            images.append(image)
        joint_state, pos = self._joint_state(raw, pos, self.classes[JOINT_STATE],
                                             OBSERVATION)
        instruction, pos = self._string(raw, pos)
        return self.classes[OBSERVATION](header, images, joint_state, instruction), pos

    def _executed_action(self, raw: bytes | memoryview, pos: int) -> tuple[object, int]:
        header, pos = self._header(raw, pos)
        (source,) = _U8(raw, _OFFSET + pos)
        segment_id, pos = self._uint32(raw, pos + 1)
        episode_id, pos = self._string(raw, pos)
        policy_version, pos = self._string(raw, pos)
        joint_names, pos = self._strings(raw, pos, EXECUTED_ACTION)
        positions, pos = self._numbers(raw, pos, np.float64, 8)
        return self.classes[EXECUTED_ACTION](header, source, segment_id, episode_id,
                                             policy_version, joint_names, positions), pos


@functools.lru_cache(maxsize=8)
def _supported(typestore: Typestore, reference: Typestore) -> tuple[str, ...]:
    """Return the TYPES defined alike in both typestores (hashing them takes ~15 ms)."""
    if not all(_same_type(typestore, reference, name) for name in _DEPENDENCIES):
        return ()
    return tuple(name for name in TYPES if _same_type(typestore, reference, name))


def _same_type(typestore: Typestore, reference: Typestore, name: str) -> bool:
    """Return whether `name` has the same definition (RIHS01 hash) in both typestores."""
    try:
        return (name in typestore.fielddefs and name in reference.fielddefs
                and typestore.hash_rihs01(name) == reference.hash_rihs01(name))
    except Exception:  # noqa: BLE001 - a definition rosbags cannot hash: not ours
        return False
