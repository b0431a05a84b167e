"""Saving and loading a training checkpoint: the orchestration over the other modules of this package.

A checkpoint is a directory `<checkpoint.dir>/step########/` holding

    DeepSpeed's own shards   model states per TP rank, ZeRO optimizer states per (DP, TP) rank, LR scheduler
    rank#####.pt             per-rank state: RNG streams (python, numpy, torch, cuda) and `extra` stateful objects
    trainer.json             format version, step, consumed samples/tokens, the layout it was saved with, every
                             parameter's parallel layout (full shape, TP partition dim and stride, vocab padding)
                             and the optimizer's parameter groups by name
    config.yaml, tokenizer.json
    manifest.json            written last: size and sha256 of every other file

Resume: when the layout (TP, PP, DP, ZeRO stage, precision) is unchanged, DeepSpeed loads its own shards (exact,
bitwise). Otherwise the checkpoint is *resharded* (see reshard.py).

The data position is the number of consumed samples of the loader's global stream (see `training/loader.py`), so it
survives a change of DP size.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch

from .background import BackgroundSaves
from .collective import _agreed, _barrier, _gather, _rank_world
from .deepspeed_format import _deepspeed_writes, _read_through_load_file
from .errors import CheckpointError
from .files import (FORMAT, FORMAT_VERSION, LATEST, MANIFEST, TMP_PREFIX, _checksums, _fsync, _listing, _load,
                    _problems, _publish, _sha256, _torch_save, _update_latest, _write_failure, _write_manifest,
                    _writing, apply_retention)
from ..memory import large_blocks_returned
from .locate import resolve_checkpoint, resumable
from .meta import META, Progress, _precision, check_compatible, model_meta, read_meta, same_layout, step_tag
from .read_ahead import default_bucket_bytes
from .reshard import _gpt_names, apply_full_state, read_full_state
from .rng import rng_state, set_rng_state
from .staging import nonfinite_entries
from .weights_only import _load_weights_file


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


# -- save -------------------------------------------------------------------------------------------------------
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
         tokenizer: str | os.PathLike | None = None, health: dict | None = None,
         background: BackgroundSaves | None = None) -> Path:
    """Save a checkpoint of `progress.step` atomically, update `latest`, apply retention; its final path. Collective.
    Refuses (CheckpointError, nothing published) when a weight or optimizer tensor is non-finite
    (`checkpoint.check_finite`). `health` (the trainer's skipped-step counters) goes into trainer.json, so resume can
    avoid a diverging one.

    `background` (checkpoint.async_save): first waits for the save in flight (raising its error); then the step pays
    only for host snapshots of this rank's state, and writing, fsync, checksums, the finite check and the publish run
    on `background`'s thread. The checkpoint is published when `background.wait()` returns."""
    if background is not None:
        background.wait()
    elif cfg.checkpoint.check_finite:
        bad = nonfinite_state(engine)
        if bad:
            raise CheckpointError(_nonfinite_refusal(progress.step, bad))
    root = cfg.checkpoint_dir
    tag = step_tag(progress.step)
    tmp, final = root / f"{TMP_PREFIX}{tag}", root / tag
    if layout.is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    stage = background.staging.snapshot if background is not None else None
    with _deepspeed_writes(engine, stage) as files:
        try:
            engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": progress.step}, save_latest=False)
        except OSError as err:  # a file DeepSpeed writes itself: its recovery scripts, beside the checkpoints
            raise _write_failure(Path(err.filename2 or err.filename or tmp), err) from err
    rank_state = {"rng": rng_state(), "extra": {k: v.state_dict() for k, v in (extra or {}).items()}}
    files.append((tmp / _rank_file(layout.rank), stage(rank_state) if stage else rank_state, _torch_save))
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": "training", **asdict(progress),
        "time": time.time(), "vocab_size": vocab_size, "health": health or {},
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size,
                   "zero_stage": engine.zero_optimization_stage(), "precision": _precision(engine)},
        **model_meta(engine, layout.tp, vocab_size),
    }
    if layout.is_writer:  # small files, written at once
        from ..config import save_config

        with _writing(tmp / META):
            (tmp / META).write_text(json.dumps(meta, indent=1))
        with _writing(tmp / "config.yaml"):
            save_config(cfg, tmp / "config.yaml")
        if tokenizer and Path(tokenizer).is_file():
            with _writing(tmp / "tokenizer.json"):
                shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    job = functools.partial(_write_and_publish, tmp, final, files, progress.step, layout.rank, layout.is_writer,
                            cfg.checkpoint.keep, cfg.checkpoint.keep_every,
                            background is not None and cfg.checkpoint.check_finite)
    if background is None:
        job(None)
    else:
        background.submit(progress.step, job)
    return final


def _nonfinite_refusal(step: int, bad: list[str]) -> str:
    return (f"not saving step {step}: non-finite values in {', '.join(bad[:8])}"
            f"{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}; the previous checkpoint stays `latest`")


def _write_and_publish(tmp: Path, final: Path, files: list, step: int, rank: int, is_writer: bool, keep: int,
                       keep_every: int, check_finite: bool, group) -> None:
    """Write this rank's pending files (`(path, state, write)`; state None: already written) and fsync them, hash
    them, agree with every rank on the outcome over `group`, then rank 0 writes the manifest, publishes and applies
    retention. Every rank raises the same CheckpointError if any rank's part failed. Collective over `group`."""
    from .. import faults

    failure, sums = None, {}
    try:
        bad = [entry for path, state, _ in files if state is not None
               for entry in nonfinite_entries(state, f"{path.name} (rank {rank})")] if check_finite else []
        if bad:
            raise CheckpointError(_nonfinite_refusal(step, bad))
        for path, state, write in files:
            with _writing(path):
                if state is not None:
                    write(state, path)
                _fsync(path)
        faults.fire("save", step, rank)
        sums = {str(path.resolve().relative_to(tmp.resolve())): {"size": path.stat().st_size, "sha256": _sha256(path)}
                for path, _, _ in files}
    except CheckpointError as err:
        failure = str(err)
    except Exception as err:  # anything else still reaches every rank, which would otherwise wait in the gather
        failure = f"saving step {step} failed on rank {rank}: {type(err).__name__}: {err}; nothing was published"
    reports = _gather((failure, sums), group)  # outside `_writing`: a dead peer is not a disk problem
    failures = [f for f, _ in reports if f]
    if failures:
        raise CheckpointError(failures[0])
    refusal = None
    if is_writer:
        try:
            _publish_checkpoint(tmp, final, {n: s for _, part in reports for n, s in part.items()}, keep, keep_every)
        except (CheckpointError, OSError) as err:
            refusal = str(err)
    refusal = _gather(refusal, group)[0]
    if refusal:
        raise CheckpointError(refusal)


def _publish_checkpoint(tmp: Path, final: Path, sums: dict, keep: int, keep_every: int) -> None:
    """Rank 0, once every rank's files are written: the manifest (the small files rank 0 wrote at once are hashed
    here), the directory rename, `latest`, retention."""
    listing = _listing(tmp)
    lost = sorted(set(sums) - set(listing))
    if lost:
        raise CheckpointError(f"{tmp}: {', '.join(lost)} written but not there; nothing was published")
    sums.update(_checksums(tmp, [n for n in listing if n not in sums], collective=False))
    with _writing(tmp / MANIFEST):
        _write_manifest(tmp, sums, True)
    _publish(tmp, final)
    _update_latest(final.parent, final.name)
    apply_retention(final.parent, keep, keep_every)


# -- resume -----------------------------------------------------------------------------------------------------
def resume_candidates(cfg, log=print) -> Iterable[Path]:
    """The checkpoints resume tries for `cfg.resume`, in order (see `resumable`; each verified when it is reached):
    none for `none` or an empty checkpoint directory, one for an explicit checkpoint directory. Collective
    (verification)."""
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


def load(engine, cfg, layout, path: Path, vocab_size: int, extra: dict | None = None, log=print) -> Progress:
    """Restore weights, optimizer, scheduler, RNG, `extra` and the progress from `path`. Collective."""
    # resharding's transient whole tensors go back to the system when freed; a CPU step's buffers are kept after
    with large_blocks_returned(reuse_after=layout.device.type == "cpu" and cfg.train.cpu_heap == "reuse"):
        return _load_checkpoint(engine, cfg, layout, path, vocab_size, extra or {}, log)


def _load_checkpoint(engine, cfg, layout, path: Path, vocab_size: int, extra: dict, log) -> Progress:
    meta = read_meta(path)
    check_compatible(path, meta, cfg, vocab_size)
    trust, bucket = cfg.checkpoint.trust_pickle, _reshard_bucket_bytes(cfg)
    if meta.get("kind") == "weights":  # from `skiptron-convert from-hf` and other tools: weights, a fresh optimizer
        weights = _load_weights_file(path, trust)
        apply_full_state(engine, weights, None, 0, bucket)
        _apply_buffers(engine, weights)
        return Progress()
    if same_layout(meta, layout, engine):
        _read_through_load_file(engine, trust)
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
    else:
        s = meta["layout"]
        if layout.is_writer and log:
            log(f"resharding {path}: saved with tp={s['tp']} pp={s['pp']} dp={s['dp']} zero={s['zero_stage']} "
                f"{s['precision']}, loading with tp={layout.tp} pp={layout.pp} dp={layout.dp} "
                f"zero={engine.zero_optimization_stage()}")
        weights, moments, opt_step, extras = read_full_state(path, meta=meta, trust=trust)
        apply_full_state(engine, weights, moments, opt_step, bucket)
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(extras["lr_scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):  # the LR of the next step
            group["lr"] = lr
        engine.global_steps = extras["global_steps"]
        engine.global_samples = extras["global_samples"]
        engine.skipped_steps = extras["skipped_steps"]
        engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
        _apply_buffers(engine, extras["buffers"])
    _agreed(lambda: _load_rank_state(path, meta, layout, extra, trust))
    return Progress(meta["step"], meta["consumed_samples"], meta["consumed_tokens"], meta.get("consumed_by_source", {}))


def _reshard_bucket_bytes(cfg) -> int:
    if cfg.checkpoint.reshard_bucket_mb is not None:
        return cfg.checkpoint.reshard_bucket_mb * 2**20
    from skiptron.parallel import launch

    return default_bucket_bytes(launch.current().local_world_size)


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
