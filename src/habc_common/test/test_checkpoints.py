"""Finding the `habc demo` SFT checkpoint that a bringup without one starts from."""

import os
from pathlib import Path

from habc_common.checkpoints import (
    CheckpointWatch,
    find_checkpoint,
    is_checkpoint,
    search_folders,
    SEARCH_VAR,
)


def make_checkpoint(folder: Path, mtime: int | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / 'model.safetensors').write_bytes(b'weights')
    (folder / 'config.json').write_text('{}')
    if mtime is not None:
        os.utime(folder / 'model.safetensors', (mtime, mtime))
    return folder


def test_search_folders_default_to_runs_demo_here_then_in_the_workspace(tmp_path):
    here, workspace = tmp_path / 'here', tmp_path / 'ws'
    assert search_folders({}, cwd=here) == [here / 'runs' / 'demo']
    assert search_folders({'HABC_ROOT': str(workspace)}, cwd=here) == [
        here / 'runs' / 'demo', workspace / 'runs' / 'demo']
    # Run from the workspace itself: one folder, not the same one twice.
    assert search_folders({'HABC_ROOT': str(workspace)}, cwd=workspace) == [
        workspace / 'runs' / 'demo']


def test_the_variable_replaces_the_default_folders(tmp_path):
    environ = {SEARCH_VAR: f'a{os.pathsep}{tmp_path / "b"}', 'HABC_ROOT': str(tmp_path)}
    assert search_folders(environ, cwd=tmp_path / 'x') == [tmp_path / 'x' / 'a', tmp_path / 'b']
    # Empty: as if unset.
    assert search_folders({SEARCH_VAR: ''}, cwd=tmp_path) == [tmp_path / 'runs' / 'demo']


def test_find_returns_the_newest_sft_checkpoint(tmp_path):
    demo = tmp_path / 'runs' / 'demo'
    assert find_checkpoint([demo]) is None  # the folder does not even exist
    older = make_checkpoint(demo / 'sft', mtime=1_000)
    assert find_checkpoint([demo]) == older
    newer = make_checkpoint(demo / 'insertion' / 'sft', mtime=2_000)
    assert find_checkpoint([demo]) == newer
    # Across folders too: the newest wins, wherever it is.
    other = make_checkpoint(tmp_path / 'other' / 'sft', mtime=3_000)
    assert find_checkpoint([demo, tmp_path / 'other']) == other
    assert find_checkpoint([tmp_path / 'nothing', demo]) == newer


def test_only_complete_sft_folders_count(tmp_path):
    demo = tmp_path / 'demo'
    (demo / 'sft').mkdir(parents=True)
    (demo / 'sft' / 'model.safetensors').write_bytes(b'half written: no config.json yet')
    assert not is_checkpoint(demo / 'sft')
    # The learner's own checkpoints of a demo run are not SFT checkpoints.
    make_checkpoint(demo / 'run-1' / 'learner' / 'checkpoints' / 'v2')
    # Deeper than one level below the search folder: not searched.
    make_checkpoint(demo / 'a' / 'b' / 'sft')
    assert find_checkpoint([demo]) is None
    (demo / 'sft' / 'config.json').write_text('{}')
    assert find_checkpoint([demo]) == demo / 'sft'


def test_watch_reports_a_checkpoint_once_and_again_after_it_changed(tmp_path):
    watch = CheckpointWatch([tmp_path])
    assert watch.folders == [tmp_path]
    assert watch.poll() is None
    found = make_checkpoint(tmp_path / 'sft', mtime=1_000)
    assert watch.poll() == found
    assert watch.poll() is None  # the same files: not again (a failed load is not retried)
    os.utime(found / 'model.safetensors', (2_000, 2_000))  # rewritten
    assert watch.poll() == found
    assert watch.poll() is None
