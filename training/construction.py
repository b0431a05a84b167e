"""Building a model so that no rank holds more than its own share of it, plus one whole parameter at a time.

- Tensor parallelism: every megatron layer draws its whole weight on the CPU from its layer's seed
  (`use_cpu_initialization`, `layers.normal_init`) and keeps this rank's shard; the whole tensor is gone when the
  layer's constructor returns, so every layout starts from the TP=1 weights, bit for bit.
- Pipeline parallelism: a stage builds only its own layers (`training/pipeline.py`).
- ZeRO-3: the model is built inside `deepspeed.zero.Init`, which partitions each module's parameters over the
  data-parallel group as soon as its constructor returns, on the accelerator DeepSpeed trains on (the CPU here). A
  rank so holds its partition plus the module being built: its parameters and megatron's whole draw of one of them.
  The partitions hold the training precision, like the parameters DeepSpeed's engine would otherwise cast; the
  draws are fp32 on the CPU whatever that precision, so the numbers are those of the fp32 TP=1 model.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from skiptron.parallel import state

from .engine import deepspeed_config, resolve_precision


def partitions_at_construction(cfg) -> bool:
    """Whether the model is built partitioned (ZeRO-3; DeepSpeed's pipeline engine has no ZeRO-3)."""
    return cfg.zero.stage == 3 and cfg.parallel.pp == 1


def build_partitioned(build: Callable[[], nn.Module], cfg, device: torch.device) -> nn.Module:
    """`build()` under `deepspeed.zero.Init` over this rank's data-parallel group (see the module docstring).

    zero.Init gets the engine's own DeepSpeed config, which sets the precision of the partitions (deepspeed 0.19.8
    ignores its `dtype` argument on CPUs without fp16: an operator-precedence slip in `_set_dtype`) and turns off
    its `memory_efficient_linear`, which would replace torch.nn.functional.linear for the whole process. zero.Init
    also casts the floating buffers made during construction to that precision, which the engine does not do to a
    model built without it (the routers' controller offsets stay fp32); they are made fp32 again (ours are created
    as zeros, so nothing is lost)."""
    import deepspeed

    # DeepSpeed's comm over the existing process group first: its config reads the DP size through it
    deepspeed.init_distributed(dist.get_backend(), dist_init_required=False, verbose=False)
    config = deepspeed_config(cfg, dist.get_world_size(), resolve_precision(cfg, device))
    config["zero_optimization"]["memory_efficient_linear"] = False
    with deepspeed.zero.Init(data_parallel_group=state.dp_group(), config_dict_or_path=config,
                             mpu=state.MegatronMpu()):
        model = build()
    for buffer in model.buffers():
        if buffer.is_floating_point() and buffer.dtype != torch.float32:
            buffer.data = buffer.data.float()
    return model


def _copy_shard_of_whole_draw(weight, output_size, input_size, per_partition_size, partition_dim, init_method,
                              stride=1, return_master_weight=False, *, params_dtype=torch.float32, rank=None,
                              world_size=None, skip_set_tensor_parallel_attributes=False):
    """megatron-core's `_initialize_affine_weight_cpu` (checked with megatron-core 0.16.1: same signature and the
    same numbers) without its concatenated copy of this rank's chunks: the whole draw's chunks are copied straight
    into the parameter, so the draw is the one transient tensor."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    if not skip_set_tensor_parallel_attributes:
        set_tensor_model_parallel_attributes(tensor=weight, is_parallel=True, dim=partition_dim, stride=stride)
    whole = torch.empty(output_size, input_size, dtype=torch.float, requires_grad=False)
    init_method(whole)
    if rank is None:
        rank, world_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    chunk = per_partition_size // stride
    mine = torch.split(whole, chunk, dim=partition_dim)[rank::world_size]
    with torch.no_grad():
        for j, part in enumerate(mine):
            weight.data.narrow(partition_dim, j * chunk, chunk).copy_(part)
    return whole.to(dtype=params_dtype) if return_master_weight else None


@contextlib.contextmanager
def one_whole_parameter_at_a_time():
    """While building: megatron's TP layers initialize through `_copy_shard_of_whole_draw` (its layers look the
    function up in their module at call time; megatron-core 0.16.1)."""
    from megatron.core.tensor_parallel import layers

    original = layers._initialize_affine_weight_cpu
    layers._initialize_affine_weight_cpu = _copy_shard_of_whole_draw
    try:
        yield
    finally:
        layers._initialize_affine_weight_cpu = original
