#!/usr/bin/env python3
"""Bag ingestion speed of `habc train`'s loader against plain sequential reads of the same bags.

Writes two sets of bags (or takes yours with --bags) of N episodes of T control ticks at
50 Hz, with one 96x96 and one 224x224 rgb8 image per tick:
    ours     our recorder's format, written with habc_episodes.bag_format.EpisodeBagWriter:
             habc_msgs/Observation (both images + joint state) and ExecutedAction per tick
    foreign  a `ros2 bag record`-like MCAP of standard topics written with the
             mcap-ros2-support writer (uncompressed chunks, as rosbag2 writes by default; no
             metadata.yaml): two sensor_msgs/Image topics, sensor_msgs/JointState at 100 Hz,
             std_msgs/Float64MultiArray commands, a std_msgs/Bool pedal, read with a mapping
Then reads every set four ways and reports MB/s of bag bytes (best of --repeats):
    raw bytes     every file of the bags read in 8 MiB blocks (the I/O ceiling)
    rosbags       rosbags' Reader over every message + deserialize_cdr (a plain sequential
                  read in one process: the reference)
    habc loader   habc_episodes.dataset.load_bags, what `habc train` runs: find and label
                  the bags, episode_from_bag (alignment, images decoded and resized to 96 px),
                  once in this process (workers=1) and once with its default worker processes
Last, a cProfile of the one-process loader on each set (warm), written with the table.
Warm runs read from the page cache (the bags were just written). Cold runs (unless
--no-cold) first drop the bag files from the page cache (fsync + posix_fadvise DONTNEED),
so data comes from the disk (as far as the kernel honours the hint). About 90 s on 2 cores.

    python benchmarks/bench_ingest.py [--episodes 20] [--steps 300] [--repeats 2] [--no-cold]
        [--bags DIR [--mapping FILE]] [--keep DIR] [--out benchmarks/results]
"""

import argparse
import cProfile
import io
import json
import os
from pathlib import Path
import platform
import pstats
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore
from habc_episodes.dataset import bag_size, find_bags, Labeller, load_bags
from habc_episodes.episode_bags import bag_files, bag_source, TopicMapping
from habc_episodes.loading import default_workers

SEC = 1_000_000_000
TICK = SEC // 50
JOINTS = [f'j{i}' for i in range(14)]
SIZES = (96, 224)
FOREIGN_MAPPING = {
    'cameras': ['/camera/small/image_raw', '/camera/large/image_raw'],
    'joint_states': '/joint_states', 'command': '/forward_position_controller/commands',
    'intervention': '/teleop/engage', 'instruction': 'transfer the cube',
}
# Measured by hand on 15d84a4 (the loader before the one-pass decoding, the zero-copy
# deserialisation and the worker processes), same sets, warm, cProfile.
PROFILE_BEFORE = (
    'Loader of 15d84a4 (one process), cProfile own time, warm: ours 2.23 s in all: _resize '
    '0.18 s (12,000 frames), file reads 0.17 s, _pack 0.13 s (a second copy of every frame), '
    'BytesIO reads 0.11 s (rosbags copying records), rosbags deserialize_cdr 0.90 s '
    'cumulative (copying each message before reading it: `raw[4:]`), metadata.yaml parsed '
    'twice per bag; foreign 2.42 s: _pack 0.46 s, chunk CRCs 0.22 s, file reads 0.19 s, '
    'deserialize_cdr 0.89 s cumulative, _resize 0.14 s. Committed table of 15d84a4: 0.40x '
    'warm / 0.73x cold (ours), 0.35x / 0.53x (foreign).')
# Message types of the foreign bags.
FOREIGN_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/JointState',
                 'std_msgs/msg/Float64MultiArray', 'std_msgs/msg/Bool')
# The loader of 393cc21 (one-pass decoding, zero-copy deserialisation, spawned workers) on a
# quiet machine, same command: wall ratio vs rosbags.
PREVIOUS = (
    'Loader of 393cc21 (rosbags reading every chunk, spawned worker processes), same '
    'command on a quiet machine: ours warm 0.48x (1 process) / 0.64x (2 processes), cold '
    '0.96x / 1.36x; foreign warm 0.59x / 0.67x, cold 0.88x / 1.16x.')


def _frames(rng: np.random.Generator, size: int, steps: int):
    """Yield `steps` distinct size x size rgb8 frames cheaply (a noise base, shifted per step)."""
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for k in range(steps):
        yield (base + np.uint8(k % 256)).tobytes()


def _pedal(steps: int) -> list[bool]:
    """Human control from 40% to 60% of the episode (one takeover)."""
    return [0.4 * steps <= k < 0.6 * steps for k in range(steps)]


def write_ours(path: Path, store, steps: int, seed: int) -> None:
    t = store.types
    rng = np.random.default_rng(seed)

    def header(ns: int):
        return t['std_msgs/msg/Header'](
            stamp=t['builtin_interfaces/msg/Time'](sec=ns // SEC, nanosec=ns % SEC), frame_id='')

    frames = [_frames(rng, size, steps) for size in SIZES]
    human = _pedal(steps)
    with EpisodeBagWriter(path, store) as writer:
        writer.add_topic('/observation', 'habc_msgs/msg/Observation')
        writer.add_topic('/executed_action', 'habc_msgs/msg/ExecutedAction')
        writer.add_topic('/intervention', 'habc_msgs/msg/InterventionState')
        for k in range(steps):
            stamp = 100 * SEC + k * TICK
            images = [t['sensor_msgs/msg/Image'](
                header=header(stamp), height=size, width=size, encoding='rgb8', is_bigendian=0,
                step=size * 3, data=np.frombuffer(next(gen), dtype=np.uint8))
                for size, gen in zip(SIZES, frames, strict=True)]
            state = np.full(14, 0.001 * k)
            joints = t['sensor_msgs/msg/JointState'](
                header=header(stamp), name=JOINTS, position=state, velocity=np.zeros(14),
                effort=np.zeros(0))
            writer.write('/observation', stamp, t['habc_msgs/msg/Observation'](
                header=header(stamp), images=images, joint_state=joints,
                instruction='transfer the cube'))
            source = 1 if human[k] else 0
            writer.write('/intervention', stamp + 1000, t['habc_msgs/msg/InterventionState'](
                header=header(stamp + 1000), active=human[k], source=source, segment_id=0,
                episode_id=path.name, reason=''))
            writer.write('/executed_action', stamp + 1000, t['habc_msgs/msg/ExecutedAction'](
                header=header(stamp + 1000), source=source, segment_id=0, episode_id=path.name,
                policy_version='1', joint_names=JOINTS, positions=state + 0.01))


def write_foreign(path: Path, steps: int, seed: int) -> None:
    from mcap.writer import CompressionType
    from mcap_ros2.writer import Writer

    rng = np.random.default_rng(seed)
    frames = [_frames(rng, size, steps) for size in SIZES]
    human = _pedal(steps)
    path.mkdir(parents=True)
    with (path / f'{path.name}_0.mcap').open('wb') as stream:
        writer = Writer(stream, compression=CompressionType.NONE)
        # The standard messages' definitions, as rosbag2 stores them (ros2msg text).
        store = habc_typestore()
        schema = {name: writer.register_msgdef(
            name, store.generate_msgdef(name, ros_version=2)[0]) for name in FOREIGN_TYPES}
        for k in range(steps):
            stamp = 100 * SEC + k * TICK
            header = {'stamp': {'sec': stamp // SEC, 'nanosec': stamp % SEC}, 'frame_id': ''}
            for half in range(2):  # joint states at 100 Hz
                ns = stamp + half * TICK // 2
                writer.write_message('/joint_states', schema['sensor_msgs/msg/JointState'], {
                    'header': {'stamp': {'sec': ns // SEC, 'nanosec': ns % SEC},
                               'frame_id': ''}, 'name': JOINTS,
                    'position': [0.001 * k] * 14, 'velocity': [], 'effort': []}, log_time=ns)
            for topic, size, gen in zip(FOREIGN_MAPPING['cameras'], SIZES, frames, strict=True):
                writer.write_message(topic, schema['sensor_msgs/msg/Image'], {
                    'header': header, 'height': size, 'width': size, 'encoding': 'rgb8',
                    'is_bigendian': 0, 'step': size * 3, 'data': next(gen)},
                    log_time=stamp + 2_000_000)
            if k == 0 or human[k] != human[k - 1]:
                writer.write_message('/teleop/engage', schema['std_msgs/msg/Bool'],
                                     {'data': human[k]}, log_time=stamp + 1000)
            writer.write_message('/forward_position_controller/commands',
                                 schema['std_msgs/msg/Float64MultiArray'], {
                                     'layout': {'dim': [], 'data_offset': 0},
                                     'data': [0.001 * k + 0.01] * 14}, log_time=stamp + 3000)
        writer.finish()


def drop_cache(bags: list[Path]) -> None:
    """Ask the kernel to forget the cached pages of the bag files (written back first)."""
    for bag in bags:
        for path in bag_files(bag):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_raw(bags: list[Path]) -> int:
    total = 0
    for bag in bags:
        for path in bag_files(bag):
            with path.open('rb', buffering=0) as stream:
                while block := stream.read(8 << 20):
                    total += len(block)
    return total


def read_rosbags(bags: list[Path], store) -> int:
    from rosbags.rosbag2 import Reader

    messages = 0
    for bag in bags:
        with Reader(bag_source(bag)) as reader:
            for connection, _, raw in reader.messages():
                store.deserialize_cdr(raw, connection.msgtype)
                messages += 1
    return messages


def read_loader(bags: list[Path], labels: Path, topics: TopicMapping, workers: int) -> int:
    result = load_bags(bags, labeller=Labeller(labels), topics=topics, image_size=96,
                       progress=False, workers=workers)
    if result.skipped:
        raise RuntimeError(f'the loader skipped bags: {result.skipped[:3]}')
    if result.workers != workers:
        raise RuntimeError(f'asked for {workers} workers, the loader used {result.workers}')
    if workers > 1:
        # Forked workers' CPU time does not reach RUSAGE_CHILDREN reliably (measured: a
        # part of it) and forkserver's workers are not our children: take what each worker
        # measured around each bag (process_time).
        _WORKER_CPU.append(sum(loaded.cpu_seconds for loaded in result.loaded))
    return sum(len(e) for e in result.episodes)


_WORKER_CPU: list[float] = []


def cpu_seconds() -> float:
    """CPU time of this process and of the loader's workers (as they report it)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime + sum(_WORKER_CPU)


def measure(name: str, bags: list[Path], topics: TopicMapping, store, labels: Path,
            repeats: int, cold: bool) -> list[dict]:
    size = sum(bag_size(bag) for bag in bags)
    workers = default_workers(len(bags), size)
    rows = []
    readers = [('raw bytes', lambda: read_raw(bags), 'bytes', 1),
               ('rosbags Reader + deserialize', lambda: read_rosbags(bags, store), 'messages',
                1),
               ('habc train loader', lambda: read_loader(bags, labels, topics, 1), 'steps', 1)]
    if workers > 1:
        readers.append(('habc train loader', lambda: read_loader(bags, labels, topics, workers),
                        'steps', workers))
    for cache in (('warm', 'cold') if cold else ('warm',)):
        wall: dict[int, list[float]] = {i: [] for i in range(len(readers))}
        cpu: dict[int, list[float]] = {i: [] for i in range(len(readers))}
        counts: dict[int, int] = {}
        # Repeats go round the readers, so that a burst of load from other jobs on the
        # machine does not fall on one reader's runs only.
        for _ in range(repeats):
            for i, (_, run, _, _) in enumerate(readers):
                if cache == 'cold':
                    drop_cache(bags)
                start, start_cpu = time.perf_counter(), cpu_seconds()
                counts[i] = run()
                wall[i].append(time.perf_counter() - start)
                cpu[i].append(cpu_seconds() - start_cpu)
        for i, (reader, _, unit, processes) in enumerate(readers):
            best = min(wall[i])
            rows.append({'set': name, 'cache': cache, 'reader': reader, 'workers': processes,
                         'bags': len(bags), 'mb': size / 1e6, 'seconds': wall[i],
                         'best_s': best, 'mb_per_s': size / 1e6 / best, 'cpu_seconds': cpu[i],
                         'mb_per_cpu_s': size / 1e6 / min(cpu[i]),
                         'count': counts[i], 'unit': unit})
            print(f'{name:8s} {cache:4s} {reader:30s} x{processes} {size / 1e6 / best:8.0f} MB/s '
                  f'({best:.2f} s best of {repeats}; {size / 1e6 / min(cpu[i]):.0f} MB '
                  f'per CPU s; {counts[i]} {unit})', flush=True)
    return rows


def profile_loader(name: str, bags: list[Path], topics: TopicMapping, labels: Path,
                   lines: int = 12) -> str:
    """Return the top of a cProfile (by own time) of the one-process loader, warm."""
    read_loader(bags, labels, topics, 1)
    profiler = cProfile.Profile()
    profiler.enable()
    read_loader(bags, labels, topics, 1)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats('tottime').print_stats(lines)
    text = stream.getvalue()
    body = text[text.index('   ncalls'):].rstrip() if '   ncalls' in text else text
    root = str(Path(__file__).resolve().parents[1]) + '/'
    body = body.replace(root, '').replace(sys.prefix + '/lib/python3.11/site-packages/', '')
    return f'{name} (total {stats.total_tt:.2f} s under cProfile):\n{body}'


def write_labels(path: Path, bags: list[Path]) -> Path:
    """Label every bag success in a CSV outside the bags (nothing is written into them)."""
    path.write_text('bag,outcome\n' + ''.join(f'{bag},success\n' for bag in bags))
    return path


def write_outputs(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / 'bag_ingestion.json').write_text(json.dumps(report, indent=2) + '\n')
    rows = report['results']
    lines = [f'Bag ingestion ({report["setup"]})', '',
             '| set | cache | reader | processes | bags | MB | best s | MB/s | vs rosbags '
             '| MB per CPU s | count |', '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
    for row in rows:
        base = next(r for r in rows if r['set'] == row['set'] and r['cache'] == row['cache']
                    and r['reader'].startswith('rosbags'))
        lines.append(f'| {row["set"]} | {row["cache"]} | {row["reader"]} | {row["workers"]} | '
                     f'{row["bags"]} | {row["mb"]:.0f} | {row["best_s"]:.2f} | '
                     f'{row["mb_per_s"]:.0f} | {row["mb_per_s"] / base["mb_per_s"]:.2f}x | '
                     f'{row["mb_per_cpu_s"]:.0f} | {row["count"]} {row["unit"]} |')
    lines += ['', report['notes'], '']
    if report.get('profiles'):
        lines += ['## Where the one-process loader spends its time (cProfile, warm)', '',
                  'Own time per function, top entries; cProfile inflates small Python calls.',
                  '', '```', '\n\n'.join(report['profiles']), '```', '']
    if report.get('profile_before'):
        lines += ['## Before this loader (for comparison)', '', report['profile_before'], '']
    if report.get('previous'):
        lines += [report['previous'], '']
    (out / 'bag_ingestion.md').write_text('\n'.join(lines))
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f'{r["set"]}\n{r["cache"]}\n{r["reader"].split(" ")[0]}'
              + (f' x{r["workers"]}' if r['reader'].startswith('habc') else '') for r in rows]
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.8))
    colours = {'raw': 'tab:gray', 'rosbags': 'tab:blue', 'habc': 'tab:orange'}
    axis.bar(range(len(rows)), [r['mb_per_s'] for r in rows],
             color=[colours[r['reader'].split(' ')[0]] for r in rows])
    axis.set_xticks(range(len(rows)), labels, fontsize=7)
    axis.set_ylabel('MB/s of bag bytes')
    axis.set_yscale('log')
    axis.set_title('Bag ingestion: habc train loader vs sequential reads')
    axis.grid(axis='y', alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / 'bag_ingestion.png', dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--episodes', type=int, default=20)
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--cold', action=argparse.BooleanOptionalAction, default=True,
                        help='also measure with the page cache dropped before each run')
    parser.add_argument('--bags', type=Path, help='measure these bags instead of writing sets')
    parser.add_argument('--mapping', type=Path, help='topic mapping of --bags (standard topics)')
    parser.add_argument('--keep', type=Path, help='write the sets here and keep them')
    parser.add_argument('--out', type=Path, default=Path(__file__).parent / 'results')
    args = parser.parse_args()
    load_at_start = os.getloadavg()

    store = habc_typestore()
    scratch = Path(tempfile.mkdtemp(prefix='habc-ingest-'))
    root = args.keep or scratch
    sets: list[tuple[str, list[Path], TopicMapping]] = []
    try:
        if args.bags:
            topics = TopicMapping.from_yaml(args.mapping) if args.mapping else TopicMapping()
            sets.append((args.bags.name, find_bags([args.bags]), topics))
        else:
            started = time.perf_counter()
            for i in range(args.episodes):
                write_ours(root / 'ours' / f'ep{i:03d}', store, args.steps, seed=i)
                write_foreign(root / 'foreign' / f'ep{i:03d}', args.steps, seed=i)
            print(f'wrote 2 x {args.episodes} episodes of {args.steps} steps in '
                  f'{time.perf_counter() - started:.1f} s under {root}', flush=True)
            sets.append(('ours', find_bags([root / 'ours']), TopicMapping()))
            sets.append(('foreign', find_bags([root / 'foreign']),
                         TopicMapping.from_dict(FOREIGN_MAPPING)))
        results, profiles = [], []
        for name, bags, topics in sets:
            labels = write_labels(scratch / f'{name}-labels.csv', bags)
            results += measure(name, bags, topics, store, labels, args.repeats, args.cold)
        for name, bags, topics in sets:
            profiles.append(profile_loader(name, bags, topics, scratch / f'{name}-labels.csv'))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    setup = (f'{args.episodes} episodes x {args.steps} steps, one 96x96 + one 224x224 rgb8 '
             f'image per tick; {platform.machine()}, {os.cpu_count()} CPUs, Python '
             f'{platform.python_version()}; best of {args.repeats}'
             if not args.bags else f'{args.bags}; best of {args.repeats}')
    load_at_end = os.getloadavg()
    notes = ('MB/s = bag bytes on disk / wall time (best run). "vs rosbags" = wall speed '
             'relative to a sequential rosbags read + deserialize of the same bags in one '
             'process. processes = processes that read: the loader runs once in this process '
             '(1) and once with its default worker processes (one per core, here '
             f'{os.cpu_count()}): a ratio above 1 of the latter can come from using more cores '
             'than the reference, compare the 1-process row for the work per core. MB per CPU '
             's = bag bytes / CPU time of this process and its worker processes (best run; '
             'the time of a worker is what it measured around each bag: the start of a '
             'forked worker, milliseconds, is not counted): less sensitive to other jobs on '
             'the machine, blind to I/O waits. The loader also aligns steps, decodes and '
             'resizes images (224 -> 96 px nearest pixel) and packs arrays. It reads '
             'uncompressed MCAP chunks itself '
             '(habc_episodes.mcap_lean: one read per chunk, messages handed out as views; the '
             'chunk CRC is checked as rosbags checks it, ~0.2 s per GB here, paid by both) and '
             'parses sensor_msgs Image / JointState and habc Observation / ExecutedAction with '
             'habc_episodes.cdr_fast (joint names decoded once per bag); its worker processes '
             'are forked (forkserver when the caller runs threads). Warm = page cache; cold = '
             'pages dropped before each run. 1-min load average at the start / end: '
             f'{load_at_start[0]:.2f} / {load_at_end[0]:.2f} on {os.cpu_count()} CPUs (other '
             'jobs shared them).')
    report = {'setup': setup, 'notes': notes, 'load_average_at_start': load_at_start,
              'load_average_at_end': load_at_end, 'results': results, 'profiles': profiles,
              'profile_before': PROFILE_BEFORE, 'previous': PREVIOUS,
              'command': ' '.join(['python', 'benchmarks/bench_ingest.py', *sys.argv[1:]]),
              'arguments': {k: str(v) if isinstance(v, Path) else v
                            for k, v in vars(args).items()}}
    write_outputs(args.out, report)
    print(f'wrote {args.out / "bag_ingestion.md"} and .json')


if __name__ == '__main__':
    main()
