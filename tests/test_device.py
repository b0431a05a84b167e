"""Device placement: tensors handed to collectives live on the layout's device (NCCL takes CUDA tensors only).

Mechanism (tests/distributed.py `collective_device_check`): provenance tracking. Every tensor that skiptron's code
creates with a factory call (torch.tensor, zeros, arange, ...) without an explicit `device=` is tagged with its call
site, the tag follows it through ops whose inputs all carry it, an explicit `.to(device)` clears it, and
torch.distributed's collectives refuse tagged tensors. On CPU such a tensor happens to be on the right device; on a
GPU it would be a CPU tensor given to NCCL. Reintroducing either known bug (`torch.tensor(values)` in
`RoutingMeter.reduce`, `torch.tensor([len(bad)])` in `check_rank_mapping`) makes the routed and PP runs below fail,
naming the line (checked by hand when this was written). Not covered: a host tensor mixed with device tensors in an
ordinary op (on a GPU torch raises there by itself, except for 0-d tensors).
"""
import os

import pytest

from distributed import under_device_check
from runs import train_run

HERE = os.path.dirname(os.path.abspath(__file__))


def _host_tensor_to_collective(explicit: bool):
    import torch

    from skiptron.parallel import state

    value = torch.tensor([1.0], device="cpu") if explicit else torch.tensor([1.0])
    return state.all_reduce_mean(value * 2).item()  # derived from the host tensor: still tagged


def test_the_check_catches_a_tensor_made_without_device(pool2):
    """The mechanism itself: this file counts as project code here, so its own device-less tensor is caught."""
    assert pool2.run(under_device_check, _host_tensor_to_collective, True, extra_roots=(HERE,)) == [2.0, 2.0]
    with pytest.raises(AssertionError, match=r"all_reduce got a tensor created without device= at .*test_device.py"):
        pool2.run(under_device_check, _host_tensor_to_collective, False, extra_roots=(HERE,))


@pytest.mark.parametrize("overrides", [
    [],
    ["model.skip.enabled=true", "model.skip.mode=capacity", "parallel.balance_tokens=true",
     "parallel.balance_min_tokens=0"],
    ["model.skip.enabled=true", "parallel.pp=2", "train.micro_batch_size=1"],
    ["parallel.tp=2", "parallel.sequence_parallel=true", "zero.stage=1"],
], ids=["dense-dp2", "routed-balanced-dp2", "routed-pp2", "sp-tp2"])
def test_one_step_places_every_collective_input_on_the_device(pool2, tiny_data, tmp_path, overrides):
    ov = ["train.max_steps=2", "eval.interval=1", "checkpoint.save_at_end=true"] + overrides
    pool2.run(under_device_check, train_run, ov, tiny_data, tmp_path / "run")
