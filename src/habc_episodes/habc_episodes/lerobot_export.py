"""Export labelled episodes as a LeRobot-style dataset (no rclpy), for `habc episodes export`.

Layout (LeRobot dataset format v2.1, images as PNG frames instead of encoded videos):

    OUT/meta/info.json                 features, fps, counts, path templates
    OUT/meta/episodes.jsonl            per episode: index, tasks, length, and ours: the
                                       recorder's episode id, outcome, interventions
    OUT/meta/episodes_stats.jsonl      per episode and feature: min, max, mean, std, count
    OUT/meta/tasks.jsonl               task index -> instruction
    OUT/data/chunk-000/episode_000000.parquet
    OUT/images/observation.images.view0/episode_000000/frame_000000.png

One frame is one training step of the learner (habc_episodes.episode_bags.episode_from_bag):
the executed action and the newest observation before it. Columns: observation.state,
action, timestamp (frame_index / fps, as LeRobot checks it), frame_index, episode_index,
index, task_index, next.done, next.success, and ours: controller (0 policy, 1 human, 2 hold),
intervention (controller is human), outcome (1 success, 0 failure) and stamp (the step's
header time, unix seconds). Without pyarrow the frames go into .npz files with the same
column names (np.load(path)['action']); info.json says which.

The dataset is written into OUT.partial and renamed at the end, so an interrupted export
never leaves a half dataset at OUT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import json
from pathlib import Path
import shutil
from typing import Any

import numpy as np

from habc_episodes.vocabulary import Controller

CODEBASE_VERSION = 'v2.1'
CHUNKS_SIZE = 1000
DATA_PATH = 'data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.'
IMAGE_PATH = 'images/{image_key}/episode_{episode_index:06d}/frame_{frame_index:06d}.png'
DEFAULT_FPS = 50  # the habc control rate, for episodes too short to measure it


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how."""

    images: bool = True
    image_size: int | None = None
    fps: int | None = None
    overwrite: bool = False


@dataclass
class ExportReport:
    """What export_lerobot() wrote."""

    path: Path
    episodes: int = 0
    frames: int = 0
    fps: int = DEFAULT_FPS
    data_format: str = 'parquet'
    images: bool = False
    # Recorder episode id -> why it was left out.
    skipped: dict[str, str] = field(default_factory=dict)


def have_pyarrow() -> bool:
    """Return True when parquet can be written."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def estimate_fps(timestamps: Sequence[np.ndarray]) -> int:
    """Return the control rate from the median step interval of all episodes (whole Hz)."""
    steps = np.concatenate([np.diff(np.asarray(t, dtype=np.float64)) for t in timestamps]
                           or [np.zeros(0)])
    steps = steps[steps > 0]
    if not len(steps):
        return DEFAULT_FPS
    return max(1, round(1.0 / float(np.median(steps))))


def frame_columns(episode: Any, episode_index: int, first_index: int, task_index: int,
                  fps: int) -> dict[str, np.ndarray]:
    """Return the per-frame columns of one Episode (images excluded)."""
    n = len(episode)
    controllers = np.asarray(episode.controllers, dtype=np.int64)
    success = int(episode.outcome) == 1  # habc_episodes.episode.Outcome.SUCCESS
    done = np.zeros(n, dtype=bool)
    done[-1] = True
    return {
        'observation.state': np.asarray(episode.observations['state'], dtype=np.float32),
        'action': np.asarray(episode.actions, dtype=np.float32),
        'timestamp': (np.arange(n) / fps).astype(np.float32),
        'frame_index': np.arange(n, dtype=np.int64),
        'episode_index': np.full(n, episode_index, dtype=np.int64),
        'index': np.arange(first_index, first_index + n, dtype=np.int64),
        'task_index': np.full(n, task_index, dtype=np.int64),
        'next.done': done,
        'next.success': done & success,
        'controller': controllers,
        'intervention': controllers == 1,  # habc_episodes.episode.Controller.HUMAN
        'outcome': np.full(n, int(success), dtype=np.int64),
        'stamp': np.asarray(episode.timestamps, dtype=np.float64),
    }


def features(state_dim: int, action_dim: int, image_shape: tuple[int, ...] | None,
             views: int) -> dict[str, dict[str, Any]]:
    """Return the `features` entry of info.json."""
    def scalar(dtype: str, names: list[str] | None = None) -> dict[str, Any]:
        return {'dtype': dtype, 'shape': [1], 'names': names}

    result = {
        'observation.state': {'dtype': 'float32', 'shape': [state_dim], 'names': None},
        'action': {'dtype': 'float32', 'shape': [action_dim], 'names': None},
    }
    if image_shape is not None:
        for view in range(views):
            result[f'observation.images.view{view}'] = {
                'dtype': 'image', 'shape': list(image_shape),
                'names': ['height', 'width', 'channels']}
    result.update({
        'timestamp': scalar('float32'),
        'frame_index': scalar('int64'),
        'episode_index': scalar('int64'),
        'index': scalar('int64'),
        'task_index': scalar('int64'),
        'next.done': scalar('bool'),
        'next.success': scalar('bool'),
        'controller': scalar('int64', list(Controller.labels())),
        'intervention': scalar('bool'),
        'outcome': scalar('int64', ['failure', 'success']),
        'stamp': scalar('float64'),
    })
    return result


def column_stats(values: np.ndarray) -> dict[str, list]:
    """Return LeRobot's per-episode stats of one column (over frames)."""
    data = np.asarray(values)
    data = data.reshape(len(data), -1).astype(np.float64)
    return {'min': data.min(axis=0).tolist(), 'max': data.max(axis=0).tolist(),
            'mean': data.mean(axis=0).tolist(), 'std': data.std(axis=0).tolist(),
            'count': [len(data)]}


def image_stats(images: np.ndarray) -> dict[str, list]:
    """Return per-channel stats of (T, H, W, 3) uint8 frames in [0, 1], shaped (3, 1, 1)."""
    data = images.reshape(-1, 3).astype(np.float64) / 255.0

    def shaped(vector: np.ndarray) -> list:
        return vector.reshape(3, 1, 1).tolist()
    return {'min': shaped(data.min(axis=0)), 'max': shaped(data.max(axis=0)),
            'mean': shaped(data.mean(axis=0)), 'std': shaped(data.std(axis=0)),
            'count': [len(images)]}


def write_frames(path: Path, columns: dict[str, np.ndarray], data_format: str) -> None:
    """Write one episode's columns as parquet (fixed-size lists for vectors) or .npz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data_format == 'npz':
        np.savez_compressed(path, **columns)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, values in columns.items():
        if values.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(values.reshape(-1)), values.shape[1])
        else:
            arrays[name] = pa.array(values)
    pq.write_table(pa.table(arrays), path)


def _prepare(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f'{out} exists; choose a new folder or pass --overwrite to '
                                  'replace an earlier export')
        if not (out / 'meta' / 'info.json').is_file():
            raise FileExistsError(f'{out} exists and is not a dataset exported before (no '
                                  'meta/info.json); it is left alone: choose a new folder')
    staging = out.with_name(out.name + '.partial')
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted export
    staging.mkdir(parents=True)
    return staging


def export_lerobot(items: Sequence[tuple[Any, Path]], out: Path,
                   options: ExportOptions = ExportOptions(), *,
                   source: str = '') -> ExportReport:
    """Export episodes, given as (EpisodeRecord, bag path), in this order.

    An episode whose bag cannot be read, or whose dimensions differ from the first exported
    one, is skipped with the reason in the report.

    Raises:
        FileExistsError: `out` exists (and `overwrite` is off, or it is not an export).
        ValueError: a non-positive fps or image size.
    """
    from PIL import Image

    from habc_episodes.episode_bags import episode_from_bag

    if options.fps is not None and options.fps <= 0:
        raise ValueError(f'--fps must be positive (got {options.fps})')
    if options.image_size is not None and options.image_size <= 0:
        raise ValueError(f'--image-size must be positive (got {options.image_size})')
    out = Path(out)
    staging = _prepare(out, options.overwrite)
    data_format = 'parquet' if have_pyarrow() else 'npz'
    report = ExportReport(out, data_format=data_format)
    try:
        loaded = []
        shape: tuple | None = None
        for record, bag in items:
            try:
                episode = episode_from_bag(bag, record.outcome, image_size=options.image_size,
                                           episode_id=record.episode_id)
            except (FileNotFoundError, ValueError) as exc:
                report.skipped[record.episode_id] = str(exc)
                continue
            if not options.images:
                episode.observations.pop('images', None)
            images = episode.observations.get('images')
            this = (episode.observations['state'].shape[1], episode.action_dim,
                    None if images is None else images.shape[1:])
            if shape is None:
                shape = this
            elif this != shape:
                report.skipped[record.episode_id] = (
                    f'(state, action, images) dimensions {this} differ from the first '
                    f'exported episode {shape}')
                continue
            loaded.append((record, episode))
        fps = options.fps or estimate_fps([e.timestamps for _, e in loaded])
        report.fps = fps
        tasks: dict[str, int] = {}
        episodes_meta, stats_meta = [], []
        for episode_index, (record, episode) in enumerate(loaded):
            instruction = episode.instruction or record.instruction
            task_index = tasks.setdefault(instruction, len(tasks))
            columns = frame_columns(episode, episode_index, report.frames, task_index, fps)
            chunk = episode_index // CHUNKS_SIZE
            write_frames(staging / (DATA_PATH.format(episode_chunk=chunk,
                                                     episode_index=episode_index)
                                    + data_format), columns, data_format)
            stats = {name: column_stats(values) for name, values in columns.items()}
            images = episode.observations.get('images')
            if images is not None:
                for view in range(images.shape[1]):
                    key = f'observation.images.view{view}'
                    for frame_index, frame in enumerate(images[:, view]):
                        path = staging / IMAGE_PATH.format(image_key=key,
                                                           episode_index=episode_index,
                                                           frame_index=frame_index)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(frame).save(path)
                    stats[key] = image_stats(images[:, view])
                report.images = True
            episodes_meta.append({
                'episode_index': episode_index, 'tasks': [instruction], 'length': len(episode),
                'habc_episode_id': record.episode_id, 'outcome': record.outcome,
                'num_interventions': episode.num_interventions,
                'policy_versions': sorted(set(episode.policy_versions)),
                'bag_path': str(record.bag_path)})
            stats_meta.append({'episode_index': episode_index, 'stats': stats})
            report.frames += len(episode)
            report.episodes += 1
        state_dim, action_dim, image_shape = shape if shape else (0, 0, None)
        views = image_shape[0] if image_shape else 0
        info = {
            'codebase_version': CODEBASE_VERSION,
            'robot_type': 'habc',
            'total_episodes': report.episodes,
            'total_frames': report.frames,
            'total_tasks': len(tasks),
            'total_videos': 0,
            'total_chunks': (report.episodes - 1) // CHUNKS_SIZE + 1 if report.episodes else 0,
            'chunks_size': CHUNKS_SIZE,
            'fps': fps,
            'splits': {'train': f'0:{report.episodes}'},
            'data_path': DATA_PATH + data_format,
            'video_path': None,
            'image_path': IMAGE_PATH if report.images else None,
            'features': features(state_dim, action_dim,
                                 tuple(image_shape[1:]) if report.images else None, views),
            'habc': {'source_index': source, 'data_format': data_format,
                     'skipped': report.skipped},
        }
        meta = staging / 'meta'
        meta.mkdir()
        (meta / 'info.json').write_text(json.dumps(info, indent=4) + '\n')
        _write_jsonl(meta / 'episodes.jsonl', episodes_meta)
        _write_jsonl(meta / 'episodes_stats.jsonl', stats_meta)
        _write_jsonl(meta / 'tasks.jsonl', [{'task_index': index, 'task': task}
                                            for task, index in tasks.items()])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return report


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
