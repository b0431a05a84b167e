"""The training loop: set up groups, model, engine and data; step; validate; log; save."""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from skiptron.parallel import health, launch, state, watchdog
from skiptron.parallel.timing import synchronize

from . import checkpoint as ckpt
from . import construction
from . import faults
from .config import Config, ConfigError, save_config
from . import numerics
from .engine import PRECISION_DTYPES, build_engine, gradient_sync, resolve_precision
from .guard import StepGuard
from .flops import config_flops_per_token, peak_flops
from .loader import BlendedStream, TokenLoader, check_sources
from .memory import large_blocks_returned
from .metrics import MetricsLogger
from .model import GPT, compile_blocks
from .routing import BalancerGathers, RoutingMeter
from .runlock import RunDirBusy, RunLock
from .signals import EXIT_PREEMPTED, Preempted, StopSignals

# launch/torchrun.sh points this at a file; a rank that stops for a signal writes EXIT_PREEMPTED there, so the
# script exits with it (torchrun itself only knows "failed"), and restarted workers do not train again.
EXIT_STATUS_FILE_ENV = "SKIPTRON_EXIT_STATUS_FILE"


class TrainingDiverged(RuntimeError):
    """`train.max_nonfinite_steps` consecutive steps were skipped (non-finite, spiking, or overflowing)."""


class TrainerExtension(Protocol):
    """The trainer's one extension point, for runs that are more than pretraining (skiptron-finetune passes
    `masking.Finetuning`): it may change the freshly built model before DeepSpeed wraps it."""

    def prepare_model(self, model: torch.nn.Module, cfg: Config, vocab_size: int, log) -> None:
        """Load weights into `model`, freeze some, add parameters; `log` prints on rank 0 (None elsewhere)."""


def seed_everything(seed: int) -> None:
    """The same seed on every rank: weights are built whole on each rank and sharded, so TP shards agree."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_vocab_and_seq(cfg: Config) -> tuple[int, dict]:
    """Vocabulary size and the manifest of the (first) data source; blended sources must agree (named if not)."""
    sources = cfg.data.sources()
    try:
        manifest = check_sources(sources)
        for split in ("train", "val"):  # stat() of every shard: refuse a split with no usable shard before starting
            BlendedStream(sources, split, cfg.train.seed, shuffle=False).close()
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"{'data.blend' if cfg.data.blend is not None else 'data.path'}: {exc}") from None
    if manifest["seq_len"] != cfg.model.seq_len:
        raise ConfigError(
            f"model.seq_len: {cfg.model.seq_len} differs from the prepared data's seq_len {manifest['seq_len']} "
            f"({sources[0].path}); set model.seq_len={manifest['seq_len']} or prepare the data again")
    vocab = cfg.model.vocab_size or manifest["vocab_size"]
    if vocab < manifest["vocab_size"]:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the data's vocabulary {manifest['vocab_size']}")
    return vocab, manifest


@dataclass
class Trainer:
    """Holds what one run needs; `run()` trains to `train.max_steps`."""

    cfg: Config
    layout: state.Layout
    engine: object
    precision: str
    vocab_size: int
    manifest: dict
    progress: ckpt.Progress = field(default_factory=ckpt.Progress)
    # name -> object with state_dict()/load_state_dict() (e.g. router statistics): saved in every rank's checkpoint
    # file and restored on resume; register before `resume()`
    extra_state: dict = field(default_factory=dict)
    last_saved_step: int = -1
    stopped_by: int | None = None  # the signal that stopped the run, if any
    guard: StepGuard | None = None  # decides whether each step's update applies (training/guard.py)
    lock: RunLock | None = None  # rank 0: the run directory's writer lock
    background: ckpt.BackgroundSaves | None = None  # checkpoint.async_save: the save in flight

    def __post_init__(self):
        if self.guard is None:  # built without `setup` (benchmarks): count steps, gate nothing
            self.guard = StepGuard(self.layout.device)
        if self.background is None and self.cfg.checkpoint.async_save:
            self.background = ckpt.BackgroundSaves(self.cfg.launch.collective_timeout_s)

    @classmethod
    def setup(cls, cfg: Config, extension: TrainerExtension | None = None) -> "Trainer":
        world_size = state.launch_world_size()
        cfg.validate_for_launch(world_size)
        vocab, manifest = data_vocab_and_seq(cfg)
        numerics.configure(cfg.train)  # before any CUDA work: cuBLAS reads its workspace setting when it starts
        device, _ = state.init_world(
            cfg.parallel.backend, cfg.parallel.init_timeout_s, cfg.launch.rendezvous_timeout_s)
        layout = state.init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, device)
        lock = lock_run_dir(cfg, layout)
        if cfg.launch.health_check:
            health.preflight(device, cfg.launch.health_outlier_ratio)
        seed_everything(cfg.train.seed)
        model = build_model(cfg, vocab, layout.device, partition=extension is None)
        if extension is not None:
            extension.prepare_model(model, cfg, vocab, log=print if layout.is_writer else None)
        guard = StepGuard(device, cfg.train.spike_factor, cfg.train.spike_window)
        # The pipeline engine steps inside `train_batch`: it keeps DeepSpeed's own overflow check (counted, below).
        gated = cfg.parallel.pp == 1
        if gated and resolve_precision(cfg, device) != "fp16":  # fp16: DeepSpeed's loss scaler owns overflows
            guard.watch(model)
        engine, precision = build_engine(cfg, model, layout, guard if gated else None)
        if layout.is_writer:
            save_config(cfg, Path(cfg.run.dir) / "config.yaml")
        trainer = cls(cfg, layout, engine, precision, vocab, manifest, guard=guard, lock=lock)
        trainer.extra_state["step_guard"] = guard
        trainer.extra_state["balancer_gathers"] = BalancerGathers(engine.module.routed_layers())
        trainer.resume()
        return trainer

    @property
    def pipelined(self) -> bool:
        return self.layout.pp > 1

    # -- pieces of the loop -------------------------------------------------------------------------------------
    def _zero_text(self) -> str:
        """The ZeRO stage the engine runs, and the configured one where they differ (engine.zero_stage)."""
        ran = self.engine.zero_optimization_stage()
        configured = self.cfg.zero.stage
        return str(ran) if ran == configured else f"{ran} (zero.stage={configured} partitions nothing over dp 1)"

    def loader(self, split: str, start_sample: int = 0, shuffle: bool | None = None, sources=None) -> TokenLoader:
        return TokenLoader(
            sources or self.cfg.data.sources(), split, self.cfg.train.micro_batch_size,
            dp_rank=self.layout.dp_rank, dp_size=self.layout.dp, num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed, start_sample=start_sample,
            shuffle=self.cfg.data.shuffle if shuffle is None else shuffle)

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches. Returns the LM loss averaged over micro-batches and
        DP (`loss`) and, for routed models, the routing metrics. The guard decides before the optimizer step
        whether the update applies (same verdict on every rank)."""
        if self.pipelined:
            return self._pipe_train_step(batches)
        batches = list(batches)
        total = torch.zeros((), dtype=torch.float32, device=self.layout.device)
        routing = RoutingMeter()
        n = 0
        step = self.progress.step + 1
        for i, tokens in enumerate(batches):
            out = self.engine(tokens.to(self.layout.device, non_blocking=True), return_output=True)
            loss = faults.poison_loss(out.loss, self.engine.module, step, self.layout.rank)
            self.guard.observe_loss(loss)
            with gradient_sync(self.engine, self.layout.dp):
                self.engine.backward(loss)
            if i == len(batches) - 1:
                self.guard.decide()  # collective, on every rank before the boundary's optimizer step
            self.engine.step()
            total += out.lm_loss.float()
            routing.add(out.routing)
            n += 1
        loss = state.all_reduce_mean(total / n, state.dp_group()).item()
        routing_metrics, feedback = routing.reduce(state.dp_group())
        self.engine.module.update_routing(feedback)
        return {"loss": loss, **routing_metrics}

    def _pipe_train_step(self, batches) -> dict[str, float]:
        """One step through DeepSpeed's pipeline engine: 1F1B over `grad_accum` micro-batches; the first stage
        reads the inputs, the last the labels (the same samples: both sit in the same DP replica)."""
        module = self.engine.module
        with module.collecting() as collected:
            self.engine.train_batch(data_iter=((t[:, :-1], t[:, 1:]) for t in batches))
        loss = self._from_last_stage(collected.lm_losses)
        routing = RoutingMeter()
        for records in collected.routing_per_micro_batch():
            routing.add(records)
        routing_metrics, feedback = routing.reduce(state.dp_group())  # this stage's layers, its DP group
        module.update_routing(feedback)
        return {"loss": loss, **_merge_stage_routing(routing_metrics)}

    def _from_last_stage(self, losses: list) -> float:
        """Mean of the last stage's per-micro-batch losses over micro-batches and DP, on every rank."""
        value = torch.stack(losses).float().mean() if losses else torch.zeros((), device=self.layout.device)
        dist.all_reduce(value, group=state.pp_group())  # only the last stage contributes
        return state.all_reduce_mean(value, state.dp_group()).item()

    def stage_metrics(self) -> dict[str, float]:
        """Pipeline bubble (idle fraction of the pipelined phase) and peak memory, per stage. Collective."""
        bubble = self.engine.pipe_timer.bubble()
        if self.layout.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)
        # per stage: summed bubbles and rank counts, and the peak; tensors of pp entries, whatever the world
        sums = torch.zeros(2, self.layout.pp, dtype=torch.float64, device=self.layout.device)
        peaks = torch.zeros(self.layout.pp, dtype=torch.float64, device=self.layout.device)
        sums[0, self.layout.pp_rank], sums[1, self.layout.pp_rank], peaks[self.layout.pp_rank] = bubble, 1.0, mem
        dist.all_reduce(sums)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        bubbles, peaks = (sums[0] / sums[1]).tolist(), peaks.tolist()
        out = {}
        for stage in range(self.layout.pp):
            out[f"pipe/bubble/S{stage}"] = bubbles[stage]
            out[f"mem/S{stage}_gb"] = peaks[stage]
        out["pipe/bubble"] = sum(out[f"pipe/bubble/S{s}"] for s in range(self.layout.pp)) / self.layout.pp
        return out

    def validation_metrics(self) -> dict[str, float]:
        """`val_loss` on the data's val split (a blend's: mixed with the same weights) and, for a blend,
        `val_loss/<source>` on each source's own val split. Collective."""
        sources = self.cfg.data.sources()
        metrics = {"val_loss": self.validate()}
        if len(sources) > 1:
            for source in sources:
                metrics[f"val_loss/{source.name}"] = self.validate([source])
        return metrics

    @torch.no_grad()
    def validate(self, sources=None) -> float:
        if self.pipelined:
            batches = iter(self.loader("val", shuffle=False, sources=sources))
            pairs = ((t[:, :-1], t[:, 1:]) for t in (next(batches) for _ in range(self.cfg.eval.batches)))
            with self.engine.module.collecting() as collected:
                self.engine.eval_batch(pairs, num_micro_batches=self.cfg.eval.batches)
            self.engine.train()
            return self._from_last_stage(collected.lm_losses)
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.layout.device)
        batches = iter(self.loader("val", shuffle=False, sources=sources))
        for _ in range(self.cfg.eval.batches):
            total += self.engine(next(batches).to(self.layout.device), return_output=True).lm_loss.float()
        self.engine.train()
        return state.all_reduce_mean(total / self.cfg.eval.batches, state.dp_group()).item()

    def save(self) -> Path:
        """Checkpoint the current step (atomic, see training/checkpoint/); its path. Collective. A checkpoint saved
        while steps are being skipped is marked (`health` in trainer.json) so resume does not prefer it silently.
        With checkpoint.async_save it is published in the background: `wait_for_save()` waits for it."""
        tokenizer = Path(self.cfg.data.sources()[0].path) / self.manifest.get("tokenizer", "tokenizer.json")
        health = {"skipped_streak": self.guard.streak, "skipped_total": self.guard.totals["total"]}
        if self.background is not None:
            self.wait_for_save()  # at most one in flight; its error is raised here
        path = ckpt.save(self.engine, self.cfg, self.layout, self.progress, self.vocab_size, self.extra_state,
                         tokenizer=tokenizer, health=health, background=self.background)
        if self.background is None:
            self.last_saved_step = self.progress.step
        return path

    def wait_for_save(self) -> None:
        """Block until the save in flight (checkpoint.async_save) is published, or raise its CheckpointError."""
        published = self.background.wait() if self.background is not None else None
        if published is not None:
            self.last_saved_step = published

    def resume(self) -> None:
        """Continue from `cfg.resume` (auto / none / path): weights, optimizer, scheduler, RNG, data position. A
        checkpoint whose loaded weights or optimizer state are non-finite is refused; `resume=auto` then falls back
        to the previous one, naming what it refused."""
        log = print if self.layout.is_writer else None
        refused = []
        for path in ckpt.resume_candidates(self.cfg, log=log):
            progress = ckpt.load(self.engine, self.cfg, self.layout, path, self.vocab_size, self.extra_state,
                                 log=log)
            bad = ckpt.nonfinite_state(self.engine) if self.cfg.checkpoint.check_finite else []
            if bad:
                refused.append(f"{path}: non-finite {', '.join(bad[:5])}")
                if log:
                    log(f"checkpoint {path} holds non-finite values ({', '.join(bad[:5])}); trying the previous one")
                continue
            self.progress = progress
            self.last_saved_step = self.progress.step
            if log:
                log(f"resumed from {path}: step {self.progress.step}, {self.progress.consumed_samples} samples")
            return
        if refused:
            raise ckpt.CheckpointError("no usable checkpoint: " + "; ".join(refused))

    def _check_data_position(self, train_data: TokenLoader) -> None:
        """A resumed run's per-source sample counts must be where this blend puts them (else the blend changed)."""
        saved = self.progress.consumed_by_source
        expected = train_data.consumed_by_source(self.progress.consumed_samples)
        if len(saved) + len(expected) > 2 and saved != expected:  # one source: only the count, always consistent
            raise ConfigError(
                f"data.blend: the checkpoint consumed {saved} samples per source after {self.progress.consumed_samples}"
                f" samples, this blend would have taken {expected}; resume with the blend the run started with")

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, layout = self.cfg, self.layout
        ga = cfg.grad_accum_steps(layout.world_size)
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        padded_vocab = cfg.model.padded_vocab_size(self.vocab_size)

        def model_flops(step_metrics: dict) -> float:
            """Per-token training FLOPs; routed layers count at their measured execution rates."""
            rates = {int(k.rsplit("/L", 1)[1]): v for k, v in step_metrics.items() if k.startswith("skip/rate/L")}
            return config_flops_per_token(cfg.model, padded_vocab, rates)
        peak = peak_flops(layout.device, PRECISION_DTYPES[self.precision],
                          cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else None, tf32=cfg.train.tf32)
        log = MetricsLogger(cfg.run.dir, is_writer=layout.is_writer, total_steps=cfg.train.max_steps,
                            tensorboard=cfg.logging.tensorboard, print_every=cfg.logging.print_every,
                            start_step=self.progress.step,
                            progress=cfg.logging.progress == "auto" and not launch.output_is_forwarded())
        log.log_text(
            f"world {layout.world_size} = tp {layout.tp} x pp {layout.pp} x dp {layout.dp} | zero {self._zero_text()} | "
            f"{self.precision} on {layout.device.type}{' (tf32)' if cfg.train.tf32 and layout.device.type == 'cuda' else ''}"
            f"{' | deterministic' if cfg.train.deterministic else ''} | params/rank "
            f"{sum(p.numel() for p in self.engine.module.parameters()) / 1e6:.2f}M | grad accum {ga}")
        if self.pipelined:
            module = self.engine.module
            log.log_text(f"pipeline partition ({module.partition_name}, 1F1B, {ga} micro-batches):")
            for line in module.describe_partition():
                log.log_text(f"  {line}")
        train_data = self.loader("train", start_sample=self.progress.consumed_samples)
        self._check_data_position(train_data)
        corrupt = 0
        for split, data in (("train", train_data), ("val", self.loader("val", shuffle=False))):
            corrupt += data.stats["corrupt_shards"]
            for name, reason in data.stats["corrupt"].items():
                log.log_text(f"data: skipping unusable {split} shard {name}: {reason}")
        dog = watchdog.start(cfg.launch.collective_timeout_s, self.progress.step) if cfg.launch.watchdog else None
        try:
            summary = self._loop(log, train_data, corrupt, dog, ga, tokens_per_step, model_flops, peak)
        except Exception as err:
            if dog is not None and watchdog.is_communication_error(err):
                dog.communication_failed(err)  # the watchdog names the dead or stalled rank and ends the process
            self._finish_save_after(err, log)
            if dog is not None:
                dog.stop(clean=False)  # this rank is failing: peers see its heartbeat stop and name it
            raise
        finally:
            if dog is not None:
                dog.stop()
            if self.lock is not None:
                self.lock.release()
        return summary

    def _finish_save_after(self, err: Exception, log) -> None:
        """Training failed with `err`: the save in flight is still published if it can be (it was taken before the
        failure); its own error is reported, not raised, so that `err` is what the run ends with."""
        try:
            self.wait_for_save()
        except ckpt.CheckpointError as save_err:
            log.log_text(f"the checkpoint save in flight failed too: {save_err}")

    def _loop(self, log, train_data, corrupt, dog, ga, tokens_per_step, model_flops, peak) -> dict:
        cfg, layout = self.cfg, self.layout
        batches = iter(train_data)
        signals = StopSignals(layout.device).install()
        nonfinite = 0
        # fp16: DeepSpeed's loss scaler skips overflowing steps while it lowers the scale from 2^16 (at most 16 in
        # a row); those do not count towards train.max_nonfinite_steps
        max_skipped = cfg.train.max_nonfinite_steps + (16 if self.precision == "fp16" else 0)
        if layout.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first = self.progress.step + 1
        for step in range(first, cfg.train.max_steps + 1):
            start = time.perf_counter()
            if dog:
                dog.progress(step, "data loading")
            faults.fire("step", step, layout.rank)
            micro_batches = [next(batches) for _ in range(ga)]
            if dog:
                dog.progress(step, "forward/backward")
            step_metrics = self.train_step(micro_batches)
            step_metrics.update(self.guard.finish_step(self.engine.was_step_applied()))
            if dog and step == first:
                dog.stall_checks(True)
            if self.pipelined:
                step_metrics.update(self.stage_metrics())
            loss = step_metrics["loss"]
            self.progress.advance(cfg.train.global_batch_size, tokens_per_step)
            self.progress.consumed_by_source = train_data.consumed_by_source(self.progress.consumed_samples)
            synchronize(layout.device)  # (the step's loss read-back has already waited for the device)
            elapsed = time.perf_counter() - start
            tokens_per_s = tokens_per_step / elapsed
            flops_per_token = model_flops(step_metrics)
            metrics = {
                **step_metrics,
                "lr": self.engine.get_lr()[0],
                "grad_norm": _as_float(self.engine.get_global_grad_norm()),
                "tokens_per_s": tokens_per_s,
                "tflops": flops_per_token * tokens_per_s / layout.world_size / 1e12,
                "step_time_s": elapsed,
                "data/corrupt_shards": corrupt,  # train + val, named in the log above
                **{f"data/consumed/{k}": v for k, v in self.progress.consumed_by_source.items()},
            }
            if peak:
                metrics["mfu"] = flops_per_token * tokens_per_s / (peak * layout.world_size)
            if layout.device.type == "cuda":
                metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if cfg.eval.interval and step % cfg.eval.interval == 0 or step == cfg.train.max_steps:
                if dog:
                    dog.progress(step, "validation")
                metrics.update(self.validation_metrics())
            log.log(step, metrics)
            nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
            if max(nonfinite, self.guard.streak) >= max_skipped:
                log.close()
                signals.restore()
                raise TrainingDiverged(
                    f"training diverged: {max(nonfinite, self.guard.streak)} consecutive steps were skipped or had a "
                    f"non-finite loss (last at step {step}; skipped so far: {self.guard.reason()}); stopping "
                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). Lower optimizer.lr, raise "
                    f"optimizer.warmup_steps or check the data; the newest checkpoint saved before the streak is "
                    f"the one to resume from.")
            stop = signals.requested()  # agreed across ranks at the step boundary
            if stop or cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                with dog.paused("checkpoint save") if dog else contextlib.nullcontext():
                    self.save()
                    if stop:  # the job ends: the save must be published first
                        self.wait_for_save()
            if stop:
                self.stopped_by = stop
                log.log_text(f"stopped by signal {stop} after step {step}; checkpoint saved")
                break
        signals.restore()
        with dog.paused("checkpoint save") if dog else contextlib.nullcontext():
            self.wait_for_save()
            if cfg.checkpoint.save_at_end and not self.stopped_by and self.last_saved_step != self.progress.step:
                self.save()
                self.wait_for_save()
        log.close()
        return log.summary()


def build_model(cfg: Config, vocab_size: int, device: torch.device, partition: bool = True) -> torch.nn.Module:
    """GPT, or with parallel.pp > 1 the same layer sequence as a DeepSpeed PipelineModule (this stage's layers;
    `device`, the layout's, is where its start-up collectives run). Under ZeRO-3 (and `partition`) the GPT is built
    already partitioned over DP (`training/construction.py`); an extension that changes the built model's weights
    (finetuning) gets it whole, as DeepSpeed then partitions it."""
    def build() -> GPT:
        return GPT(cfg.model, vocab_size, cfg.parallel.tp, balance=cfg.parallel.token_balance,
                   checkpoint_blocks=cfg.parallel.checkpointed_blocks(cfg.model.num_layers),
                   sequence_parallel=cfg.parallel.sequence_parallel, loss_chunk_tokens=cfg.train.loss_chunk_tokens)

    with large_blocks_returned(reuse_after=device.type == "cpu" and cfg.train.cpu_heap == "reuse"):
        if cfg.parallel.pp > 1:
            from .pipeline import GPTPipe

            model = GPTPipe(cfg, vocab_size, device, balance=cfg.parallel.token_balance)
        else:
            with construction.one_whole_parameter_at_a_time():
                if partition and construction.partitions_at_construction(cfg):
                    model = construction.build_partitioned(build, cfg, device)
                else:
                    model = build()
    if cfg.train.compile:
        compile_blocks(model, cfg.train.compile_backend)
    return model


def _merge_stage_routing(metrics: dict[str, float]) -> dict[str, float]:
    """Routing metrics of all pipeline stages (each computed over its own layers and DP group), on every rank."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, metrics, group=state.pp_group())
    rates = {k: v for p in parts for k, v in p.items() if k.startswith("skip/rate/")}
    if not rates:
        return {}
    out = dict(sorted(rates.items(), key=lambda kv: int(kv[0].rsplit("L", 1)[1])))
    out["skip/exec_rate"] = sum(rates.values()) / len(rates)
    agreement = {k: v for p in parts for k, v in p.items() if k.startswith("skip/predictor_agreement/")}
    if agreement:
        out.update(agreement)
        out["skip/predictor_agreement"] = sum(agreement.values()) / len(agreement)
    out["skip/aux_loss"] = sum(p.get("skip/aux_loss", 0.0) for p in parts)
    for key in ("imbalance_before", "imbalance_after", "shed_tokens", "tokens_moved", "bytes_moved"):
        values = [p[f"skip/{key}"] for p in parts if f"skip/{key}" in p]
        if values:
            out[f"skip/{key}"] = sum(values) / len(values)
    return out


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)


def lock_run_dir(cfg: Config, layout: state.Layout) -> RunLock | None:
    """Rank 0 takes the run directory's writer lock; every rank raises RunDirBusy if another live job holds it.
    Collective."""
    lock, refusal = None, [None]
    if layout.is_writer:
        lock = RunLock(cfg.run.dir)
        try:
            note = lock.acquire()
            if note:
                print(f"[run] {cfg.run.dir}: {note}", flush=True)
        except RunDirBusy as err:
            refusal = [str(err)]
    if layout.world_size > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise RunDirBusy(refusal[0])
    return lock


def _preempted_before() -> bool:
    """The launcher was asked to stop and a rank already saved for it: a restarted worker must not train on."""
    path = os.environ.get(EXIT_STATUS_FILE_ENV)
    return bool(path) and Path(path).is_file() and Path(path).read_text().strip() == str(EXIT_PREEMPTED)


def train(cfg: Config, extension: TrainerExtension | None = None) -> dict:
    """Train one run in this process (one rank of the launcher's world) and tear the groups down."""
    if _preempted_before():
        raise Preempted(0, -1)
    try:
        trainer = Trainer.setup(cfg, extension)
        summary = trainer.run()
        dist.barrier()
    finally:
        state.shutdown()
    if trainer.stopped_by:  # saved at a step boundary; exit with EXIT_PREEMPTED so the job can be requeued
        if os.environ.get(EXIT_STATUS_FILE_ENV):
            Path(os.environ[EXIT_STATUS_FILE_ENV]).write_text(str(EXIT_PREEMPTED))
        raise Preempted(trainer.stopped_by, trainer.last_saved_step)
    return summary
