"""Process groups: the world, and megatron-core's tensor/pipeline/data-parallel groups inside it.

megatron-core's `parallel_state` is the one owner of the groups; `MegatronMpu` hands the same groups to DeepSpeed,
so ZeRO partitions over the data-parallel group and gradient norms count tensor-parallel shards once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from . import extensions, launch


@dataclass(frozen=True)
class Layout:
    """This rank's place in the (tp, pp, dp) grid."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def launch_world_size() -> int:
    """The world size the launcher announced (torchrun, SLURM, MPI), known before any process group exists."""
    return launch.current().world_size


def pick_device(backend: str) -> tuple[torch.device, str]:
    local_rank = launch.current().local_rank
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    if backend == "nccl":
        raise RuntimeError("parallel.backend: nccl was asked for but no CUDA device is available")
    return torch.device("cpu"), "gloo"


def init_world(backend: str = "auto", timeout_s: int = 600, rendezvous_timeout_s: int = 300) -> tuple[torch.device, str]:
    """Create the default process group for whichever launcher started us (see `parallel/launch.py`); a rank that
    never arrives fails every rank within `rendezvous_timeout_s`, naming it."""
    device, backend = pick_device(backend)
    if not dist.is_initialized():
        launch.init_process_group(backend, timeout_s, rendezvous_timeout_s)
    if device.type == "cpu":
        extensions.load_deepspeed_comm_op()  # before DeepSpeed's comm backend builds it without a safe lock
    return device, backend


def init_model_parallel(tp: int, pp: int, device: torch.device) -> Layout:
    """(Re)build megatron-core's groups for a (tp, pp) layout; DP is what is left of the world."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    destroy_subgroups()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return Layout(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp=tp,
        pp=pp,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
    )


def destroy_subgroups() -> None:
    """Destroy every process group but the world: megatron-core's `destroy_model_parallel` and DeepSpeed's engines
    only drop their references, and each gloo group keeps its threads, so a process that changes layouts (tests,
    benchmarks) would pile up thousands of them."""
    from torch.distributed import distributed_c10d as c10d

    world = c10d._get_default_group() if dist.is_initialized() else None
    for group in list(getattr(getattr(c10d, "_world", None), "pg_map", {})):
        if group is not world:
            dist.destroy_process_group(group)


def shutdown() -> None:
    """Tear the groups down; gloo aborts at interpreter exit otherwise."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def dp_group():
    return ps.get_data_parallel_group()


def dp_group_or_none():
    """The data-parallel group when groups exist (None in a plain single-process use of a model)."""
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        return ps.get_data_parallel_group()
    return None


def tp_group():
    return ps.get_tensor_model_parallel_group()


def pp_group():
    return ps.get_pipeline_model_parallel_group()


def model_parallel_group():
    """The ranks that hold one copy of the model between them (TP x PP)."""
    return ps.get_model_parallel_group()


class MegatronMpu:
    """DeepSpeed's `mpu` interface over megatron-core's groups (model parallel = TP x PP)."""

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)


def all_reduce_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of a tensor over a group (for logging: losses and rates)."""
    out = value.detach().clone()
    dist.all_reduce(out, group=group)
    return out / dist.get_world_size(group)


class PendingGather:
    """An all_gather in flight (`all_gather_async`): the caller computes something else meanwhile and `wait()`s
    for the result only when it needs it, so a rank that arrives early works instead of waiting for the others."""

    def __init__(self, gathered: torch.Tensor, work=None):
        self.gathered = gathered
        self.work = work

    def wait(self) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0, in rank order."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.gathered


def all_gather_tensor(output: torch.Tensor, value: torch.Tensor, group=None, async_op: bool = False):
    """All-gather `value` from every rank of `group` into the one tensor `output`, in rank order. torch 2.13 calls
    this `all_gather_single` and deprecates `all_gather_into_tensor` (a FutureWarning); older torch has only the
    latter. Resolved at each call, so a test can count the calls by patching the name `dist` has."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, value, group=group, async_op=async_op)


def all_gather_async(value: torch.Tensor, group=None) -> PendingGather:
    """Start gathering `value` (at least 1-d) from every rank of `group` (None or one rank: nothing to gather) into
    one tensor: a list of one tensor per rank would cost the host O(world) tensors per call."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return PendingGather(value)
    value = value.contiguous()
    gathered = value.new_empty((dist.get_world_size(group) * value.shape[0], *value.shape[1:]))
    return PendingGather(gathered, all_gather_tensor(gathered, value, group=group, async_op=True))
