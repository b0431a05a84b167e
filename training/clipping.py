"""Gradient clipping in the one path where DeepSpeed hands it to the client optimizer: ZeRO stage 0 in fp32.

There DeepSpeed 0.19.8's engine clips with `deepspeed.runtime.utils.clip_grad_norm_` and reports no norm:
`engine.get_global_grad_norm()` is None, so a single-GPU run (where ZeRO 1-2 run as stage 0, training/engine.py)
logged no gradient norm. Here the optimizer step computes the norm as DeepSpeed's ZeRO optimizers do (each
tensor-parallel shard once, pipeline-tied copies once, summed over the model-parallel group), clips with torch's
foreach kernels (no all-reduce over DP of a norm every DP rank already has) and hands the norm to the engine the
way those optimizers do.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate


def owns_clipping(max_norm: float, stage: int, precision: str) -> bool:
    """Whether the optimizer step clips (the engine then gets `gradient_clipping: 0`): the cases in which
    DeepSpeed's engine would call its own `clip_fp32_gradients`."""
    return max_norm > 0 and stage == 0 and precision == "fp32"


def counted_in_norm(param: torch.nn.Parameter) -> bool:
    """A gradient that belongs to the global norm once: not a copy of a tensor-parallel rank 0's replica, and not a
    pipeline stage's copy of a tied weight (DeepSpeed's `PipelineModule` marks those `ds_pipe_replicated`)."""
    return param_is_not_tensor_parallel_duplicate(param) and not getattr(param, "ds_pipe_replicated", False)


def global_grad_norm(params: list[torch.nn.Parameter], model_parallel_group, device: torch.device) -> torch.Tensor:
    """L2 norm of all gradients of the model (a 0-dim fp32 tensor on `device`, the same on every rank of the
    model-parallel group; non-finite when any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None and counted_in_norm(p)]
    local = (torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).float() if grads
             else torch.zeros((), dtype=torch.float32, device=device))
    if model_parallel_group is None or dist.get_world_size(model_parallel_group) == 1:
        return local
    squares = local.square()
    dist.all_reduce(squares, group=model_parallel_group)
    return squares.sqrt()


def clip_in_step(optimizer: torch.optim.Optimizer, max_norm: float, model_parallel_group,
                 device: torch.device) -> None:
    """Make `optimizer.step()` clip its gradients to `max_norm` first (an instance attribute, as the step guard's
    gate and torch's LR schedulers patch it). The step's norm goes to `optimizer._global_grad_norm`, which
    DeepSpeed's engine copies after every step for `get_global_grad_norm()` (checked with deepspeed 0.19.8)."""
    inner_step = optimizer.step

    def clipped_step(opt, *args, **kwargs):
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = global_grad_norm(params, model_parallel_group, device)
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm,
                                             foreach=True)
        opt._global_grad_norm = norm
        return inner_step(*args, **kwargs)

    optimizer.step = types.MethodType(clipped_step, optimizer)
