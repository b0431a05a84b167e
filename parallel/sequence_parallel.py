"""Megatron-style sequence parallelism for batch-first activations [b, s, d], sharded along the sequence (dim 1).

Outside the tensor-parallel regions (norms, residual stream) each TP rank holds s / tp tokens; a column-parallel
region starts with `gather_from_sequence` (all-gather; its backward reduce-scatters, which replaces the linear's own
input-gradient all-reduce) and a row-parallel region ends with `reduce_scatter_to_sequence` (instead of the
all-reduce). megatron-core's own helpers shard dim 0 of sequence-first tensors, hence these.

NCCL runs the single-tensor collectives (`reduce_scatter_tensor` / `all_gather_into_tensor`, `*_single` in recent
torch). Other backends (gloo on CPU) get an exact emulation that every torch version's gloo has:
reduce-scatter as an all-reduce keeping this rank's slice (about twice the traffic), all-gather into a list then cat.
The numbers are the same; tests run the NCCL code path on gloo too where its gloo has those collectives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .state import all_gather_tensor

SEQ_DIM = 1
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _group():
    return ps.get_tensor_model_parallel_group()


def _native(group) -> bool:
    return "nccl" in dist.get_backend(group)


def _check_divisible(x: torch.Tensor, world: int) -> None:
    if x.shape[SEQ_DIM] % world:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[SEQ_DIM]} is not divisible by the "
                         f"tensor-parallel size {world} (parallel.tp)")


def _shard(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    _check_divisible(x, world)
    return x.chunk(world, dim=SEQ_DIM)[rank].contiguous()


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if _native(group):
        out = x.new_empty((world * x.shape[SEQ_DIM],) + x.shape[:SEQ_DIM] + x.shape[SEQ_DIM + 1:])
        all_gather_tensor(out, x.movedim(SEQ_DIM, 0).contiguous(), group=group)
        return out.movedim(0, SEQ_DIM).contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if _native(group):
        _check_divisible(x, world)
        full = x.movedim(SEQ_DIM, 0).contiguous()
        out = full.new_empty((full.shape[0] // world,) + full.shape[1:])
        _REDUCE_SCATTER(out, full, group=group)
        return out.movedim(0, SEQ_DIM).contiguous()
    summed = x.clone()
    dist.all_reduce(summed, group=group)
    return _shard(summed, world, dist.get_rank(group))


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather(x, _group())

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, _group())


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, _group())

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, _group())


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        group = _group()
        world = dist.get_world_size(group)
        return x if world == 1 else _shard(x, world, dist.get_rank(group))

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, _group())


def gather_from_sequence(x: torch.Tensor) -> torch.Tensor:
    """[b, s/tp, d] -> [b, s, d] entering a column-parallel region: the gradient of the whole sequence arrives
    partial on each rank (every rank's output columns contribute), so the backward sums it and keeps this rank's
    tokens (reduce-scatter). The linear that follows must not all-reduce its input gradient as well."""
    return _GatherFromSequence.apply(x)


def reduce_scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """[b, s, d] partial sums leaving a row-parallel region -> this rank's [b, s/tp, d] of their sum."""
    return _ReduceScatterToSequence.apply(x)


def scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """[b, s, d] (the same on every TP rank) -> this rank's [b, s/tp, d]; the backward all-gathers."""
    return _ScatterToSequence.apply(x)


def sum_grad_over_tp(param: torch.nn.Parameter) -> None:
    """A replicated parameter used on the sequence shard only (norm gains, row-parallel biases) gets a partial
    gradient on each TP rank: sum it over TP once, as its gradient is formed (before DeepSpeed's DP reduction and
    ZeRO's partitioning see it). Flagged `sequence_parallel` like megatron's, as a marker only (nothing here
    reduces flagged parameters again)."""
    param.sequence_parallel = True

    def hook(grad: torch.Tensor) -> torch.Tensor:
        group = _group()
        if dist.get_world_size(group) == 1:
            return grad
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(hook)
