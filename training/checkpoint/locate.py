"""Which checkpoint to use: the newest one that verifies (preferring healthy ones), or the one a user names.

`resume=auto` does not trust `latest` blindly: it takes the newest directory whose manifest verifies and names what
is wrong with the ones it skips; it hashes a checkpoint only when it comes to try it. `resolve_checkpoint` turns what a user names (a checkpoint, `latest`, the
checkpoints folder, a run directory) into one checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .errors import CheckpointError
from .files import LATEST, MANIFEST, _problems, list_checkpoints
from .meta import META, read_meta


def find_resumable(root: str | os.PathLike, collective: bool = False, log=print) -> Path | None:
    """The newest checkpoint under `root` that verifies; the broken ones are reported by name and skipped."""
    return next(resumable(root, collective, log), None)


def resumable(root: str | os.PathLike, collective: bool = False, log=print) -> Iterator[Path]:
    """Every checkpoint under `root` that verifies, in the order resume tries them: newest first, but ones saved
    during a streak of skipped steps (trainer.json `health.skipped_streak` > 0) after all the others. Names what it
    skips or defers; raises CheckpointError listing every checkpoint and why when some exist and none verifies.

    Lazy: only the manifests and file sizes of all are checked up front; a checkpoint is hashed when the iteration
    reaches it, so a resume reads the checkpoints it tries rather than every one that retention kept."""
    healthy, marked, broken = [], [], []

    def skip(path: Path, problems: list[str]) -> None:
        broken.append(f"{path}: {'; '.join(problems)}")
        if log:
            log(f"checkpoint {path} is not usable, trying the previous one: {'; '.join(problems)}")

    for path in list_checkpoints(root):
        problems = _problems(path, collective, checksums=False)
        if problems:
            skip(path, problems)
            continue
        streak = read_meta(path).get("health", {}).get("skipped_streak", 0)
        (marked if streak else healthy).append(path)
        if streak and log:
            log(f"checkpoint {path} was saved after {streak} consecutive skipped (non-finite or overflowing) steps; "
                f"preferring an older one")
    found = False
    for path in healthy + marked:
        problems = _problems(path, collective)
        if problems:
            skip(path, problems)
            continue
        found = True
        yield path
    if broken and not found:
        raise CheckpointError(f"no usable checkpoint under {root} (pass resume=none to start over): "
                              + " | ".join(broken))


def resolve_checkpoint(path: str | os.PathLike, collective: bool = False, log=None) -> Path:
    """The checkpoint directory a user means by `path`, in any of the forms a command-line `--checkpoint` (and
    `resume=`, `finetune.base=`) takes: a checkpoint directory; the `latest` file of a checkpoints folder (the
    checkpoint it names); a checkpoints folder (its newest complete checkpoint); a run directory (the newest complete
    checkpoint under its `checkpoints/`, or under the `checkpoint.dir` its config.yaml names). Choosing the newest
    complete one verifies the candidates; a directory named directly is only located: its reader verifies it.
    Raises CheckpointError saying what was looked at and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        if path.name != LATEST:
            raise CheckpointError(f"{path} is a file; give a checkpoint directory, a run directory, its checkpoints "
                                  f"folder or the folder's `{LATEST}` file")
        target = path.parent / path.read_text().strip()
        if not target.is_dir():
            raise CheckpointError(f"{path} names {target}, which does not exist")
        return target
    if (path / MANIFEST).exists() or (path / META).exists():
        return path
    root = path if list_checkpoints(path) or (path / LATEST).is_file() else _run_checkpoint_dir(path)
    skipped: list[str] = []

    def note(message: str) -> None:
        skipped.append(message)
        if log:
            log(message)

    found = find_resumable(root, collective, log=note)
    if found is None:
        what = f": {'; '.join(skipped)}" if skipped else " (no step######## directories there)"
        raise CheckpointError(f"no complete checkpoint under {root}{what}")
    return found


def _run_checkpoint_dir(run_dir: Path) -> Path:
    """Where a run directory keeps its checkpoints: `checkpoint.dir` of its config.yaml, else `checkpoints/`."""
    import yaml

    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            configured = (yaml.safe_load(config.read_text()) or {}).get("checkpoint", {}).get("dir")
        except (yaml.YAMLError, AttributeError):
            configured = None
        if configured:
            return Path(configured)
    return run_dir / "checkpoints"
