"""Where the bringup finds its policy checkpoint when none is configured (no rclpy, no torch).

`habc demo` (what `make run` runs) trains the SFT checkpoint of the small VLA into
`<out>/sft`, `--out runs/demo` by default, relative to the folder it runs in (`make run`:
the workspace). When the policy node's `checkpoint` or the learner's `init_checkpoint` is
left empty, those nodes and `habc launch` look for that checkpoint in the search folders:

1. the folders listed in $HABC_CHECKPOINT_SEARCH (separated by ':'; relative ones from the
   current folder), when that variable is set and not empty;
2. otherwise runs/demo in the current folder, then runs/demo in $HABC_ROOT (the workspace,
   exported by env.sh), so a plain `habc launch bringup` finds what `make run` trained from
   anywhere.

In each search folder the checkpoint folders `sft` and `*/sft` count (runs/demo/sft, and
runs/demo/<name>/sft for `habc demo --out runs/demo/<name>`) when they hold both
model.safetensors and config.json; the newest (by its weights' modification time) wins.
"""

from collections.abc import Mapping, Sequence
import os
from pathlib import Path

SEARCH_VAR = 'HABC_CHECKPOINT_SEARCH'
# `habc demo --out`'s default and the folder name of the SFT checkpoint it trains there.
DEMO_OUT = Path('runs') / 'demo'
SFT_NAME = 'sft'
# The learner's default work_dir: its checkpoints are written there, and policy nodes load
# updates from there by default (their checkpoint_roots).
LEARNER_WORK_DIR = '~/.habc/learner'
# A checkpoint folder holds both (habc_policy.models.base.WEIGHTS_FILE and CONFIG_FILE).
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'

# What the launcher prints, once, when the bringup starts without any checkpoint.
NO_CHECKPOINT_HINT = ('no policy checkpoint: run `make run` (or `habc demo`) once to train '
                      'one, or pass checkpoint:=DIR')


def search_folders(environ: Mapping[str, str] | None = None,
                   cwd: Path | None = None) -> list[Path]:
    """Return the absolute folders searched for a checkpoint, in order, without repeats."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    listed = environ.get(SEARCH_VAR, '')
    if listed:
        candidates = [Path(item).expanduser() for item in listed.split(os.pathsep) if item]
    else:
        candidates = [DEMO_OUT]
        if environ.get('HABC_ROOT'):
            candidates.append(Path(environ['HABC_ROOT']) / DEMO_OUT)
    folders: list[Path] = []
    for candidate in candidates:
        folder = (cwd / candidate).resolve()
        if folder not in folders:
            folders.append(folder)
    return folders


def is_checkpoint(folder: Path) -> bool:
    """Return True when `folder` holds a checkpoint (model.safetensors and config.json)."""
    return (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def find_checkpoint(folders: Sequence[Path] | None = None) -> Path | None:
    """Return the newest SFT checkpoint folder in `folders` (default: search_folders())."""
    folders = search_folders() if folders is None else folders
    newest: tuple[int, Path] | None = None
    for folder in folders:
        for candidate in (folder / SFT_NAME, *sorted(folder.glob(f'*/{SFT_NAME}'))):
            if not is_checkpoint(candidate):
                continue
            try:
                mtime = (candidate / WEIGHTS_FILE).stat().st_mtime_ns
            except OSError:  # removed meanwhile
                continue
            if newest is None or mtime > newest[0]:
                newest = (mtime, candidate)
    return None if newest is None else newest[1]


def describe_search(folders: Sequence[Path] | None = None) -> str:
    """Return the search folders for a message: 'a, b'."""
    folders = search_folders() if folders is None else folders
    return ', '.join(str(folder) for folder in folders)


class CheckpointWatch:
    """Repeat the search; report each checkpoint once, and again only after it changed.

    A node that waits for a checkpoint calls `poll()` periodically: a checkpoint that failed
    to load is not tried again until its files change (a training job finishing it, say).
    """

    def __init__(self, folders: Sequence[Path] | None = None) -> None:
        self.folders = search_folders() if folders is None else list(folders)
        self._seen: tuple[Path, int, int] | None = None

    def poll(self) -> Path | None:
        """Return a checkpoint not reported before in this state, else None."""
        found = find_checkpoint(self.folders)
        if found is None:
            return None
        try:
            key = (found, (found / WEIGHTS_FILE).stat().st_mtime_ns,
                   (found / CONFIG_FILE).stat().st_mtime_ns)
        except OSError:
            return None
        if key == self._seen:
            return None
        self._seen = key
        return found
