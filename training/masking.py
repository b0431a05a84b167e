"""Finetuning a pretrained checkpoint: full, or by learned binary masks over frozen weights.

Mask finetuning ("Masking as an Efficient Alternative to Finetuning for Pretrained Language Models", Zhao et al.,
EMNLP 2020): every selected weight matrix W keeps its pretrained values, frozen, and gets a real-valued score matrix
S of the same shape. The forward pass uses W * M with the hard binary mask M = (S >= threshold); the backward pass
treats the thresholding as the identity (straight-through), so dL/dS = dL/d(W * M) * W. Only the scores (and, if
chosen, the head) are trainable, so DeepSpeed's optimizer and ZeRO partitions hold only them.

The masked layers stay the megatron-core `ColumnParallelLinear` / `RowParallelLinear` modules of `training/model.py`
(same names, same state-dict keys): `enable_mask` swaps the module's class for a subclass whose forward puts W * M in
place of W for the duration of the call, so megatron's own TP code path runs unchanged. The scores are parameters
`<layer>.mask_scores`, sharded like the weight (same partition dim and stride); their initial values are drawn
whole from a seeded generator and then sharded, so every TP layout starts from the same masks.

The task-specific result is small: `save_task_file` writes the masks bit-packed (1 bit per weight, TP=1 layout) plus
any trained head tensors into one safetensors file; `merge_task` applies it to a base checkpoint's whole weights
(W * M), and `load_task_file` loads it into a mask-mode model, either of which reproduces the finetuned model
exactly.

How it reaches the training loop: `Finetuning` is the trainer's extension (`Trainer.setup(cfg, extension=...)`,
which `skiptron-finetune train` passes; pretraining passes none). Right after the model is built, before DeepSpeed
wraps it, its `prepare_model` loads `finetune.base` (when set) and, for `finetune.method=mask`, freezes the weights
and adds the scores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from megatron.core import tensor_parallel as mtp
from torch import nn

from skiptron.parallel.tensor_parallel import full_tensor, split_tp, tp_layout

TASK_FORMAT = "skiptron-mask"
TASK_VERSION = 1
SCORES = "mask_scores"


# -- the masked layer ------------------------------------------------------------------------------------------
def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """W * (S >= threshold) in the forward; straight-through gradient dL/dS = dL/dW_eff * W (W gets none)."""
    hard = (scores >= threshold).to(weight.dtype)
    mask = hard + (scores - scores.detach()).to(weight.dtype)  # value: exactly `hard`; gradient: identity to S
    return weight.detach() * mask


class _MaskedLinear:
    """Mixin for megatron's parallel linears: the forward sees `weight * mask` in place of `weight`."""

    mask_threshold: float = 0.0

    def mask(self) -> torch.Tensor:
        """This rank's shard of the current hard mask (bool)."""
        return self.mask_scores.detach() >= self.mask_threshold

    def forward(self, *args, **kwargs):
        weight = self._parameters["weight"]
        self._parameters["weight"] = masked_weight(weight, self._parameters[SCORES], self.mask_threshold)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._parameters["weight"] = weight


_MASKED_CLASSES: dict[type, type] = {}


def _masked_class(cls: type) -> type:
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (_MaskedLinear, cls), {})
    return _MASKED_CLASSES[cls]


def is_masked(module: nn.Module) -> bool:
    return isinstance(module, _MaskedLinear)


def _copy_tp_attributes(src: torch.Tensor, dst: torch.Tensor) -> None:
    layout = tp_layout(src)
    if layout is None:
        return
    mtp.set_tensor_model_parallel_attributes(dst, True, layout[0], layout[1])


def _tp_rank_world() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return 0, 1


def _shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This TP rank's shard of a whole tensor, laid out like the parameter `like`."""
    layout = tp_layout(like)
    if layout is None:
        return full
    rank, world = _tp_rank_world()
    return split_tp(full, layout[0], layout[1], world, rank)


def _full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    layout = tp_layout(param)
    if layout is not None:
        shape[layout[0]] *= _tp_rank_world()[1]
    return shape


def initial_scores(shape, keep: float, threshold: float, scale: float, seed: int) -> torch.Tensor:
    """Whole initial scores: threshold + scale * (u - (1 - keep)), u ~ U(0, 1), so a fraction `keep` is kept."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=gen, dtype=torch.float32)
    return threshold + scale * (u - (1.0 - keep))


def enable_mask(layer: nn.Module, threshold: float, scores: torch.Tensor) -> None:
    """Turn a megatron parallel linear into a masked one with `scores` (this rank's shard) as trainable scores."""
    weight = layer.weight
    if scores.shape != weight.shape:
        raise ValueError(f"mask scores of shape {tuple(scores.shape)} for a weight shard of {tuple(weight.shape)}")
    weight.requires_grad_(False)
    param = nn.Parameter(scores.to(device=weight.device, dtype=weight.dtype).contiguous())
    _copy_tp_attributes(weight, param)
    layer.register_parameter(SCORES, param)
    layer.mask_threshold = float(threshold)
    layer.__class__ = _masked_class(type(layer))


def selected_layers(model: nn.Module, ft, num_layers: int) -> dict[str, nn.Module]:
    """name -> module of the linear layers `finetune.layers` x `finetune.matrices` select."""
    blocks = set(ft.masked_layers(num_layers))
    parallel = (mtp.ColumnParallelLinear, mtp.RowParallelLinear)
    out, seen = {}, set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not isinstance(module, parallel):
            continue
        if int(parts[1]) in blocks and parts[-1] in ft.matrices:
            out[name] = module
            seen.add(parts[-1])
    missing = sorted(set(ft.matrices) - seen)
    if missing:
        raise ValueError(f"finetune.matrices: {missing} name no linear layer in the selected blocks")
    return out


def apply_mask_finetuning(model: nn.Module, ft, num_layers: int) -> dict[str, nn.Module]:
    """Freeze every weight, add scores to the selected layers, unfreeze the head if `ft.train_head`."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = selected_layers(model, ft, num_layers)
    for i, (name, layer) in enumerate(sorted(layers.items())):
        full = initial_scores(_full_shape(layer.weight), ft.keep, ft.threshold, ft.init_scale, ft.seed * 100003 + i)
        enable_mask(layer, ft.threshold, _shard(full, layer.weight))
    if ft.train_head:
        head = getattr(model, "head", None)
        for p in head.parameters():
            p.requires_grad_(True)
    return layers


# -- base weights -----------------------------------------------------------------------------------------------
def read_base_weights(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """Whole fp32 weights of a checkpoint of any layout (a training or weights-only checkpoint; any form
    `checkpoint.resolve_checkpoint` takes), with its persistent buffers (routing controllers) under their names."""
    from . import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(path)
    ckpt.verify(path)
    weights, _, _, extras = ckpt.read_full_state(path, with_optimizer=False, trust=trust)
    weights = {**weights, **extras.get("buffers", {})}
    return {k: v.detach() for k, v in weights.items()}  # ZeRO's flat fp32 groups are saved as leaf tensors with grad


@torch.no_grad()
def load_whole_weights(model: nn.Module, weights: dict[str, torch.Tensor], strict_extra: bool = False) -> None:
    """Copy whole (TP=1) tensors into this rank's shards, and buffers found under their names. Every model parameter
    except the mask scores must be present. Call before DeepSpeed wraps the model."""
    missing = [n for n, _ in model.named_parameters() if n not in weights and not n.endswith(SCORES)]
    if missing:
        raise KeyError(f"the base checkpoint has no weight for {missing}")
    for name, p in model.named_parameters():
        if name in weights:
            p.copy_(_shard(weights[name], p).to(p.dtype))
    for name, b in model.named_buffers():
        if name in weights:
            b.copy_(weights[name])


def check_base_compatible(path: str | os.PathLike, cfg, vocab_size: int) -> None:
    from . import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(path)
    ckpt.check_compatible(path, ckpt.read_meta(path), cfg, vocab_size)


def prepare_model(model: nn.Module, cfg, vocab_size: int | None = None, log=None) -> nn.Module:
    """Load `finetune.base` into a freshly built model, then set up `finetune.method`."""
    from . import checkpoint as ckpt

    ft = cfg.finetune
    if ft.base:
        base = ckpt.resolve_checkpoint(ft.base)
        if vocab_size is not None:
            check_base_compatible(base, cfg, vocab_size)
        load_whole_weights(model, read_base_weights(base, trust=cfg.checkpoint.trust_pickle))
        if log:
            log(f"finetune: base weights from {ft.base}")
    if ft.method == "mask":
        layers = apply_mask_finetuning(model, ft, cfg.model.num_layers)
        if log:
            n_scores = sum(l.mask_scores.numel() for l in layers.values())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log(f"finetune: mask over {len(layers)} matrices ({n_scores} scores on this rank), "
                f"{trainable} trainable parameters on this rank")
    return model


class Finetuning:
    """The trainer extension (see `trainer.TrainerExtension`) that turns a training run into a finetuning run."""

    def prepare_model(self, model: nn.Module, cfg, vocab_size: int, log=None) -> None:
        prepare_model(model, cfg, vocab_size, log=log)


# -- the task file ----------------------------------------------------------------------------------------------
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor -> uint8 bytes, 8 entries per byte (little bit order, row-major)."""
    return torch.from_numpy(np.packbits(mask.flatten().cpu().numpy().astype(np.uint8), bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).view(*shape)


def _gathered(module: nn.Module):
    from .weights import _zero3_gathered

    return _zero3_gathered(list(module.parameters()))


@torch.no_grad()
def task_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The task-specific tensors: packed whole masks of every masked layer and the trainable non-score params (the
    trained head). Collective (TP gathers, ZeRO-3 gathers): call on every rank."""
    tensors, shapes, thresholds = {}, {}, {}
    with _gathered(model):
        for name, module in model.named_modules():
            if is_masked(module):
                full = full_tensor(module.mask_scores, module.mask().to(torch.uint8)).bool()
                tensors[f"{name}.mask"] = pack_mask(full)
                shapes[name] = list(full.shape)
                thresholds[name] = module.mask_threshold
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith(SCORES):
                tensors[name] = full_tensor(p).float().cpu().contiguous()
    return tensors, {"masks": shapes, "thresholds": thresholds}


def save_task_file(model: nn.Module, path: str | os.PathLike, cfg=None, base: str | None = None,
                   is_writer: bool = True) -> Path | None:
    """Write the masks (bit-packed) and trained head tensors to one safetensors file. Collective."""
    from safetensors.torch import save_file

    tensors, info = task_state(model)
    if not is_writer:
        return None
    meta = {"format": TASK_FORMAT, "version": TASK_VERSION, **info,
            "base": str(base or (cfg.finetune.base if cfg is not None else "") or ""),
            "finetune": cfg.finetune.model_dump(mode="json") if cfg is not None else {},
            "model": cfg.model.model_dump(mode="json") if cfg is not None else {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"skiptron": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_task_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(whole masks {layer: bool tensor}, other tensors {param name: tensor}) and the metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("skiptron", "{}"))
        if meta.get("format") != TASK_FORMAT:
            raise ValueError(f"{path} is not a {TASK_FORMAT} file")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    masks = {name: unpack_mask(raw.pop(f"{name}.mask"), shape) for name, shape in meta["masks"].items()}
    return {"masks": masks, "tensors": raw}, meta


def merge_task(weights: dict[str, torch.Tensor], task: dict) -> dict[str, torch.Tensor]:
    """Base whole weights + a task -> whole weights of the finetuned model (W * M; trained tensors replaced)."""
    out = dict(weights)
    for name, mask in task["masks"].items():
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = w * mask.to(w.dtype)
    for name, t in task["tensors"].items():
        out[name] = t.to(out[name].dtype) if name in out else t
    return out


@torch.no_grad()
def load_task_file(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load masks (as scores threshold +-1, which reproduce them exactly) and head tensors into a mask-mode model
    whose base weights are already loaded. Returns the file's metadata."""
    task, meta = read_task_file(path)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name, mask in task["masks"].items():
        layer = modules.get(name)
        if layer is None or not is_masked(layer):
            raise KeyError(f"{path}: {name} is not a masked layer of this model (finetune.method=mask?)")
        scores = layer.mask_threshold + (mask.float() * 2 - 1)
        layer.mask_scores.copy_(_shard(scores, layer.mask_scores).to(layer.mask_scores.dtype))
    for name, t in task["tensors"].items():
        params[name].copy_(_shard(t, params[name]).to(params[name].dtype))
    return meta


def mask_stats(model: nn.Module) -> dict[str, float]:
    """Kept fraction over this rank's masked weights."""
    kept = total = 0
    for module in model.modules():
        if is_masked(module):
            m = module.mask()
            kept += int(m.sum())
            total += m.numel()
    return {"mask/kept": kept / total} if total else {}
