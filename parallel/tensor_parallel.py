"""Whole tensors from tensor-parallel shards, using the layout megatron-core records on each parameter; megatron's
region functions with the TP group passed."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp


def tp_layout(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition dim, stride) of a TP-sharded parameter, None for a replicated one."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def gather_tp(shard: torch.Tensor, dim: int, stride: int = 1, group=None) -> torch.Tensor:
    """Undo megatron's strided split: each rank holds `stride` chunks, chunk j of rank r is global chunk j*tp + r."""
    group = group or ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return shard.clone()
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return join_tp(parts, dim, stride)


def join_tp(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Whole tensor from TP shards split megatron-style (rank r holds chunks j*tp + r of `stride` chunks)."""
    chunks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def split_tp(full: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard of a whole tensor (the inverse of `join_tp`)."""
    chunks = full.chunk(stride * tp, dim=dim)
    return torch.cat([chunks[j * tp + rank] for j in range(stride)], dim=dim).contiguous()


def full_tensor(param: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
    """The unsharded form of `value` (default: the parameter itself) laid out like `param`."""
    value = param.detach() if value is None else value
    layout = tp_layout(param)
    return value.clone() if layout is None else gather_tp(value, *layout)


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, gradient summed over TP backward (megatron's, with the TP group passed: without one,
    megatron-core (0.16.1) looks the group up and issues a deprecation warning on every call)."""
    return mtp.copy_to_tensor_model_parallel_region(x, ps.get_tensor_model_parallel_group())


def reduce_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Sum over TP forward, identity backward (megatron's, with the TP group passed)."""
    return mtp.reduce_from_tensor_model_parallel_region(x, ps.get_tensor_model_parallel_group())
