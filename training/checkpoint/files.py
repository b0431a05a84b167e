"""A checkpoint directory as files: reading them as data, writing them atomically, the manifest that vouches for them.

Atomicity: every rank writes under `.tmp-step########`; only when all ranks have finished and the manifest is in
place does rank 0 rename the directory and then replace the `latest` pointer (both atomic renames). A process
killed at any moment leaves at worst a `.tmp-*` directory that nobody reads, so the previous checkpoint stays
loadable.

Every file is read as data (`load_file`: `torch.load(weights_only=True)` with a short allowlist, DeepSpeed's own reads
included); a pickle that would call anything else is refused unless `checkpoint.trust_pickle`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .collective import _gather, _rank_world
from .errors import CheckpointError, UntrustedCheckpointError

FORMAT = "skiptron-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

TRUST_HINT = ("load it only if you trust where it came from: --trust-checkpoint on the command line, "
              "checkpoint.trust_pickle=true in the config")


# -- reading files: data, not code ----------------------------------------------------------------------------
def _safe_globals() -> list:
    """What skiptron's and DeepSpeed's checkpoint files hold besides tensors and plain containers, the only classes
    `torch.load(weights_only=True)` may rebuild from them: numpy's RNG state in the rank files, and DeepSpeed
    0.19.8's ZeRO fragment addresses, stage enum and loss scalers in its optimizer files (checked on the files of
    ZeRO 0-3 in fp32 and bf16, PP, routed models)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_file(path: str | os.PathLike, map_location="cpu", trust: bool = False, mmap: bool = False):
    """One checkpoint file (ours or DeepSpeed's) read as data: `torch.load(weights_only=True)` with `_safe_globals`.
    A file whose pickle names anything else (which unpickling would call: a payload can run any code) is refused
    with UntrustedCheckpointError naming it, unless `trust` (checkpoint.trust_pickle / --trust-checkpoint).
    `mmap`: tensors are views of the memory-mapped file, read from disk only where a caller touches them."""
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    allowed = _safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        foreign = _foreign_globals(path, allowed)
        if foreign:
            raise UntrustedCheckpointError(
                f"{path} holds pickled code references ({', '.join(foreign)}) that loading would call, so it is not "
                f"loaded; {TRUST_HINT}") from None
        raise CheckpointError(f"cannot read {path}: {err}") from err  # truncated or foreign file


def _foreign_globals(path, allowed: list) -> list[str]:
    """The callables a torch.save file's pickle names beyond `allowed` (read without unpickling it)."""
    known = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip-format torch file: nothing to say beyond the load error
        return []
    return sorted(set(names) - known)


def _load(path: Path, trust: bool = False, mmap: bool = False):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the checkpoint")
    return load_file(path, trust=trust, mmap=mmap)


# -- small filesystem helpers ---------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _writing(path: Path):
    """Name the file when writing it fails (a full disk or quota: OSError, or a RuntimeError from torch's zip writer),
    and remove the torn file: the save stops before anything is published, so the previous checkpoint stays `latest`."""
    try:
        yield
    except dist.DistError:  # a collective failed (a peer rank died): not a write problem, the caller names it
        raise
    except (OSError, RuntimeError) as err:
        path.unlink(missing_ok=True)
        raise _write_failure(path, err) from err


def _write_failure(path: Path, err: Exception) -> CheckpointError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    free = shutil.disk_usage(path.parent).free / 2**20 if path.parent.exists() else float("nan")
    return CheckpointError(f"could not write {path}: {reason} ({free:.1f} MiB free there); nothing was published, "
                           f"the previous checkpoint is still `latest`")


def _sha256(path: Path, block_size: int = 1 << 22) -> str:
    """The file's sha256, reading the next block while the current one is hashed (both release the GIL), so a cold
    read and the hashing overlap instead of adding up."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(max_workers=1) as reader:
        block = f.read(block_size)
        while block:
            ahead = reader.submit(f.read, block_size)
            h.update(block)
            block = ahead.result()
    return h.hexdigest()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


# -- manifest and verification ----------------------------------------------------------------------------------
def _checksums(root: Path, names: list[str], collective: bool = True) -> dict[str, dict]:
    """Size and sha256 of `names`; with `collective`, hashing is spread over the ranks (when a group exists)."""
    rank, world = _rank_world() if collective else (0, 1)
    mine = {n: {"size": (root / n).stat().st_size, "sha256": _sha256(root / n)} for n in names[rank::world]}
    out: dict[str, dict] = {}
    for part in (_gather(mine) if collective else [mine]):
        out.update(part)
    return out


def _write_manifest(tmp: Path, files: dict, is_writer: bool) -> None:
    if is_writer:
        body = {"format": FORMAT, "version": FORMAT_VERSION, "files": files}
        _atomic_write(tmp / MANIFEST, json.dumps(body, indent=1).encode())


def _problems(path: Path, collective: bool, checksums: bool = True) -> list[str]:
    """What is wrong with a checkpoint directory (empty list: complete and intact). Without `checksums`, only what
    costs no reading: the manifest, and every file it lists present at its size."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return [f"{manifest_file} is missing (the save did not finish)"]
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{manifest_file} is unreadable: {err}"]
    problems = []
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != entry["size"]:
            problems.append(f"{f} has {f.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)")
    if problems or not checksums:
        return problems
    names = sorted(files)
    sums = _checksums(path, names) if collective else {n: {"sha256": _sha256(path / n)} for n in names}
    return [f"{path / n} fails its checksum (corrupt)" for n in names if sums[n]["sha256"] != files[n]["sha256"]]


def verify(path: str | os.PathLike, collective: bool = False) -> None:
    """Raise CheckpointError naming every missing, truncated or corrupt file of the checkpoint at `path`."""
    problems = _problems(Path(path), collective)
    if problems:
        raise CheckpointError("; ".join(problems))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Published checkpoint directories under `root`, newest first (no temporary or half-deleted ones)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[4:]), reverse=True)


# -- publishing and retention -----------------------------------------------------------------------------------
def _publish(tmp: Path, final: Path) -> None:
    """Make a finished checkpoint visible under its final name (an atomic directory rename)."""
    if final.exists():  # the same step saved again (e.g. a resumed run that stopped at once): replace it
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    _fsync(final.parent)


def _update_latest(root: Path, tag: str) -> None:
    _atomic_write(root / LATEST, tag.encode())


def apply_retention(root: Path, keep: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (0 keeps all), sparing steps divisible by `keep_every`.

    A checkpoint is renamed away before it is deleted, so a half-deleted one is never mistaken for a checkpoint."""
    removed = []
    if keep <= 0:
        return removed
    for path in list_checkpoints(root)[keep:]:
        if keep_every and int(path.name[4:]) % keep_every == 0:
            continue
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash)
        removed.append(path)
    return removed
