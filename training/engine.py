"""DeepSpeed engine for a model: ZeRO stage, precision, AdamW, warmup + cosine schedule, gradient clipping."""
from __future__ import annotations

import contextlib
import math

import deepspeed
import torch
import torch.distributed as dist

from skiptron.parallel.state import Layout, MegatronMpu, model_parallel_group
from skiptron.parallel.timing import Stopwatch

from .clipping import clip_in_step, owns_clipping
from .config import Config
from .model import no_weight_decay
from .verbosity import third_party_stdout

try:
    from apex.optimizers import FusedAdam as _ApexFusedAdam
except ImportError:
    _ApexFusedAdam = None


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_fp16_supported() -> bool:
    """Whether DeepSpeed's CPU accelerator accepts fp16 on this CPU (it asks oneDNN)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.device_name() == "cpu" and bool(accelerator.is_fp16_supported())


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that have it, fp32 elsewhere. bf16 and fp16 are honoured on CPUs too: DeepSpeed's CPU
    accelerator runs its bf16 optimizer and its fp16 loss scaling there (ZeRO 0-3), so those paths are testable
    without a GPU (slowly: CPUs have few reduced-precision kernels)."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and device.type == "cpu" and not cpu_fp16_supported():
        raise ValueError("train.precision: fp16 needs a CPU with oneDNN fp16 support for DeepSpeed's CPU accelerator "
                         "(this one has none); use bf16 or fp32 on this machine")
    if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                         f"use fp16 or fp32")
    return p


def lr_lambda(cfg: Config):
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    o, steps = cfg.optimizer, cfg.train.max_steps
    floor = o.min_lr / o.lr

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class HoldableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose `step()` does nothing while `may_advance()` is False (a step the StepGuard rejected), as
    DeepSpeed's engine does not step the schedule for a step its own overflow check skipped."""

    def __init__(self, optimizer, lr_lambda, may_advance=None):
        self._may_advance = may_advance
        super().__init__(optimizer, lr_lambda)

    def step(self, *args, **kwargs):
        if self._may_advance is None or self._may_advance():
            super().step(*args, **kwargs)

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "_may_advance"}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # ZeRO-3 drops empty groups (e.g. mask finetuning: scores only)


def make_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: apex's fused Adam on GPU when importable, torch's fused kernel otherwise (CUDA and CPU: one pass over
    each tensor; DeepSpeed's ZeRO optimizers step one flat buffer, where torch's for-loop AdamW makes a temporary per
    elementwise op)."""
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if device.type == "cuda" and _ApexFusedAdam is not None:
        return _ApexFusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)


def zero_stage(cfg: Config, world_size: int, precision: str) -> int:
    """The ZeRO stage DeepSpeed runs: `zero.stage`, except that ZeRO 1-2 over a single data-parallel rank in fp32
    without a pipeline run as stage 0. With one DP rank they partition nothing, and DeepSpeed 0.19.8 still copies
    every gradient into its reduction bucket, divides the bucket by the DP size and copies it again into the
    partition's gradient buffer (10% of an 8 x 512 step on the CPU, docs/benchmarks.md); stage 0 steps the same
    numbers with the same memory (fp32 weights are their own masters). bf16/fp16 keep the configured stage: stage 0
    would accumulate gradients in the low precision instead of fp32."""
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    if cfg.zero.stage in (1, 2) and dp == 1 and cfg.parallel.pp == 1 and precision == "fp32":
        return 0
    return cfg.zero.stage


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    t = cfg.train
    stage = zero_stage(cfg, world_size, precision)
    clip = 0.0 if owns_clipping(cfg.optimizer.grad_clip, stage, precision) else cfg.optimizer.grad_clip
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": clip,  # 0 at stage 0 in fp32: the optimizer step clips (training/clipping.py)
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": cfg.zero.overlap_comm,
            "reduce_bucket_size": cfg.zero.reduce_bucket_size,
            "allgather_bucket_size": cfg.zero.reduce_bucket_size,
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        # bf16 under ZeRO 1-3: gradients accumulate over micro-batches in fp32, as in Megatron-LM (DeepSpeed's
        # BF16_Optimizer for stage 1, its ZeRO optimizers for 2-3). DeepSpeed 0.19.8 refuses that for stage 0, whose
        # FP16_Optimizer keeps fp32 master weights but accumulates bf16 gradients.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if precision == "bf16" and stage >= 1 else {}),
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: torch.nn.Module, layout: Layout, guard=None):
    """Wrap the model in a DeepSpeed engine; returns (engine, precision). A `PipelineModule` gets DeepSpeed's
    pipeline engine (1F1B, `train_batch`), which takes its groups from the module's topology (checked against
    megatron-core's when the module was built) instead of an `mpu`. With a `guard` (training/guard.py), a step it
    rejects changes neither the weights, the optimizer state nor the LR schedule."""
    from deepspeed.pipe import PipelineModule

    precision = resolve_precision(cfg, layout.device)
    optimizer = make_optimizer(cfg, model, layout.device)
    if guard is not None:
        guard.gate(optimizer)  # before the scheduler, which wraps `optimizer.step` to count its calls
    if owns_clipping(cfg.optimizer.grad_clip, zero_stage(cfg, layout.world_size, precision), precision):
        clip_in_step(optimizer, cfg.optimizer.grad_clip, model_parallel_group(), layout.device)
    scheduler = HoldableLambdaLR(optimizer, lr_lambda(cfg), guard.schedule_may_advance if guard else None)
    ds_config = deepspeed_config(cfg, layout.world_size, precision)
    pipelined = isinstance(model, PipelineModule)
    if pipelined:
        # Partitioned p2p (activations split over TP ranks, all-gathered after the send) carries one tensor that
        # needs a gradient; routed models also carry their aux loss, so they send whole activations.
        partitioned = not getattr(model, "carry_aux", False)
        ds_config["pipeline"] = {"pipe_partitioned": partitioned, "grad_partitioned": partitioned}
    with third_party_stdout():  # DeepSpeed's CPU comm op announces itself on every rank
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            mpu=None if pipelined else MegatronMpu(),
            config=ds_config,
            dist_init_required=False,
        )
    _undo_fp16_optimizer_init_step(engine)
    _share_fp32_master_partitions(engine)
    if pipelined:
        engine.pipe_timer = PipeTimer(engine, layout.device)
    return engine, precision


def gradient_sync(engine, dp: int):
    """The context a backward runs in: DeepSpeed's reduction (ZeRO's buckets and partitions; stage 0 all-reduces
    over DP), except that stage 0 over a single DP rank skips it (`engine.no_sync()`, DeepSpeed's public API): there
    it only flattens every gradient into buckets and copies them back, a `cat` and a copy per bucket per step."""
    if dp == 1 and not engine.zero_optimization():
        return engine.no_sync()
    return contextlib.nullcontext()


def _undo_fp16_optimizer_init_step(engine) -> None:
    """DeepSpeed's FP16_Optimizer and FP16_UnfusedOptimizer (ZeRO-0 with bf16 or fp16; checked with deepspeed 0.19.8)
    take one optimizer step with zero gradients when they are built, to create the optimizer's state: Adam's step
    count then starts at 1 (its bias correction makes the first real update 0.73 x lr) and weight decay is applied
    once. Dropping that state (the optimizer creates it again at its first real step) and copying the fp32 masters
    back from the model's bf16/fp16 weights (whose copies they were) starts ZeRO-0 where ZeRO 1-3 start."""
    opt = engine.optimizer
    if engine.zero_optimization() or not hasattr(opt, "fp16_groups") or not hasattr(opt, "refresh_fp32_params"):
        return
    base = opt.optimizer
    base.state.clear()
    for group in base.param_groups:
        group.pop("step", None)  # apex's FusedAdam counts steps per group
    opt.refresh_fp32_params()


def _share_fp32_master_partitions(engine) -> None:
    """ZeRO 1-2 keep an fp32 master copy of this rank's partition of the flat weights (the model's parameters are
    views of the flat weights), step it and copy it back into the flat weights after every step. When the weights are
    fp32 themselves the copy is the same numbers: the optimizer steps this rank's partition of the flat weights
    directly instead, which saves that copy every step and a second fp32 copy of the partition in memory. Reaches
    into DeepSpeedZeroOptimizer's private fields (checked with deepspeed 0.19.8): its master partitions, the wrapped
    optimizer's param groups that hold them and the parameters' links to their fragments (relinked)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer) or opt.cpu_offload or opt.optimizer.state:
        return
    masters = opt.single_partition_of_fp32_groups
    for i, master in enumerate(masters):
        flat = opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])]
        if flat.dtype != master.dtype or flat.shape != master.shape:
            return  # mixed precision: the masters are a different dtype and stay as they are
    for i, master in enumerate(masters):
        flat = opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])]
        with torch.no_grad():
            flat.copy_(master)  # the same values already; copied so that any difference is the master's
        shared = flat.detach().requires_grad_(True)  # a leaf on the flat weights' storage, as DeepSpeed's master is
        masters[i] = shared
        opt.optimizer.param_groups[i]["params"] = [shared]
    opt._link_all_hp_params()


class PipeTimer:
    """Measures each stage's idle time inside the pipeline schedule: the bubble fraction of a step is
    1 - (forward + backward time) / (schedule time without the optimizer step and gradient reductions), i.e. the
    share of the pipelined phase this stage spent waiting on (or transferring to) its neighbours."""

    COMPUTE = ("ForwardPass", "BackwardPass")
    OUTSIDE = ("OptimizerStep", "ReduceGrads", "ReduceTiedGrads")

    def __init__(self, engine, device: torch.device):
        # Device time (CUDA events on GPUs, read once per step by `bubble`), not the host's launch time.
        self.watch = Stopwatch(device)
        timed = {}
        for kind, fn in type(engine)._INSTRUCTION_MAP.items():
            name = kind.__name__
            if name in PipeTimer.OUTSIDE:
                timed[kind] = fn
                continue
            region = "compute" if name in PipeTimer.COMPUTE else "other"

            def wrapper(self_engine, *args, _fn=fn, _region=region, **kwargs):
                with self.watch.region(_region):
                    return _fn(self_engine, *args, **kwargs)

            timed[kind] = wrapper
        engine._INSTRUCTION_MAP = timed  # the instance's map shadows the class's (checked with deepspeed 0.19.8)

    def bubble(self) -> float:
        """Idle fraction since the last call (nan before any schedule ran); resets."""
        seconds = self.watch.take()
        compute = seconds.get("compute", 0.0)
        total = compute + seconds.get("other", 0.0)
        return 1 - compute / total if total else float("nan")
