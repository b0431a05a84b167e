"""The collectives a checkpoint needs (gather, agree on a failure, barrier); each is a no-op without a group."""
from __future__ import annotations

import torch.distributed as dist

from .errors import CheckpointError, UntrustedCheckpointError


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
