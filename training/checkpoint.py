"""Sharded checkpoints: atomic saves, verified resume, and resharding to another parallel layout.

A checkpoint is a directory `<checkpoint.dir>/step########/` holding

    DeepSpeed's own shards   model states per TP rank, ZeRO optimizer states per (DP, TP) rank, LR scheduler
    rank#####.pt             per-rank state: RNG streams (python, numpy, torch, cuda) and `extra` stateful objects
    trainer.json             format version, step, consumed samples/tokens, the layout it was saved with, every
                             parameter's parallel layout (full shape, TP partition dim and stride, vocab padding)
                             and the optimizer's parameter groups by name
    config.yaml, tokenizer.json
    manifest.json            written last: size and sha256 of every other file

Atomicity: every rank writes under `.tmp-step########`; only when all ranks have finished and the manifest is in
place does rank 0 rename the directory and then replace the `latest` pointer (both atomic renames). A process
killed at any moment leaves at worst a `.tmp-*` directory that nobody reads, so the previous checkpoint stays
loadable. `resume=auto` does not trust `latest` blindly: it takes the newest directory whose manifest verifies
and names what is wrong with the ones it skips.

Resume: when the layout (TP, PP, DP, ZeRO stage, precision) is unchanged, DeepSpeed loads its own shards (exact,
bitwise). Otherwise the checkpoint is *resharded*: `read_full_state` rebuilds every parameter's fp32 master weight
and Adam moments as whole TP=1 tensors from DeepSpeed's files (using the layout recorded in trainer.json, never
guessing), and `apply_full_state` cuts out this rank's TP shard and hands it to DeepSpeed's ZeRO partitions.
Pipeline checkpoints record their parameters under GPT's names too (trainer.json's `pipeline` maps them to each
stage's files: DeepSpeed's per-layer weight files and per-(stage, TP rank) optimizer files), so a checkpoint moves
between any PP sizes, PP = 1 included, the same way; the tied embedding's first-stage copy is the one read. We
write the resharding rather than use DeepSpeed's universal checkpoint because the latter needs name patterns for
megatron's strided QKV / gate-up splits and does not cover ZeRO-3 reliably; here the per-parameter layout is exact.
Resharding reads the whole model state on every rank (CPU memory: ~12 bytes per parameter, once, at resume).

The data position is the number of consumed samples of the loader's global stream (see `training/loader.py`), so it
survives a change of DP size.

Every file is read as data (`load_file`: `torch.load(weights_only=True)` with a short allowlist, DeepSpeed's own reads
included); a pickle that would call anything else is refused unless `checkpoint.trust_pickle`. `resolve_checkpoint`
turns what a user names (a checkpoint, `latest`, the checkpoints folder, a run directory) into one checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from skiptron.parallel.tensor_parallel import join_tp, split_tp, tp_layout

FORMAT = "skiptron-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META = "trainer.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# Model keys that may change across a resume without changing any weight.
RESHAPE_FREE_MODEL_KEYS = {"seq_len", "init_std", "max_position_embeddings", "hf_architecture"}
# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving (EX_TEMPFAIL: "try again", i.e. requeue me).
EXIT_PREEMPTED = 75


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or key."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file holding pickled objects that loading would have to run as code."""


TRUST_HINT = ("load it only if you trust where it came from: --trust-checkpoint on the command line, "
              "checkpoint.trust_pickle=true in the config")


@dataclass
class Progress:
    """Where training stands: what a resume needs besides weights and optimizer."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    consumed_by_source: dict[str, int] = field(default_factory=dict)  # data source name -> samples taken from it

    def advance(self, samples: int, tokens: int) -> None:
        self.step += 1
        self.consumed_samples += samples
        self.consumed_tokens += tokens


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


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


def load_file(path: str | os.PathLike, map_location="cpu", trust: bool = False):
    """One checkpoint file (ours or DeepSpeed's) read as data: `torch.load(weights_only=True)` with `_safe_globals`.
    A file whose pickle names anything else (which unpickling would call: a payload can run any code) is refused
    with UntrustedCheckpointError naming it, unless `trust` (checkpoint.trust_pickle / --trust-checkpoint)."""
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    allowed = _safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
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


def _read_through_load_file(engine, trust: bool) -> None:
    """DeepSpeed 0.19.8's TorchCheckpointEngine.load calls torch.load(weights_only=False), and every file
    `engine.load_checkpoint` reads (model states, ZeRO optimizer states, a pipeline's per-layer files) goes through
    `engine.checkpoint_engine.load(path, map_location)`: route those reads through `load_file`."""
    reader = engine.checkpoint_engine

    def load(path, map_location=None):
        return load_file(path, map_location=map_location, trust=trust)

    reader.load = load


# -- small filesystem helpers ---------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)


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
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        path.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20 if path.parent.exists() else float("nan")
        raise CheckpointError(f"could not write {path}: {reason} ({free:.1f} MiB free there); nothing was published, "
                              f"the previous checkpoint is still `latest`") from err


def _name_write_errors(engine) -> None:
    """Route DeepSpeed's own checkpoint files through `_writing`, so a failed write names its file there too."""
    writer = engine.checkpoint_engine
    if getattr(writer, "skiptron_named_errors", False):
        return
    save_file = writer.save

    def save(state_dict, path):
        with _writing(Path(path)):
            return save_file(state_dict, path)

    writer.save, writer.skiptron_named_errors = save, True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _gather(obj, group=None) -> list:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _agreed(read) -> None:
    """Run this rank's part of a load; if any rank's part failed, every rank raises that error (a rank-local refusal
    must not leave the other ranks waiting in the next collective). Collective."""
    try:
        read()
        failure = None
    except CheckpointError as err:
        failure = (type(err) is UntrustedCheckpointError, str(err))
    failures = [f for f in _gather(failure) if f is not None]
    if failures:
        untrusted, message = failures[0]
        raise (UntrustedCheckpointError if untrusted else CheckpointError)(message)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- manifest and verification ----------------------------------------------------------------------------------
def _checksums(root: Path, names: list[str]) -> dict[str, dict]:
    """Size and sha256 of `names`; hashing is spread over the ranks (collective when a group exists)."""
    rank, world = _rank_world()
    mine = {n: {"size": (root / n).stat().st_size, "sha256": _sha256(root / n)} for n in names[rank::world]}
    out: dict[str, dict] = {}
    for part in _gather(mine):
        out.update(part)
    return out


def _problems(path: Path, collective: bool) -> list[str]:
    """What is wrong with a checkpoint directory (empty list: complete and intact)."""
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
    if problems:
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


def find_resumable(root: str | os.PathLike, collective: bool = False, log=print) -> Path | None:
    """The newest checkpoint under `root` that verifies; the broken ones are reported by name and skipped."""
    return next(iter(resumable(root, collective, log)), None)


def resumable(root: str | os.PathLike, collective: bool = False, log=print) -> list[Path]:
    """Every checkpoint under `root` that verifies, in the order resume tries them: newest first, but ones saved
    during a streak of skipped steps (trainer.json `health.skipped_streak` > 0) after all the others. Names what it
    skips or defers; raises CheckpointError listing every checkpoint and why when some exist and none verifies."""
    healthy, marked, broken = [], [], []
    for path in list_checkpoints(root):
        problems = _problems(path, collective)
        if problems:
            broken.append(f"{path}: {'; '.join(problems)}")
            if log:
                log(f"checkpoint {path} is not usable, trying the previous one: {'; '.join(problems)}")
            continue
        streak = read_meta(path).get("health", {}).get("skipped_streak", 0)
        (marked if streak else healthy).append(path)
        if streak and log:
            log(f"checkpoint {path} was saved after {streak} consecutive skipped (non-finite or overflowing) steps; "
                f"preferring an older one")
    if broken and not healthy and not marked:
        raise CheckpointError(f"no usable checkpoint under {root} (pass resume=none to start over): "
                              + " | ".join(broken))
    return healthy + marked


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


def read_meta(path: str | os.PathLike) -> dict:
    """trainer.json of a checkpoint, with its format and version checked."""
    f = Path(path) / META
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: {path} is not a skiptron checkpoint")
    try:
        meta = json.loads(f.read_text())
    except ValueError as err:
        raise CheckpointError(f"{f} is unreadable: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a {FORMAT} file")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{f} has checkpoint format version {meta['version']}, newer than this code reads ({FORMAT_VERSION}); "
            f"update skiptron")
    return meta


# -- save -------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_layouts(module: torch.nn.Module, tp: int, vocab_size: int) -> dict[str, dict]:
    """Each parameter's parallel layout, written at save time so resharding never guesses."""
    out = {}
    for name, p in module.named_parameters():
        shape = list(getattr(p, "ds_shape", p.shape))
        layout = tp_layout(p)
        dim, stride = layout if layout else (None, 1)
        if dim is not None:
            shape[dim] *= tp
        entry = {"shape": shape, "partition_dim": dim, "stride": stride}
        if getattr(p, "partition_dim", None) == 0 and name.endswith(("tokens.weight", "output.weight", "embedding.codes")):
            entry["vocab_padding"] = shape[0] - vocab_size
        out[name] = entry
    return out


def optimizer_group_names(engine) -> list[list[str]]:
    """The optimizer's parameter groups by parameter name (stage-0 optimizer state is keyed by this order)."""
    from .engine import param_groups

    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(engine.module, 0.0)]


def model_meta(engine, tp: int, vocab_size: int) -> dict:
    """trainer.json's `params` (every parameter's layout) and optimizer groups. A pipeline's are gathered from
    all stages (collective) and `params` is keyed by GPT's names, as for a GPT checkpoint; `pipeline` holds what
    finds each name in DeepSpeed's per-stage files: GPT's name of every layer index, the stage boundaries, and each
    stage's optimizer groups by the stage's own parameter names."""
    from deepspeed.pipe import PipelineModule

    module = engine.module
    params, groups = param_layouts(module, tp, vocab_size), optimizer_group_names(engine)
    if not isinstance(module, PipelineModule):
        return {"params": params, "optimizer_groups": groups}
    from megatron.core import parallel_state as ps

    from .pipeline import gpt_name

    layers = module.layer_names()
    stages = _gather((params, groups), group=ps.get_pipeline_model_parallel_group())
    merged = {gpt_name(n, layers): entry for stage_params, _ in stages for n, entry in stage_params.items()}
    return {"params": dict(sorted(merged.items())),
            "pipeline": {"layers": layers, "parts": [int(i) for i in module.parts],
                         "optimizer_groups": [stage_groups for _, stage_groups in stages]}}


def nonfinite_state(engine) -> list[str]:
    """Names of the non-finite tensors among every rank's weights, fp32 master weights and optimizer state (the
    same list on every rank; collective)."""
    module_params = [(n, p) for n, p in engine.module.named_parameters() if p.numel()]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer_tensors = [(f"optimizer group {g} tensor {i}", p) for g, group in enumerate(base.param_groups)
                         for i, p in enumerate(group["params"])]
    optimizer_tensors += [(f"optimizer {key} of group {g} tensor {i}", v)
                          for g, group in enumerate(base.param_groups) for i, p in enumerate(group["params"])
                          for key, v in base.state.get(p, {}).items() if torch.is_tensor(v) and v.numel() > 1]
    tensors = module_params + optimizer_tensors
    # One read pass: a NaN or inf anywhere makes the tensor's sum non-finite (no boolean copy of every tensor); only
    # then is each tensor checked exactly (a finite sum that overflowed is not a non-finite value)
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for _, t in tensors]) if tensors else torch.zeros(1)
    suspect = not bool(torch.isfinite(sums).all())
    rank, _ = _rank_world()
    mine = [f"{name} (rank {rank})" for name, t in tensors if not torch.isfinite(t.detach()).all()] if suspect else []
    return [name for part in _gather(mine) for name in part]


def save(engine, cfg, layout, progress: Progress, vocab_size: int, extra: dict | None = None,
         tokenizer: str | os.PathLike | None = None, health: dict | None = None) -> Path:
    """Save a checkpoint of `progress.step` atomically, update `latest`, apply retention. Collective. Refuses
    (CheckpointError, nothing written) when a weight or optimizer tensor is non-finite (`checkpoint.check_finite`).
    `health` (the trainer's skipped-step counters) goes into trainer.json, so resume can avoid a diverging one."""
    from . import faults

    if cfg.checkpoint.check_finite:
        bad = nonfinite_state(engine)
        if bad:
            raise CheckpointError(f"not saving step {progress.step}: non-finite values in {', '.join(bad[:8])}"
                                  f"{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}; the previous "
                                  f"checkpoint stays `latest`")
    root = cfg.checkpoint_dir
    tag = step_tag(progress.step)
    tmp, final = root / f"{TMP_PREFIX}{tag}", root / tag
    if layout.is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    _name_write_errors(engine)
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": progress.step}, save_latest=False)
    with _writing(tmp / _rank_file(layout.rank)):
        _torch_save({"rng": rng_state(), "extra": {k: v.state_dict() for k, v in (extra or {}).items()}},
                    tmp / _rank_file(layout.rank))
    faults.fire("save", progress.step, layout.rank)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": "training", **asdict(progress),
        "time": time.time(), "vocab_size": vocab_size, "health": health or {},
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size,
                   "zero_stage": cfg.zero.stage, "precision": _precision(engine)},
        **model_meta(engine, layout.tp, vocab_size),
    }
    if layout.is_writer:
        from .config import save_config

        with _writing(tmp / META):
            (tmp / META).write_text(json.dumps(meta, indent=1))
        with _writing(tmp / "config.yaml"):
            save_config(cfg, tmp / "config.yaml")
        if tokenizer and Path(tokenizer).is_file():
            with _writing(tmp / "tokenizer.json"):
                shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    _barrier()
    sums = _checksums(tmp, _listing(tmp))  # collective: outside `_writing`, a dead peer is not a disk problem
    with _writing(tmp / MANIFEST):
        _write_manifest(tmp, sums, layout.is_writer)
    if layout.is_writer:
        _publish(tmp, final)
        _update_latest(root, tag)
        apply_retention(root, cfg.checkpoint.keep, cfg.checkpoint.keep_every)
    _barrier()
    return final


def _precision(engine) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


def _write_manifest(tmp: Path, files: dict, is_writer: bool) -> None:
    if is_writer:
        body = {"format": FORMAT, "version": FORMAT_VERSION, "files": files}
        _atomic_write(tmp / MANIFEST, json.dumps(body, indent=1).encode())


def _publish(tmp: Path, final: Path) -> None:
    """Make a finished checkpoint visible under its final name (an atomic directory rename)."""
    if final.exists():  # the same step saved again (e.g. a resumed run that stopped at once): replace it
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


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


# -- resume -----------------------------------------------------------------------------------------------------
def resume_candidates(cfg, log=print) -> list[Path]:
    """The checkpoints resume tries for `cfg.resume`, in order (see `resumable`): none for `none` or an empty
    checkpoint directory, one for an explicit checkpoint directory. Collective (verification)."""
    choice = str(cfg.resume)
    if choice == "none":
        return []
    if choice == "auto":
        return resumable(cfg.checkpoint_dir, collective=True, log=log)
    try:
        path = resolve_checkpoint(choice, collective=True, log=log)
    except CheckpointError as err:
        raise CheckpointError(f"resume: {err}") from None
    named = path == Path(choice) or Path(choice).name == LATEST  # not chosen (and verified) among several
    problems = _problems(path, collective=True) if named else []
    if problems:
        raise CheckpointError(f"resume: {path} is not usable: {'; '.join(problems)}")
    return [path]


def check_compatible(path: Path, meta: dict, cfg, vocab_size: int) -> None:
    """Refuse a checkpoint of a different model, naming every differing key."""
    from .config import load_config

    saved_model = load_config(path / "config.yaml").model
    saved = {**saved_model.model_dump(mode="json"), "ffn_hidden_size": saved_model.ffn_size,
             "num_kv_heads": saved_model.kv_heads}
    current = {**cfg.model.model_dump(mode="json"), "ffn_hidden_size": cfg.model.ffn_size,
               "num_kv_heads": cfg.model.kv_heads}
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current))
             if k not in RESHAPE_FREE_MODEL_KEYS and k != "vocab_size" and saved.get(k) != current.get(k)]
    if meta.get("vocab_size") != vocab_size:
        diffs.append(f"model.vocab_size: checkpoint {meta.get('vocab_size')!r}, config/data {vocab_size!r}")
    if diffs:
        raise CheckpointError(f"{path} was saved from a different model; differing keys: {'; '.join(diffs)}")


def same_layout(meta: dict, cfg, layout, engine) -> bool:
    saved = meta["layout"]
    return (saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"], saved["precision"]) == (
        layout.tp, layout.pp, layout.dp, cfg.zero.stage, _precision(engine))


def load(engine, cfg, layout, path: Path, vocab_size: int, extra: dict | None = None, log=print) -> Progress:
    """Restore weights, optimizer, scheduler, RNG, `extra` and the progress from `path`. Collective."""
    meta = read_meta(path)
    check_compatible(path, meta, cfg, vocab_size)
    trust = cfg.checkpoint.trust_pickle
    if meta.get("kind") == "weights":  # from `skiptron-convert from-hf` and other tools: weights, a fresh optimizer
        weights = _load_weights_file(path, trust)
        apply_full_state(engine, weights, None, 0)
        _apply_buffers(engine, weights)
        return Progress()
    if same_layout(meta, cfg, layout, engine):
        _read_through_load_file(engine, trust)
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
    else:
        s = meta["layout"]
        if layout.is_writer and log:
            log(f"resharding {path}: saved with tp={s['tp']} pp={s['pp']} dp={s['dp']} zero={s['zero_stage']} "
                f"{s['precision']}, loading with tp={layout.tp} pp={layout.pp} dp={layout.dp} zero={cfg.zero.stage}")
        weights, moments, opt_step, extras = read_full_state(path, meta=meta, trust=trust)
        apply_full_state(engine, weights, moments, opt_step)
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(extras["lr_scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):  # the LR of the next step
            group["lr"] = lr
        engine.global_steps = extras["global_steps"]
        engine.global_samples = extras["global_samples"]
        engine.skipped_steps = extras["skipped_steps"]
        engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
        _apply_buffers(engine, extras["buffers"])
    _agreed(lambda: _load_rank_state(path, meta, layout, extra or {}, trust))
    return Progress(meta["step"], meta["consumed_samples"], meta["consumed_tokens"], meta.get("consumed_by_source", {}))


def _apply_buffers(engine, values: dict[str, torch.Tensor]) -> None:
    """Replicated module state such as routing controllers, by GPT name (other entries are ignored)."""
    to_gpt = _gpt_names(engine.module)
    for local_name, buffer in engine.module.named_buffers():
        if to_gpt(local_name) in values:
            buffer.copy_(values[to_gpt(local_name)])


def _load_rank_state(path: Path, meta: dict, layout, extra: dict, trust: bool = False) -> None:
    """RNG streams and `extra` objects: this rank's own file when the world size is unchanged, else rank 0's.

    An `extra` object that can merge the states of a different layout defines `load_resharded_state(states)`,
    which gets every saved rank's state (e.g. router statistics)."""
    same_world = meta["layout"]["world_size"] == layout.world_size
    own = _load(path / _rank_file(layout.rank if same_world else 0), trust)
    set_rng_state(own["rng"])
    for name, obj in extra.items():
        if name not in own["extra"]:
            warnings.warn(f"{path}: no saved state for {name!r}; it starts fresh")
        elif not same_world and hasattr(obj, "load_resharded_state"):
            states = [_load(path / _rank_file(r), trust)["extra"][name]
                      for r in range(meta["layout"]["world_size"])]
            obj.load_resharded_state(states)
        else:
            obj.load_state_dict(own["extra"][name])


# -- resharding: DeepSpeed's shards <-> whole tensors ------------------------------------------------------------
def _load(path: Path, trust: bool = False):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the checkpoint")
    return load_file(path, trust=trust)


def _model_file(path: Path, stage: int, mp_rank: int) -> Path:
    """DeepSpeed's model-parallel rank `mp_rank` is the TP rank, under PP stage x TP + TP rank."""
    prefix = "zero_pp_rank_0_" if stage == 3 else ""
    return path / f"{prefix}mp_rank_{mp_rank:02d}_model_states.pt"


def _optim_file(path: Path, dp_rank: int, mp_rank: int, precision: str) -> Path:
    """DeepSpeed prefixes the ZeRO optimizer files of bf16 runs with `bf16_` (any stage; checked with 0.19.8)."""
    prefix = "bf16_" if precision == "bf16" else ""
    return path / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def _stage0_masters(optimizer: dict, names: list[str], param_shapes: list[dict]) -> tuple[list, dict]:
    """ZeRO-0 bf16/fp16 (DeepSpeed's FP16_Optimizer): the fp32 master of every parameter in optimizer-group order,
    and the base optimizer's state by that same index. The unfused optimizer (torch's AdamW) saves one master per
    parameter (`fp32_groups`); the fused one (apex / DeepSpeed FusedAdam) one flat master and state per group
    (`fp32_groups_flat`), cut here by the parameter shapes DeepSpeed records (`param_shapes`)."""
    state = optimizer["optimizer_state_dict"]["state"]
    if "fp32_groups" in optimizer:
        return [t for group in optimizer["fp32_groups"] for t in group], state
    masters, per_param = [], {}
    for g, (flat, shapes) in enumerate(zip(optimizer["fp32_groups_flat"], param_shapes)):
        offset = 0
        for shape in shapes.values():
            n, i = math.prod(shape), len(masters)
            masters.append(flat.narrow(0, offset, n).view(shape))
            if g in state:
                per_param[i] = {k: state[g][k].narrow(0, offset, n).view(shape) for k in ADAM_KEYS}
                per_param[i]["step"] = state[g]["step"]
            offset += n
    if len(masters) != len(names):
        raise CheckpointError(f"ZeRO-0 optimizer state holds {len(masters)} parameters, trainer.json {len(names)}")
    return masters, per_param


def _gpt_names(module: torch.nn.Module):
    """Parameter/buffer name in `module` -> the checkpoint's (GPT's) name; they differ only on pipeline stages."""
    from deepspeed.pipe import PipelineModule

    return module.gpt_name if isinstance(module, PipelineModule) else (lambda name: name)


def _stage_module_state(path: Path, pipe: dict, stage: int, tp_rank: int, trust: bool = False) -> dict[str, torch.Tensor]:
    """A pipeline stage's weights and buffers (this TP rank's shards) under GPT's names, from DeepSpeed's per-layer
    files `layer_<index>-model_<tp rank>-model_states.pt`."""
    out = {}
    for idx in range(pipe["parts"][stage], pipe["parts"][stage + 1]):
        name = pipe["layers"][idx]
        if name is not None:  # None: the tied output layer, whose weight is the embedding's (first stage)
            state = _load(path / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt", trust)
            out.update({f"{name}.{k.removeprefix('layer.')}": v for k, v in state.items()})
    return out


def _read_tp_rank(path: Path, meta: dict, tp_rank: int, with_optimizer: bool, pp_rank: int = 0,
                  trust: bool = False):
    """One (pipeline stage, TP rank)'s tensors {GPT name: {"param", "exp_avg", "exp_avg_sq"}}, ZeRO partitions
    joined over DP, and its model-states file with `module` holding its weights and buffers under GPT's names."""
    lay = meta["layout"]
    stage, dp = lay["zero_stage"], lay["dp"]
    pipe = meta.get("pipeline")
    mp_rank = pp_rank * lay["tp"] + tp_rank
    model = _load(_model_file(path, stage, mp_rank), trust)
    if pipe:
        from .pipeline import gpt_name

        def rename(name):
            return gpt_name(name, pipe["layers"])
        model["module"] = _stage_module_state(path, pipe, pp_rank, tp_rank, trust)
        groups = pipe["optimizer_groups"][pp_rank]
    else:
        def rename(name):
            return name
        groups = meta["optimizer_groups"]
    keys = ("param",) + (ADAM_KEYS if with_optimizer else ())
    out: dict[str, dict[str, torch.Tensor]] = {}
    if stage == 0:
        names = [n for group in groups for n in group]
        if lay["precision"] == "fp32":
            masters, state = None, model["optimizer"]["state"]
        else:  # the module holds bf16/fp16 copies; the fp32 masters live in the optimizer's state
            masters, state = _stage0_masters(model["optimizer"], names, model["param_shapes"])
        for i, name in enumerate(names):
            if rename(name) not in model["module"]:  # the last stage's tied embedding: no file of its own
                continue
            weight = model["module"][rename(name)] if masters is None else masters[i]
            out[rename(name)] = {"param": weight.float().clone()}
            if with_optimizer:
                out[rename(name)].update({k: state[i][k] for k in ADAM_KEYS} if i in state else {})
        return out, model, _opt_step(state)
    shapes = [(n, torch.Size(s)) for group in model["param_shapes"] for n, s in group.items()]
    pieces = {n: {k: [] for k in keys} for n, _ in shapes}
    opt_step = 0
    for d in range(dp):
        osd = _load(_optim_file(path, d, mp_rank, lay["precision"]), trust)["optimizer_state_dict"]
        if stage == 3:
            state = osd["optimizer_state_dict"]["state"]
            flat = {"param": torch.cat(osd["fp32_flat_groups"])}
            if with_optimizer:
                flat.update({k: torch.cat([state[g][k] for g in sorted(state)]) for k in ADAM_KEYS})
            offset = 0
            for name, shape in shapes:
                part = math.ceil(shape.numel() / dp)
                for k in keys:
                    pieces[name][k].append(flat[k].narrow(0, offset, part))
                offset += part
        else:
            state = osd["base_optimizer_state"]["state"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                flat = {"param": osd["single_partition_of_fp32_groups"][g]}
                if with_optimizer:
                    flat.update({k: state[g][k] for k in ADAM_KEYS})
                for name, frag in mapping.items():
                    for k in keys:
                        pieces[name][k].append(flat[k].narrow(0, frag.start, frag.numel))
        opt_step = _opt_step(state)
    for name, shape in shapes:
        out[rename(name)] = {k: torch.cat(v)[: shape.numel()].view(shape).clone() for k, v in pieces[name].items()}
    return out, model, opt_step


def _opt_step(state: dict) -> int:
    for entry in state.values():
        return int(entry["step"])
    return 0


def read_full_state(path: str | os.PathLike, meta: dict | None = None, with_optimizer: bool = True,
                    trust: bool = False):
    """Whole (TP=1, unpartitioned) fp32 weights and Adam moments from a checkpoint of any layout.

    Returns (weights {name: tensor}, moments {name: {exp_avg, exp_avg_sq}} or None, optimizer step, extras) where
    extras holds the LR scheduler state and DeepSpeed's step/sample counters."""
    path = Path(path)
    meta = meta or read_meta(path)
    if meta.get("kind") == "weights":
        return _load_weights_file(path, trust), None, 0, {}
    tp, pp = meta["layout"]["tp"], meta["layout"].get("pp", 1)
    per_rank, opt_step, stage_models = [], 0, [None] * pp  # stage_models: TP rank 0's model-states files
    for t in range(tp):
        local = {}
        for s in reversed(range(pp)):  # the first stage's copy of a tied embedding is the one kept
            part, model, opt_step = _read_tp_rank(path, meta, t, with_optimizer, s, trust)
            local.update(part)
            if t == 0:
                stage_models[s] = model
        per_rank.append(local)
    first_model = stage_models[0]
    weights, moments = {}, {} if with_optimizer else None
    for name, info in meta["params"].items():
        missing = [t for t in range(tp) if name not in per_rank[t]]
        if missing:
            raise CheckpointError(f"{path}: parameter {name} is missing from the shards of TP rank(s) {missing}")
        joined = {}
        for k in per_rank[0][name]:
            parts = [per_rank[t][name][k] for t in range(tp)]
            dim = info["partition_dim"]
            joined[k] = parts[0] if dim is None else join_tp(parts, dim, info["stride"])
            if list(joined[k].shape) != info["shape"]:
                raise CheckpointError(f"{path}: {name} ({k}) rebuilt with shape {list(joined[k].shape)}, "
                                      f"trainer.json says {info['shape']}")
        weights[name] = joined.pop("param")
        if with_optimizer:
            moments[name] = joined
    extras = {k: first_model.get(k) for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}
    extras["buffers"] = {k: v for model in stage_models for k, v in model["module"].items()
                         if torch.is_tensor(v) and k not in meta["params"]}
    return weights, moments, opt_step, extras


@torch.no_grad()
def apply_full_state(engine, weights: dict, moments: dict | None, opt_step: int) -> None:
    """Load whole tensors into this rank's shards of the model, fp32 masters and (if given) Adam moments."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if moments is not None:
        for group, p in _optimizer_state_owners(engine, base):
            st = base.state[p]
            on_device = group.get("fused") or group.get("capturable")
            st["step"] = torch.tensor(float(opt_step), dtype=torch.float32, device=p.device if on_device else "cpu")
            for k in ADAM_KEYS:
                st.setdefault(k, torch.zeros_like(p))
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2: link the new state
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
    to_gpt = _gpt_names(engine.module)
    masters = _fp16_optimizer_masters(engine)
    for local_name, p in engine.module.named_parameters():
        name = to_gpt(local_name)
        if name not in weights:
            raise CheckpointError(f"the checkpoint has no weight for parameter {name}")
        layout = tp_layout(p)

        def shard(full):
            return full if layout is None else split_tp(full, layout[0], layout[1], tp, tp_rank)

        value = shard(weights[name])
        zero3 = hasattr(p, "ds_id")
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))
        sharded_optimizer = zero3 or hasattr(p, "_hp_mapping")
        if sharded_optimizer:
            safe_set_full_fp32_param(p, value.float())
        master = masters.get(id(p), p)  # the tensor the base optimizer steps (and keys its state by)
        if master is not p:
            master.copy_(value.view_as(master))
        if moments is None:
            continue
        for k in ADAM_KEYS:
            v = shard(moments[name][k])
            if sharded_optimizer:
                safe_set_full_optimizer_state(p, v.float(), k)
            else:
                _optimizer_state_of(base, master, k).copy_(v.view_as(master))


def _optimizer_state_owners(engine, base) -> list[tuple[dict, torch.Tensor]]:
    """(param group, tensor) for every tensor the base optimizer keeps Adam state for. ZeRO-3 empties the base
    optimizer's groups between steps and keys the state by its flat fp32 partitions (`fp32_partitioned_groups_flat`,
    checked with deepspeed 0.19.8), so a fresh ZeRO-3 engine has no state to write moments into without them."""
    owners = [(group, p) for group in base.param_groups for p in group["params"]]
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats:
        known = {id(p) for _, p in owners}
        defaults = base.param_groups[0] if base.param_groups else {}
        owners += [(defaults, flat) for flat in flats if id(flat) not in known]
    return owners


def _fp16_optimizer_masters(engine) -> dict[int, torch.Tensor]:
    """ZeRO-0 bf16/fp16 (DeepSpeed's FP16_Optimizer, unfused or fused; checked with 0.19.8): model parameter id ->
    its fp32 master (a view into its group's flat master when fused). Empty for every other optimizer."""
    opt = engine.optimizer
    lows = getattr(opt, "fp16_groups", None)
    if lows is None or engine.zero_optimization():
        return {}
    if hasattr(opt, "fp32_groups_flat"):
        out = {}
        for group, flat in zip(lows, opt.fp32_groups_flat):
            offset = 0
            for p in group:
                out[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p)
                offset += p.numel()
        return out
    return {id(p): master for group, hi in zip(lows, opt.fp32_groups) for p, master in zip(group, hi)}


def _optimizer_state_of(base, master: torch.Tensor, key: str) -> torch.Tensor:
    """The base optimizer's `key` state for `master`; for a view into a fused group's flat master, the same view
    of the flat state."""
    if master in base.state:
        return base.state[master][key]
    flat = master._base
    offset = master.storage_offset() - flat.storage_offset()
    return base.state[flat][key].view(-1).narrow(0, offset, master.numel()).view_as(master)


# -- weights-only checkpoints (made by `skiptron-convert from-hf`) -----------------------------------------------
WEIGHTS_FILE = "model.pt"


def _load_weights_file(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    return _load(path / WEIGHTS_FILE, trust)


def write_weights_checkpoint(out: str | os.PathLike, cfg, weights: dict[str, torch.Tensor], vocab_size: int,
                             tokenizer: str | os.PathLike | None = None) -> Path:
    """A layout-independent checkpoint of whole fp32 weights (no optimizer): loads under any TP/PP/DP/ZeRO layout.
    `weights` may also hold persistent buffers (routing controllers) by name; loading restores them."""
    from .config import save_config

    out = Path(out)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _torch_save({k: v.float().contiguous() for k, v in weights.items()}, tmp / WEIGHTS_FILE)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "weights", **asdict(Progress()),
            "time": time.time(), "vocab_size": vocab_size,
            "params": {k: {"shape": list(v.shape), "partition_dim": None, "stride": 1} for k, v in weights.items()}}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    save_config(cfg, tmp / "config.yaml")
    if tokenizer and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    _write_manifest(tmp, _checksums(tmp, _listing(tmp)), True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# -- stopping on a signal ----------------------------------------------------------------------------------------
class StopSignals:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit) request a stop.

    The handler only records the signal; `requested()` is called at step boundaries and agrees across all ranks
    (a max all-reduce), so every rank saves the same step and exits together even if only one got the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self) -> int | None:
        """The signal number if any rank got one (collective), else None."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


class Preempted(SystemExit):
    """Raised by `train()` after a signal-triggered save: the process exits with EXIT_PREEMPTED."""

    def __init__(self, signum: int, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.signum, self.step = signum, step
