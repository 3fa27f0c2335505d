"""Bag recovery (no rclpy): make the MCAP bag of a recorder that died readable again.

A writer killed mid-episode leaves an MCAP file with no summary and no footer and no
metadata.yaml (habc_episodes.bag_format explains why); rosbags refuses it. recover_bag()
scans the file record by record, keeps every complete one, and writes a finished bag.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
import os
from pathlib import Path
import shutil
import struct
import zlib

from rosbags.interfaces import Connection
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.metadata import parse_qos

from habc_episodes.bag_format import BAG_VERSION, typestore_from_definition

_MCAP_MAGIC = b'\x89MCAP0\r\n'
_OP_FOOTER, _OP_SCHEMA, _OP_CHANNEL = 0x02, 0x03, 0x04
_OP_MESSAGE, _OP_CHUNK, _OP_DATA_END = 0x05, 0x06, 0x0F
_RECOVER_DIR = '.recover'


@dataclass(frozen=True)
class RecoveryReport:
    """What recover_bag() found and kept."""

    path: Path
    # False when the bag was already readable and nothing was changed.
    recovered: bool
    message_count: int
    # Messages kept per topic.
    topics: dict[str, int] = field(default_factory=dict)
    # Bytes at the end of the MCAP file that did not form a complete record (lost data).
    dropped_bytes: int = 0
    # Topics left out because their schema was missing or unparsable, and their messages.
    skipped_topics: tuple[str, ...] = ()
    skipped_messages: int = 0


class _CorruptRecordError(Exception):
    """A record that cannot be parsed: the readable part of the file ends before it."""


def _string(buf: bytes | memoryview, pos: int) -> tuple[str, int]:
    (size,) = struct.unpack_from('<I', buf, pos)
    end = pos + 4 + size
    if end > len(buf):
        raise _CorruptRecordError('string runs past its record')
    return bytes(buf[pos + 4:end]).decode(), end


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    if compression == '':
        return data
    if compression == 'zstd':
        try:
            from compression import zstd  # Python >= 3.14
        except ImportError:
            from backports import zstd  # a rosbags dependency before 3.14
        return zstd.decompress(data)
    if compression == 'lz4':
        try:
            import lz4.frame
        except ImportError as exc:
            raise _CorruptRecordError('lz4-compressed chunk, but the lz4 package is not '
                                      'installed') from exc
        return lz4.frame.decompress(data)
    raise _CorruptRecordError(f'unknown chunk compression {compression!r}')


class _PartialMcap:
    """Scan an MCAP file front to back and yield its records until the first incomplete one.

    Unlike a normal reader this needs neither summary nor footer, never trusts a length that
    points past the end of the file, and yields a chunk's records only once the whole chunk
    has been read and checked.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.end = 0  # offset just past the last complete record

    def records(self) -> Iterator[tuple]:
        """Yield schema, channel and message records as tuples (see _parse())."""
        with self.path.open('rb') as bio:
            if bio.read(8) != _MCAP_MAGIC:
                raise ValueError(f'{self.path} is not an MCAP file (bad magic)')
            self.end = 8
            while True:
                head = bio.read(9)
                if len(head) < 9:
                    return
                opcode, length = struct.unpack('<BQ', head)
                # Opcode 0 is reserved: a zero-filled tail, as a file system may leave it.
                if opcode == 0 or self.end + 9 + length > self.size:
                    return
                if opcode in (_OP_DATA_END, _OP_FOOTER):
                    return  # the data section ended cleanly
                body = bio.read(length)
                try:
                    if opcode == _OP_CHUNK:
                        records = list(self._chunk_records(body))
                    else:
                        records = list(self._parse(opcode, body))
                except (_CorruptRecordError, struct.error, UnicodeDecodeError, ValueError):
                    return
                self.end += 9 + length
                yield from records

    def _chunk_records(self, body: bytes) -> Iterator[tuple]:
        _start, _end, size, crc = struct.unpack_from('<QQQI', body, 0)
        compression, pos = _string(body, 28)
        (compressed_size,) = struct.unpack_from('<Q', body, pos)
        pos += 8
        if pos + compressed_size > len(body):
            raise _CorruptRecordError('chunk data runs past its record')
        data = _decompress(body[pos:pos + compressed_size], compression, size)
        if len(data) != size or (crc and zlib.crc32(data) != crc):
            raise _CorruptRecordError('chunk size or CRC mismatch')
        pos = 0
        while pos < len(data):
            opcode, length = struct.unpack_from('<BQ', data, pos)
            pos += 9
            if pos + length > len(data):
                raise _CorruptRecordError('record runs past its chunk')
            yield from self._parse(opcode, memoryview(data)[pos:pos + length])
            pos += length

    @staticmethod
    def _parse(opcode: int, body: bytes | memoryview) -> Iterator[tuple]:
        if opcode == _OP_SCHEMA:
            (schema_id,) = struct.unpack_from('<H', body, 0)
            name, pos = _string(body, 2)
            encoding, pos = _string(body, pos)
            text, _ = _string(body, pos)
            yield 'schema', schema_id, name, encoding, text
        elif opcode == _OP_CHANNEL:
            channel_id, schema_id = struct.unpack_from('<HH', body, 0)
            topic, pos = _string(body, 4)
            encoding, pos = _string(body, pos)
            (size,) = struct.unpack_from('<I', body, pos)
            pos += 4
            end = pos + size
            metadata = {}
            while pos < end:
                key, pos = _string(body, pos)
                metadata[key], pos = _string(body, pos)
            yield 'channel', channel_id, schema_id, topic, encoding, metadata
        elif opcode == _OP_MESSAGE:
            channel_id, _sequence, log_time, _publish_time = struct.unpack_from('<HIQQ', body, 0)
            yield 'message', channel_id, log_time, bytes(body[22:])
        # Everything else (header, message indexes, metadata, attachments) is rebuilt or
        # not needed to read the messages back.


def _find_mcap(path: Path) -> Path:
    own = path / f'{path.name}.mcap'
    if own.is_file():
        return own
    files = sorted(p for p in path.glob('*.mcap') if p.is_file())
    if len(files) == 1:
        return files[0]
    if not files:
        raise FileNotFoundError(f'no .mcap file in {path}; recover_bag() handles MCAP bags')
    raise ValueError(f'{path} holds several MCAP files ({[p.name for p in files]}); '
                     'recover_bag() handles one-file bags')


def _readable(path: Path) -> RecoveryReport | None:
    """Return a report of an intact bag, or None when rosbags cannot open it."""
    if not (path / 'metadata.yaml').is_file():
        return None
    try:
        with Reader(path) as reader:
            topics = {c.topic: c.msgcount for c in reader.connections}
            return RecoveryReport(path, False, reader.message_count, topics)
    except Exception:
        return None  # whatever the reason, the bag needs rebuilding


def recover_bag(path: str | Path, *, keep_partial: bool = False) -> RecoveryReport:
    """Make the bag of a writer that died before close() readable again.

    Rewrites every complete record of the MCAP file into a new, finished MCAP file with
    metadata.yaml (type hashes recomputed from the schemas stored in the file) and replaces
    the partial file with it. Needs free disk space for one more copy of the bag while it
    runs. An intact bag is left alone. Interrupted, it can simply be run again. Only call it
    on a bag whose writer is dead (e.g. the ids mark_incomplete_recordings() returns): a
    live writer would go on writing into the replaced file.

    Args:
        path: the bag directory.
        keep_partial: keep the original file as `<name>.mcap.partial` next to the new one.

    Raises:
        FileNotFoundError: no bag directory or no MCAP file in it.
        ValueError: the file is not MCAP, or the bag has several MCAP files.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'bag directory {path} does not exist')
    intact = _readable(path)
    if intact is not None:
        return intact
    source = _find_mcap(path)
    scratch = path / _RECOVER_DIR
    if scratch.exists():
        shutil.rmtree(scratch)  # left over from an interrupted recovery
    scan = _PartialMcap(source)
    writer = Writer(scratch / path.name, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    schemas: dict[int, tuple[str, str, str]] = {}
    connections: dict[int, Connection] = {}
    counts: dict[str, int] = {}
    skipped: dict[int, str] = {}
    skipped_messages = 0
    try:
        for record in scan.records():
            kind = record[0]
            if kind == 'schema':
                schemas.setdefault(record[1], record[2:])
            elif kind == 'channel':
                _, channel_id, schema_id, topic, encoding, metadata = record
                if channel_id in connections or channel_id in skipped:
                    continue  # channels may be repeated (in every chunk, in the summary)
                schema = schemas.get(schema_id)
                try:
                    if schema is None or encoding != 'cdr':
                        raise ValueError('no schema, or not CDR')
                    msgtype, schema_encoding, text = schema
                    rihs01 = typestore_from_definition(
                        msgtype, schema_encoding, text).hash_rihs01(msgtype)
                    qos = parse_qos(metadata.get('offered_qos_profiles', ''))
                except Exception:
                    # An unusable schema costs this topic, not the rest of the bag.
                    skipped[channel_id] = topic
                    continue
                connections[channel_id] = writer.add_connection(
                    topic, msgtype, msgdef=text, rihs01=rihs01, offered_qos_profiles=qos)
                counts.setdefault(topic, 0)
            else:
                _, channel_id, log_time, data = record
                connection = connections.get(channel_id)
                if connection is None:
                    skipped_messages += 1
                    continue
                writer.write(connection, log_time, data)
                counts[connection.topic] += 1
        dropped = scan.size - scan.end
        writer.set_custom_data('habc_recovered_dropped_bytes', str(dropped))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    rebuilt = scratch / path.name
    target = path / f'{path.name}.mcap'
    if keep_partial:
        # A hard link, so that `target` exists at every moment: an interrupted recovery
        # can then always be rerun.
        partial = source.with_name(source.name + '.partial')
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)
        except OSError:
            shutil.copy2(source, partial)
    os.replace(rebuilt / target.name, target)
    if source != target and source.exists():
        source.unlink()
    os.replace(rebuilt / 'metadata.yaml', path / 'metadata.yaml')
    shutil.rmtree(scratch)
    return RecoveryReport(path, True, sum(counts.values()), counts, dropped,
                          tuple(sorted(skipped.values())), skipped_messages)
