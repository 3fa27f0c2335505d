"""Fuzzed input files: bags, topic mappings, labels CSVs and episode indexes.

Every damaged input gets a clear one-line reason and is skipped, the intact ones are used,
nothing crashes, and nothing is written into the inputs (their bytes and file lists are
compared before and after). Damage: truncation and bit flips anywhere in an MCAP file
(chunks, records, summary), a metadata.yaml that lies, a sqlite3 bag with a damaged page.

Examples are bounded (max_examples) so the file runs in well under a minute.
"""

import hashlib
from pathlib import Path
import random
import shutil
import sqlite3
import tempfile

from hypothesis import given, HealthCheck, settings
from hypothesis import strategies as st
import pytest
import yaml

from habc_episodes.dataset import Labeller, load_bags, read_index, read_labels_csv
from habc_episodes.episode_bags import TopicMapping

# As in test_properties.py: no wall-clock deadline per example, a bounded and derandomized
# example count (the same inputs every run).
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
TICKS = 12


def snapshot(folder: Path) -> dict[str, str]:
    """Return relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def template(tmp_path_factory, typestore):
    """Write an intact labelled episode bag (MCAP) and the same episode as a sqlite3 bag."""
    from bag_fixtures import write_episode

    root = tmp_path_factory.mktemp('fuzz_template')
    mcap = write_episode(root / 'mcap' / 'ep', typestore, [0] * 6 + [1] * 6, episode_id='ep')
    (mcap / 'outcome.yaml').write_text('outcome: success\n')
    db3 = root / 'db3' / 'ep'
    to_sqlite3(mcap, db3)
    (db3 / 'outcome.yaml').write_text('outcome: failure\n')
    return {'mcap': mcap, 'db3': db3}


def to_sqlite3(source: Path, target: Path) -> None:
    """Copy every message of a bag into a rosbag2 sqlite3 bag (rosbags' own writer)."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer

    from habc_episodes.bag_format import habc_typestore

    store = habc_typestore()
    with AnyReader([source], default_typestore=store) as reader, \
            Writer(target, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        connections = {}
        for connection in reader.connections:
            connections[connection.id] = writer.add_connection(
                connection.topic, connection.msgtype, typestore=store)
        for connection, stamp, data in reader.messages():
            writer.write(connections[connection.id], stamp, data)


def damaged_copy(template: Path, folder: Path, damage) -> Path:
    bag = folder / template.name
    shutil.copytree(template, bag)
    damage(bag)
    return bag


def check_load(bags: list[Path], intact: Path) -> None:
    """Load the damaged bags beside an intact one: the intact one is used, nothing raises."""
    before = {bag: snapshot(bag) for bag in [*bags, intact]}
    result = load_bags([*bags, intact], progress=False)
    assert intact in [item.path for item in result.loaded], result.skipped
    for item in result.skipped:
        assert item.reason in ('unreadable', 'unusable'), item
        assert item.message and '\n' not in item.message.strip(), item.message
        assert str(item.path) in item.message or item.reason == 'unusable', item.message
    assert len(result.loaded) + len(result.skipped) == len(bags) + 1
    for bag, files in before.items():
        assert snapshot(bag) == files, f'{bag} was written to'


@SETTINGS
@given(cut=st.floats(0.0, 0.999))
def test_a_truncated_mcap_is_skipped_with_a_reason(template, cut):
    with tempfile.TemporaryDirectory() as folder:
        def truncate(bag: Path) -> None:
            mcap = next(bag.glob('*.mcap'))
            data = mcap.read_bytes()
            mcap.write_bytes(data[:int(len(data) * cut)])
        check_load([damaged_copy(template['mcap'], Path(folder), truncate)], template['mcap'])


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 7)), min_size=1,
                      max_size=8))
def test_bit_flips_anywhere_in_an_mcap_never_crash_the_loader(template, flips):
    with tempfile.TemporaryDirectory() as folder:
        def flip(bag: Path) -> None:
            mcap = next(bag.glob('*.mcap'))
            data = bytearray(mcap.read_bytes())
            for where, bit in flips:
                data[int(len(data) * where)] ^= 1 << bit
            mcap.write_bytes(bytes(data))
        check_load([damaged_copy(template['mcap'], Path(folder), flip)], template['mcap'])


# What a metadata.yaml may claim wrongly.
LIES = {
    'message_count': lambda m: m['rosbag2_bagfile_information'].update(message_count=10**9),
    'duration': lambda m: m['rosbag2_bagfile_information']['duration'].update(
        nanoseconds=-5),
    'no_topics': lambda m: m['rosbag2_bagfile_information'].update(
        topics_with_message_count=[]),
    'wrong_type': lambda m: [t['topic_metadata'].update(type='std_msgs/msg/String')
                             for t in m['rosbag2_bagfile_information'][
                                 'topics_with_message_count']],
    'wrong_file': lambda m: m['rosbag2_bagfile_information'].update(
        relative_file_paths=['elsewhere.mcap']),
    'wrong_storage': lambda m: m['rosbag2_bagfile_information'].update(
        storage_identifier='sqlite3'),
    'version': lambda m: m['rosbag2_bagfile_information'].update(version=99),
    'not_a_mapping': None,
    'binary': None,
}


@pytest.mark.parametrize('lie', sorted(LIES))
def test_a_metadata_yaml_that_lies_is_skipped_or_read_correctly(template, tmp_path, lie):
    def rewrite(bag: Path) -> None:
        path = bag / 'metadata.yaml'
        if lie == 'not_a_mapping':
            path.write_text('- just\n- a list\n')
        elif lie == 'binary':
            path.write_bytes(bytes(range(256)))
        else:
            meta = yaml.safe_load(path.read_text())
            LIES[lie](meta)
            path.write_text(yaml.safe_dump(meta))
    check_load([damaged_copy(template['mcap'], tmp_path, rewrite)], template['mcap'])


@pytest.mark.parametrize('page', [1, 2, 3, 'last'])
def test_a_sqlite3_bag_with_a_damaged_page_is_skipped_with_a_reason(template, tmp_path, page):
    def damage(bag: Path) -> None:
        db3 = next(bag.glob('*.db3'))
        data = bytearray(db3.read_bytes())
        size = int.from_bytes(data[16:18], 'big') or 65536  # SQLite's page size field
        pages = len(data) // size
        index = pages - 1 if page == 'last' else min(page, pages - 1)
        rng = random.Random(index)
        for offset in range(index * size, (index + 1) * size, 7):
            data[offset] = rng.randrange(256)
        db3.write_bytes(bytes(data))
    damaged = damaged_copy(template['db3'], tmp_path, damage)
    check_load([damaged], template['mcap'])
    # The intact sqlite3 bag itself loads.
    assert [i.path for i in load_bags([template['db3']], progress=False).loaded] == \
        [template['db3']]


@SETTINGS
@given(text=st.text(max_size=300))
def test_a_fuzzed_labels_csv_is_read_or_refused_with_its_line(tmp_path, text):
    path = tmp_path / 'labels.csv'
    path.write_bytes(text.encode('utf-8', errors='surrogatepass'))  # invalid UTF-8 too
    try:
        read_labels_csv(path)
    except ValueError as exc:
        message = str(exc)
        assert message.startswith(f'{path}') or message.startswith(f'labels file {path}')
    try:
        Labeller(path)
    except ValueError:
        pass


mapping_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=10)


@SETTINGS
@given(data=st.one_of(mapping_values, st.dictionaries(
    st.sampled_from(['cameras', 'joint_states', 'command', 'intervention', 'instruction',
                     'control_period_s', 'joint_names', 'stamps', 'observation', 'nope']),
    mapping_values, max_size=6)))
def test_a_fuzzed_topic_mapping_is_read_or_refused_with_a_reason(tmp_path, data):
    path = tmp_path / 'mapping.yaml'
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return
    try:
        TopicMapping.from_yaml(path)
    except ValueError as exc:
        assert str(exc).startswith(f'topic mapping {path}: ')


@SETTINGS
@given(damage=st.one_of(
    st.tuples(st.just('truncate'), st.floats(0.0, 0.999)),
    st.tuples(st.just('flip'), st.lists(st.floats(0.0, 0.999), min_size=1, max_size=20))))
def test_a_damaged_episode_index_is_refused_with_a_reason(template, damage):
    from habc_episodes.index import EpisodeIndex

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'episodes.sqlite'
        index = EpisodeIndex(path)
        index.close()
        data = bytearray(path.read_bytes())
        kind, where = damage
        if kind == 'truncate':
            data = data[:int(len(data) * where)]
        else:
            for position in where:
                data[int(len(data) * position)] ^= 0xFF
        path.write_bytes(bytes(data))
        before = path.read_bytes()
        try:
            read_index(path)
        except ValueError as exc:
            assert str(path) in str(exc)
        try:
            Labeller(index_paths=[path]).label(template['mcap'])
        except (ValueError, sqlite3.DatabaseError) as exc:
            assert isinstance(exc, ValueError), f'{type(exc).__name__}: {exc}'
        assert path.read_bytes() == before, 'the index was written to'


def test_an_index_whose_schema_is_not_utf8_is_refused_with_its_path(tmp_path):
    # Found by the fuzz test above: one flipped byte in the schema page made sqlite3 raise
    # UnicodeDecodeError ("malformed database schema (epis\x90des_by_start)") without a path.
    from habc_episodes.index import EpisodeIndex

    path = tmp_path / 'episodes.sqlite'
    EpisodeIndex(path).close()
    data = bytearray(path.read_bytes())
    where = data.index(b'episodes_by_start')
    data[where + 4] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f'episode index {path} cannot be read'):
        read_index(path)
    with pytest.raises(ValueError, match='cannot be read'):
        Labeller(index_paths=[path]).label(tmp_path / 'some_bag')
