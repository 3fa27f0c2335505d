"""A lean MCAP message reader for the episode loader (no rclpy).

rosbags' MCAP reader copies every message twice after reading its chunk (one BytesIO read
for the record, one for the message data). `chunk_messages()` reads what rosbags'
`Reader.messages()` reads, from the chunks that rosbags indexed when it opened the bag, and
hands out each message's data as a memoryview of its chunk's bytes:

  - same messages, same order: per chunk sorted by log time (stable: equal times keep the
    chunk's record order), chunks merged by (log time, chunk offset), files of a rosbag2
    directory one after the other; messages outside their chunk's time range are dropped,
    as rosbags drops them;
  - the chunk CRC is checked as rosbags checks it (zlib's crc32 over the chunk's bytes,
    when the writer stored one);
  - only uncompressed chunks (what rosbag2 and our recorder write by default) of indexed
    MCAP files: a compressed chunk, an unindexed MCAP file (no summary), a sqlite3 bag,
    per-message compression or a rosbags version without the internals used here make
    `chunk_messages()` return None, and the caller reads with rosbags.

A view keeps its whole chunk (~1 MiB) alive: messages smaller than `COPY_BELOW` bytes are
handed out as their own bytes, so that a caller that keeps small messages (commands, joint
states) does not keep every chunk of the bag.
"""

from collections.abc import Iterator, Sequence
import heapq
import os
import struct
import zlib

from rosbags.interfaces import Connection
from rosbags.rosbag2 import Reader, ReaderError

try:
    from rosbags.rosbag2.reader import DirectoryReader
    from rosbags.rosbag2.storage_mcap import McapReader
except ImportError:  # another rosbags layout: chunk_messages() always says None
    DirectoryReader = McapReader = None

# Messages below this size are copied out of their chunk (see the module docstring).
COPY_BELOW = 64 << 10
_MESSAGE_OP = 0x05
_RECORD_HEAD = struct.Struct('<BQ')  # opcode, record length
_MESSAGE_HEAD = struct.Struct('<HIQQ')  # channel id, sequence, log time, publish time
_CHUNK_FIELDS = ('message_start_time', 'message_end_time', 'chunk_start_offset',
                 'chunk_length', 'compression', 'compressed_size', 'uncompressed_size',
                 'channel_count')


def chunk_messages(reader: Reader, connections: Sequence[Connection]
                   ) -> Iterator[tuple[Connection, int, bytes | memoryview]] | None:
    """Return the (connection, log time ns, data) of `connections` as reader.messages() would.

    `reader` is an open rosbags Reader and `connections` some of its connections (not
    empty). Data is bytes for messages below COPY_BELOW bytes, else a read-only memoryview
    of the message's chunk. Returns None when this reader cannot read the bag (see the
    module docstring): read it with reader.messages() then.

    The iterator raises rosbags' ReaderError for a chunk that is cut short, has a wrong CRC
    or holds a record that overruns it.
    """
    if McapReader is None or not connections:
        return None
    storage = reader.storage
    if isinstance(storage, McapReader):
        wanted = {conn.id for conn in connections}
        plans = [(storage, {conn.id: conn for conn in storage.connections if conn.id in wanted})]
    elif isinstance(storage, DirectoryReader):
        if getattr(storage.metadata, 'compression_mode', None) == 'message':
            return None
        plans = []
        for part in getattr(storage, 'storages', ()):
            if not isinstance(part, McapReader):
                return None
            plans.append((part, _directory_connections(part, connections)))
    else:
        return None
    selected = []
    for part, channel_map in plans:
        chunks = _selected_chunks(part, channel_map)
        if chunks is None:
            return None
        selected.append((part, channel_map, chunks))
    return _messages(selected)


def _directory_connections(part: object, connections: Sequence[Connection]
                           ) -> dict[int, Connection]:
    """Return channel id of a file -> the directory's connection, as rosbags matches them."""
    channel_map = {}
    for own in part.connections:
        for conn in connections:
            if (conn.topic == own.topic and conn.msgtype == own.msgtype and conn.ext == own.ext
                    and (not own.digest or not conn.digest or conn.digest == own.digest)):
                channel_map[own.id] = conn
                break
    return channel_map


def _selected_chunks(part: object, channel_map: dict[int, Connection]) -> list | None:
    """Return the chunks of a file that rosbags would read for `channel_map`, or None."""
    chunks = getattr(part, 'chunks', None)
    bio = getattr(part, 'bio', None)
    if not chunks or bio is None or not hasattr(bio, 'fileno'):
        return None  # unindexed (rosbags scans the file) or not open
    if not all(hasattr(chunk, name) for chunk in chunks[:1] for name in _CHUNK_FIELDS):
        return None
    selected = [chunk for chunk in chunks
                if any(chunk.channel_count.get(cid, 0) for cid in channel_map)]
    if any(chunk.compression for chunk in selected):
        return None
    return selected


def _messages(selected: list) -> Iterator[tuple[Connection, int, bytes | memoryview]]:
    for part, channel_map, chunks in selected:
        if not channel_map:
            continue
        fd = part.bio.fileno()
        if chunks and hasattr(os, 'posix_fadvise'):
            # Ask the kernel to read the chunks ahead (from disk while the ones before are
            # parsed): one process reads as fast as rosbags' buffered reads from a cold
            # cache, and several processes reading several bags do not wait on each other.
            first = min(chunk.chunk_start_offset for chunk in chunks)
            last = max(chunk.chunk_start_offset + chunk.chunk_length for chunk in chunks)
            os.posix_fadvise(fd, first, last - first, os.POSIX_FADV_WILLNEED)
        sources = [_chunk_source(fd, chunk, channel_map) for chunk in chunks]
        for log_time, offset, connection, data in heapq.merge(*sources):
            if offset:  # not a chunk's marker
                yield connection, log_time, data


def _chunk_source(fd: int, chunk: object, channel_map: dict[int, Connection]) -> Iterator:
    """Yield a chunk's messages as rosbags' msgsrc() does: a marker, then sorted by time.

    The marker (the chunk's start time, offset 0) lets heapq.merge() read the chunk only
    when its turn comes, so one chunk at a time is in memory for time-ordered chunks.
    """
    yield chunk.message_start_time, 0, None, None
    start, stop = chunk.message_start_time, chunk.message_end_time + 1
    offset = chunk.chunk_start_offset
    if chunk.compressed_size != chunk.uncompressed_size:
        raise ReaderError(f'Chunk size mismatch: expected {chunk.uncompressed_size} bytes, got '
                          f'{chunk.compressed_size}.')
    # The chunk record after its opcode, length and times: uncompressed CRC (uint32),
    # compression (empty string: 4 bytes), records length (uint64), records.
    head = 9 + 24
    size = 16 + chunk.compressed_size
    raw = os.pread(fd, size, offset + head)
    if len(raw) != size:
        raise ReaderError(f'Truncated record at offset {offset + head}: expected {size} '
                          f'bytes, got {len(raw)}.')
    view = memoryview(raw)
    crc = int.from_bytes(raw[:4], 'little')
    if crc and zlib.crc32(view[16:]) != crc:
        raise ReaderError('Chunk checksum mismatch.')
    messages = []
    pos, end = 16, size
    unpack_record, unpack_message = _RECORD_HEAD.unpack_from, _MESSAGE_HEAD.unpack_from
    while pos < end:
        if pos + 9 > end:
            raise ReaderError(f'Truncated record at offset {pos - 16}: expected 9 bytes, got '
                              f'{end - pos}.')
        op, length = unpack_record(raw, pos)
        body = pos + 9
        pos = body + length
        if pos > end:
            raise ReaderError(f'Truncated record at offset {body - 16}: expected {length} '
                              f'bytes, got {end - body}.')
        if op != _MESSAGE_OP:
            continue
        if length < 22:
            raise ReaderError(f'Invalid message record length {length}.')
        channel, _, log_time, _ = unpack_message(raw, body)
        connection = channel_map.get(channel)
        if connection is not None and start <= log_time < stop:
            data = (raw[body + 22:pos] if length - 22 < COPY_BELOW
                    else view[body + 22:pos])
            messages.append((log_time, offset, connection, data))
    messages.sort(key=_log_time)
    yield from messages


def _log_time(item: tuple) -> int:
    return item[0]
