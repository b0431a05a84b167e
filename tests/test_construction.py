"""Construction memory: a rank holds its own share of the model plus at most one whole parameter being built, under
ZeRO-3 (built partitioned, `training/construction.py`) and tensor parallelism, and still starts from exactly the
TP=1 weights. Memory is what the construction code allocated (`training/memory.AllocationMeter`)."""
import pytest
import torch

VOCAB = 200
MODEL = ["model.num_layers=6", "model.hidden_size=64", "model.num_heads=4", "model.ffn_hidden_size=128",
         "model.seq_len=16", "model.make_vocab_size_divisible_by=8"]
VARIANTS = {
    "dense": [],
    "dense-bf16": ["train.precision=bf16"],
    "routed-untied": ["model.skip.enabled=true", "model.tie_embeddings=false"],
    "srupp": ["model.block=srupp", "model.srupp.attention_every=2"],
}


def _config(overrides):
    from skiptron.training.config import load_config

    return load_config(None, MODEL + overrides)


def _reference(cfg) -> dict[str, torch.Tensor]:
    """The fp32 TP=1 weights, built whole in this process (TP=1 groups of one rank each)."""
    from skiptron.training.model import GPT

    torch.manual_seed(cfg.train.seed)
    return {n: p.detach().clone() for n, p in GPT(cfg.model, VOCAB, 1).named_parameters()}


def _zero3_build(variant):
    """Per variant: (peak bytes construction allocated, largest single allocation, this rank's partition bytes,
    the largest whole parameter's fp32 bytes, the whole model's bytes, gathered weights == TP=1 weights)."""
    import deepspeed

    from skiptron.parallel import state
    from skiptron.training.engine import PRECISION_DTYPES, resolve_precision
    from skiptron.training.memory import AllocationMeter
    from skiptron.training.trainer import build_model

    cpu = torch.device("cpu")
    cfg = _config(VARIANTS[variant] + ["zero.stage=3"])
    state.init_model_parallel(1, 1, cpu)
    reference = _reference(cfg)
    torch.manual_seed(cfg.train.seed)
    with AllocationMeter() as meter:
        model = build_model(cfg, VOCAB, cpu)
    params = list(model.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)  # partitioned, nothing whole left
    element = params[0].ds_tensor.element_size()
    partition = sum(p.ds_tensor.numel() for p in params) * element
    largest = max(p.ds_numel for p in params) * 4  # the whole draw is fp32 whatever the training precision
    whole = sum(p.ds_numel for p in params) * element
    dtype = PRECISION_DTYPES[resolve_precision(cfg, cpu)]
    with deepspeed.zero.GatheredParameters(params):
        equal = {n: torch.equal(p.detach(), reference[n].to(dtype)) for n, p in model.named_parameters()}
    equal["buffers fp32"] = all(b.dtype in (torch.float32, torch.bool) for b in model.buffers())
    return meter.peak, meter.largest, partition, largest, whole, equal


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero3_builds_partitioned_tp1_weights(pool2, variant):
    """ZeRO-3, DP=2: every rank's gathered weights are exactly the TP=1 weights (in the training precision), and
    the construction never held more than the rank's partition plus two whole parameters (megatron's whole draw
    and the layer's parameter it is copied into): far less than the whole model."""
    for peak, largest_alloc, partition, largest, whole, equal in pool2.run(_zero3_build, variant):
        assert all(equal.values()), [k for k, ok in equal.items() if not ok]
        assert largest_alloc <= largest  # no flat buffer or whole copy of more than one parameter
        assert peak <= partition + 2 * largest, (peak, partition, largest)
        assert peak < 0.75 * whole, (peak, whole)


def _tp_build(variant):
    """(peak bytes construction allocated, this rank's final share, largest whole parameter, largest shard)."""
    from skiptron.parallel import state
    from skiptron.parallel.tensor_parallel import full_tensor
    from skiptron.training.memory import AllocationMeter
    from skiptron.training.trainer import build_model

    cpu = torch.device("cpu")
    cfg = _config(VARIANTS[variant] + ["parallel.tp=2"])
    state.init_model_parallel(1, 1, cpu)
    reference = _reference(cfg)
    state.init_model_parallel(2, 1, cpu)
    torch.manual_seed(cfg.train.seed)
    with AllocationMeter() as meter:
        model = build_model(cfg, VOCAB, cpu)
    share = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    largest = max(reference[n].numel() * 4 for n, _ in model.named_parameters())
    largest_shard = max(p.numel() * 4 for p in model.parameters())
    equal = all(torch.equal(full_tensor(p), reference[n]) for n, p in model.named_parameters())
    return meter.peak, meter.live, share, largest, largest_shard, equal


@pytest.mark.parametrize("variant", ["dense", "routed-untied"])
def test_tp_construction_holds_one_whole_parameter_at_a_time(pool2, variant):
    """TP=2: each rank keeps its shards (the gathered model is the TP=1 model) and, beyond its final share, never
    held more than one whole parameter plus the shard megatron cuts from it."""
    for peak, live, share, largest, largest_shard, equal in pool2.run(_tp_build, variant):
        assert equal
        assert live == share  # every transient draw is freed
        assert peak <= share + largest + largest_shard, (peak, share, largest, largest_shard)



_FAULTS_PER_STEP = """
import resource, sys, torch
from skiptron.training import memory
if sys.argv[1] == "reused":
    memory.host_blocks_reused()
torch.set_num_threads(2)
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.ones(2**20 * k) for k in (16, 4, 8, 12)]  # 160 MiB in blocks of 16-64 MiB, written, freed
    del buffers
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[step() for _ in range(12)])
"""


def test_cpu_training_reuses_freed_host_blocks_without_faulting_them_in_again():
    """After `host_blocks_reused` (CPU training), a step's large freed buffers are reused from the heap: once the
    heap has reached its size, steps fault (almost) no page in; with glibc's default every step maps its large
    buffers afresh and faults their pages in again (those above its 32 MiB mmap ceiling: 36864)."""
    import subprocess
    import sys

    def faults(policy):
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, policy], capture_output=True, text=True,
                             check=True)
        return [int(n) for n in out.stdout.split()]

    assert min(faults("system")[2:]) > 36000  # at least the three blocks above its 32 MiB mmap ceiling
    assert sum(faults("reused")[-4:]) <= 16384  # 4 steps together: under half of what one step faults by default
