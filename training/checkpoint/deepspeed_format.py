"""DeepSpeed's side of a checkpoint: where its shards live, how to read them, and the hooks on its checkpoint engine.

What is read here is DeepSpeed's private file layout (file names, ZeRO partitions, stage-0 masters, pipeline
per-layer files); each piece names the DeepSpeed version it was checked against (0.19.8).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import NamedTuple

import torch

from ..memory import release_file_pages
from .errors import CheckpointError
from .files import _load, _writing, load_file

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _read_through_load_file(engine, trust: bool) -> None:
    """DeepSpeed 0.19.8's TorchCheckpointEngine.load calls torch.load(weights_only=False), and every file
    `engine.load_checkpoint` reads (model states, ZeRO optimizer states, a pipeline's per-layer files) goes through
    `engine.checkpoint_engine.load(path, map_location)`: route those reads through `load_file`."""
    reader = engine.checkpoint_engine

    def load(path, map_location=None):
        return load_file(path, map_location=map_location, trust=trust)

    reader.load = load


@contextlib.contextmanager
def _deepspeed_writes(engine, stage=None):
    """Route the files `engine.save_checkpoint` writes (model states, ZeRO optimizer states, a pipeline's per-layer
    files) through `engine.checkpoint_engine.save(state_dict, path)`, which DeepSpeed 0.19.8 calls for every one of
    them. Yields the list of `(path, state, write)` this rank's DeepSpeed wrote or was asked to write:

    - `stage=None` (a synchronous save): each file is written at once, a failed write named by `_writing`;
      `state` is None.
    - `stage` (a callable returning a host snapshot, see staging.py): nothing is written; `state` is the snapshot
      and `write(state, path)` writes it later as DeepSpeed would have (its serialization settings)."""
    writer = engine.checkpoint_engine
    original = writer.save
    files: list[tuple[Path, object, object]] = []

    def save(state_dict, path):
        if stage is None:
            with _writing(Path(path)):
                original(state_dict, path)
            files.append((Path(path), None, original))
        else:
            files.append((Path(path), stage(state_dict), original))

    writer.save = save
    try:
        yield files
    finally:
        writer.save = original


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


def _stage_module_state(path: Path, pipe: dict, stage: int, tp_rank: int, trust: bool = False) -> dict[str, torch.Tensor]:
    """A pipeline stage's weights and buffers (this TP rank's shards) under GPT's names, from DeepSpeed's per-layer
    files `layer_<index>-model_<tp rank>-model_states.pt` (memory-mapped)."""
    out = {}
    for idx in range(pipe["parts"][stage], pipe["parts"][stage + 1]):
        name = pipe["layers"][idx]
        if name is not None:  # None: the tied output layer, whose weight is the embedding's (first stage)
            state = _load(path / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt", trust, mmap=True)
            out.update({f"{name}.{k.removeprefix('layer.')}": v for k, v in state.items()})
    return out


class ShardSource(NamedTuple):
    """Where one (stage, TP rank)'s shard of a parameter lies: its shape, and for each of "param", "exp_avg",
    "exp_avg_sq" the pieces (views of memory-mapped files, in order; one per DP rank under ZeRO) whose
    concatenation, cut to the shape's size, is the shard."""
    shape: torch.Size
    pieces: dict[str, list[torch.Tensor]]

    def read(self, key: str) -> torch.Tensor:
        """The shard of `key` as a new fp32 tensor: the only copy reading makes. The mapped pages it was read from
        leave this process's RSS (they stay in the page cache), so a whole checkpoint streamed through never becomes
        resident in every rank."""
        shard = torch.cat(self.pieces[key])[: self.shape.numel()].view(self.shape).float()
        release_file_pages(self.pieces[key])
        return shard


def _index_tp_rank(path: Path, meta: dict, tp_rank: int, with_optimizer: bool, pp_rank: int = 0,
                   trust: bool = False):
    """One (pipeline stage, TP rank)'s parameters {GPT name: ShardSource} over its DeepSpeed files, memory-mapped,
    so nothing is read until a shard is; its model-states file with `module` holding its weights and buffers under
    GPT's names; and the optimizer step."""
    lay = meta["layout"]
    stage, dp = lay["zero_stage"], lay["dp"]
    pipe = meta.get("pipeline")
    mp_rank = pp_rank * lay["tp"] + tp_rank
    model = _load(_model_file(path, stage, mp_rank), trust, mmap=True)
    if pipe:
        from ..pipeline import gpt_name

        def rename(name):
            return gpt_name(name, pipe["layers"])
        model["module"] = _stage_module_state(path, pipe, pp_rank, tp_rank, trust)
        groups = pipe["optimizer_groups"][pp_rank]
    else:
        def rename(name):
            return name
        groups = meta["optimizer_groups"]
    keys = ("param",) + (ADAM_KEYS if with_optimizer else ())
    out: dict[str, ShardSource] = {}
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
            pieces = {"param": [weight.reshape(-1)]}
            if with_optimizer and i in state:
                pieces.update({k: [state[i][k].reshape(-1)] for k in ADAM_KEYS})
            out[rename(name)] = ShardSource(weight.shape, pieces)
        return out, model, _opt_step(state)
    shapes = [(n, torch.Size(s)) for group in model["param_shapes"] for n, s in group.items()]
    pieces = {n: {k: [] for k in keys} for n, _ in shapes}
    opt_step = 0
    for d in range(dp):
        osd = _load(_optim_file(path, d, mp_rank, lay["precision"]), trust, mmap=True)["optimizer_state_dict"]
        if stage == 3:
            state = osd["optimizer_state_dict"]["state"]
            flat = {"param": osd["fp32_flat_groups"]}
            if with_optimizer:
                flat.update({k: [state[g][k] for g in sorted(state)] for k in ADAM_KEYS})
            offset = 0
            for name, shape in shapes:
                part = math.ceil(shape.numel() / dp)
                for k in keys:
                    pieces[name][k] += _chained_views(flat[k], offset, part)
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
        out[rename(name)] = ShardSource(shape, pieces[name])
    return out, model, opt_step


def _chained_views(tensors: list[torch.Tensor], offset: int, length: int) -> list[torch.Tensor]:
    """Views of elements [offset, offset + length) of the tensors laid end to end (ZeRO-3 numbers a rank's
    partition across its flat groups), without concatenating them."""
    views = []
    for t in tensors:
        if length == 0:
            break
        t = t.reshape(-1)
        if offset < t.numel():
            n = min(length, t.numel() - offset)
            views.append(t.narrow(0, offset, n))
            length, offset = length - n, 0
        else:
            offset -= t.numel()
    if length:
        raise CheckpointError(f"a ZeRO-3 partition ends {length} elements short of its parameters")
    return views


def _opt_step(state: dict) -> int:
    for entry in state.values():
        return int(entry["step"])
    return 0
