"""Whole (unsharded) weights of a model under any layout: ZeRO-3 partitions gathered, TP shards joined."""
from __future__ import annotations

import contextlib

import torch

from skiptron.parallel.tensor_parallel import full_tensor


def _zero3_gathered(params):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


@torch.no_grad()
def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the TP=1, unpartitioned tensor, on CPU. Collective: call on every rank. A pipeline module
    gives the whole model's weights under GPT's names, gathered from every stage."""
    from deepspeed.pipe import PipelineModule

    if isinstance(module, PipelineModule):
        from .pipeline import full_gpt_state

        return full_gpt_state(module)
    params = dict(module.named_parameters())
    with _zero3_gathered(list(params.values())):
        return {name: full_tensor(p).float().cpu() for name, p in params.items()}
