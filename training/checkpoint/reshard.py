"""Resharding: DeepSpeed's shards of any layout <-> whole TP=1 tensors <-> this rank's shards of another layout.

`read_full_state` maps every parameter's fp32 master weight and Adam moments to whole TP=1 tensors from
DeepSpeed's files (using the layout recorded in trainer.json, never guessing), and `apply_full_state` cuts out this
rank's TP shard and hands it to DeepSpeed's ZeRO partitions. It streams: the files are memory-mapped, and a
parameter's whole tensors are assembled from views of them only when looked up, so a rank holds one parameter's
weight and moments at a time (plus the shard cut from them, and the shards read ahead within
`checkpoint.reshard_bucket_mb`), whatever the model's size. Pipeline checkpoints record
their parameters under GPT's names too (trainer.json's `pipeline` maps them to each stage's files: DeepSpeed's
per-layer weight files and per-(stage, TP rank) optimizer files), so a checkpoint moves between any PP sizes, PP = 1
included, the same way; the tied embedding's first-stage copy is the one read. We write the resharding rather than
use DeepSpeed's universal checkpoint because the latter needs name patterns for megatron's strided QKV / gate-up
splits and does not cover ZeRO-3 reliably; here the per-parameter layout is exact.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from skiptron.parallel.tensor_parallel import join_tp, split_tp, tp_layout

from .deepspeed_format import ADAM_KEYS, ShardSource, _index_tp_rank
from .errors import CheckpointError
from .meta import read_meta
from .read_ahead import read_ahead
from .weights_only import _load_weights_file


class StreamedTensors(Mapping):
    """GPT name -> whole TP=1 fp32 tensor (or, for several `fields`, {field: tensor}), joined from every TP rank's
    shard when looked up and not kept; `pop` forgets a name, for a consumer that walks the model once."""

    def __init__(self, path: Path, params: dict, per_rank: list[dict[str, ShardSource]], fields: tuple[str, ...]):
        self.path, self.params, self.per_rank, self.fields = path, params, per_rank, fields
        self.names = [n for n in params if all(k in per_rank[0][n].pieces for k in fields)]

    def _whole(self, name: str, key: str) -> torch.Tensor:
        info = self.params[name]
        parts = [rank[name].read(key) for rank in self.per_rank]
        dim = info["partition_dim"]
        whole = parts[0] if dim is None else join_tp(parts, dim, info["stride"])
        if list(whole.shape) != info["shape"]:
            raise CheckpointError(f"{self.path}: {name} ({key}) rebuilt with shape {list(whole.shape)}, "
                                  f"trainer.json says {info['shape']}")
        return whole

    def __getitem__(self, name: str):
        if name not in self.names:
            raise KeyError(name)
        if len(self.fields) == 1:
            return self._whole(name, self.fields[0])
        return {k: self._whole(name, k) for k in self.fields}

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.names))

    def __len__(self) -> int:
        return len(self.names)

    def pop(self, name: str):
        value = self[name]
        self.names.remove(name)
        return value


def read_full_state(path: str | os.PathLike, meta: dict | None = None, with_optimizer: bool = True,
                    trust: bool = False):
    """Whole (TP=1, unpartitioned) fp32 weights and Adam moments from a checkpoint of any layout, streamed.

    Returns (weights {name: tensor}, moments {name: {exp_avg, exp_avg_sq}} or None, optimizer step, extras) where
    the two mappings read a parameter when it is looked up (`StreamedTensors`) and extras holds the LR scheduler
    state, DeepSpeed's step/sample counters and the persistent buffers."""
    path = Path(path)
    meta = meta or read_meta(path)
    if meta.get("kind") == "weights":
        return _load_weights_file(path, trust), None, 0, {}
    tp, pp = meta["layout"]["tp"], meta["layout"].get("pp", 1)
    per_rank, opt_step, stage_models = [], 0, [None] * pp  # stage_models: TP rank 0's model-states files
    for t in range(tp):
        local = {}
        for s in reversed(range(pp)):  # the first stage's copy of a tied embedding is the one kept
            part, model, opt_step = _index_tp_rank(path, meta, t, with_optimizer, s, trust)
            local.update(part)
            if t == 0:
                stage_models[s] = model
        per_rank.append(local)
    for name in meta["params"]:
        missing = [t for t in range(tp) if name not in per_rank[t]]
        if missing:
            raise CheckpointError(f"{path}: parameter {name} is missing from the shards of TP rank(s) {missing}")
    weights = StreamedTensors(path, meta["params"], per_rank, ("param",))
    moments = StreamedTensors(path, meta["params"], per_rank, ADAM_KEYS) if with_optimizer else None
    first_model = stage_models[0]
    extras = {k: first_model.get(k) for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}
    extras["buffers"] = {k: v.clone() for model in stage_models for k, v in model["module"].items()
                         if torch.is_tensor(v) and k not in meta["params"]}
    return weights, moments, opt_step, extras


@torch.no_grad()
def apply_full_state(engine, weights: Mapping, moments: Mapping | None, opt_step: int, bucket_bytes: int = 0) -> None:
    """Load whole tensors into this rank's shards of the model, fp32 masters and (if given) Adam moments.

    The next parameters' shards are read and cut in a background thread while this one is applied, holding at most
    `bucket_bytes` of them (`read_ahead`; 0 reads each parameter when it is applied)."""
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
    plan = [(to_gpt(local_name), p) for local_name, p in engine.module.named_parameters()]
    for name, _ in plan:
        if name not in weights:
            raise CheckpointError(f"the checkpoint has no weight for parameter {name}")

    def shards(item):  # this rank's fp32 shards of the weight and moments (runs in the read-ahead thread)
        name, p = item
        layout = tp_layout(p)

        def shard(full):
            return full if layout is None else split_tp(full, layout[0], layout[1], tp, tp_rank)
        weight = shard(weights[name])
        if moments is None:
            return weight, None
        whole = moments[name]
        return weight, {k: shard(whole.pop(k)) for k in ADAM_KEYS}

    def nbytes(item):
        p = item[1]
        return 4 * getattr(p, "ds_numel", p.numel()) * (1 if moments is None else 1 + len(ADAM_KEYS))

    masters = _fp16_optimizer_masters(engine)
    for (name, p), (value, moment_shards) in zip(plan, read_ahead(plan, shards, nbytes, bucket_bytes)):
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
        for k, v in (moment_shards or {}).items():
            if sharded_optimizer:
                safe_set_full_optimizer_state(p, v.float(), k)
            else:
                _optimizer_state_of(base, master, k).copy_(v.view_as(master))
        del value, moment_shards  # before the next parameter is taken: the bound counts one in the caller's hands


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


def _gpt_names(module: torch.nn.Module):
    """Parameter/buffer name in `module` -> the checkpoint's (GPT's) name; they differ only on pipeline stages."""
    from deepspeed.pipe import PipelineModule

    return module.gpt_name if isinstance(module, PipelineModule) else (lambda name: name)
