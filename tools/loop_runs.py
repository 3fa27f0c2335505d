"""What the loop tools (soak_loop.py, fault_matrix.py) check before they start a run."""

from pathlib import Path
import sys


def run_folders(tool: str, checkpoint: Path, run_dir: Path) -> tuple[Path, Path]:
    """Return (checkpoint, run folder) resolved; exit 2 with a reason when unusable.

    The checkpoint must hold model.safetensors; the run folder must not exist yet (a run
    never writes into another's episodes).
    """
    checkpoint, run_dir = checkpoint.resolve(), run_dir.resolve()
    if not (checkpoint / 'model.safetensors').is_file():
        print(f'{tool}: no checkpoint at {checkpoint}: run `make run` first or pass '
              '--checkpoint', file=sys.stderr)
        raise SystemExit(2)
    if run_dir.exists():
        print(f'{tool}: {run_dir} exists; remove it or pass another --run-dir',
              file=sys.stderr)
        raise SystemExit(2)
    return checkpoint, run_dir
