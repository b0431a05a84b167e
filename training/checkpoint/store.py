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

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .collective import _agreed, _barrier, _gather, _rank_world
from .deepspeed_format import _name_write_errors, _read_through_load_file
from .errors import CheckpointError
from .files import (FORMAT, FORMAT_VERSION, LATEST, MANIFEST, TMP_PREFIX, _checksums, _listing, _load, _problems,
                    _publish, _torch_save, _update_latest, _write_manifest, _writing, apply_retention)
from .locate import resolve_checkpoint, resumable
from .meta import META, Progress, _precision, check_compatible, model_meta, read_meta, same_layout, step_tag
from .reshard import _gpt_names, apply_full_state, read_full_state
from .rng import rng_state, set_rng_state
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
         tokenizer: str | os.PathLike | None = None, health: dict | None = None) -> Path:
    """Save a checkpoint of `progress.step` atomically, update `latest`, apply retention. Collective. Refuses
    (CheckpointError, nothing written) when a weight or optimizer tensor is non-finite (`checkpoint.check_finite`).
    `health` (the trainer's skipped-step counters) goes into trainer.json, so resume can avoid a diverging one."""
    from .. import faults

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
        from ..config import save_config

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
