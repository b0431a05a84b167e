"""The training loop: set up groups, model, engine and data; step; validate; log; save."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from skiptron.parallel import state

from .config import Config, ConfigError, save_config
from .engine import build_engine
from .flops import model_flops_per_token, peak_flops
from .loader import TokenLoader, read_manifest
from .metrics import MetricsLogger
from .model import GPT


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    """The same seed on every rank: weights are built whole on each rank and sharded, so TP shards agree."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_vocab_and_seq(cfg: Config) -> tuple[int, dict]:
    manifest = read_manifest(cfg.data.path)
    if manifest["seq_len"] != cfg.model.seq_len:
        raise ConfigError(
            f"model.seq_len: {cfg.model.seq_len} differs from the prepared data's seq_len {manifest['seq_len']} "
            f"({cfg.data.path}); set model.seq_len={manifest['seq_len']} or prepare the data again")
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

    @classmethod
    def setup(cls, cfg: Config) -> "Trainer":
        world_size = state.launch_world_size()
        cfg.validate_for_launch(world_size)
        vocab, manifest = data_vocab_and_seq(cfg)
        device, _ = state.init_world(cfg.parallel.backend, cfg.parallel.init_timeout_s)
        layout = state.init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, device)
        seed_everything(cfg.train.seed)
        model = GPT(cfg.model, vocab, cfg.parallel.tp)
        engine, precision = build_engine(cfg, model, layout)
        if layout.is_writer:
            save_config(cfg, Path(cfg.run.dir) / "config.yaml")
        return cls(cfg, layout, engine, precision, vocab, manifest)

    # -- pieces of the loop -------------------------------------------------------------------------------------
    def loader(self, split: str, start_sample: int = 0, shuffle: bool | None = None) -> TokenLoader:
        return TokenLoader(
            self.cfg.data.path, split, self.cfg.train.micro_batch_size,
            dp_rank=self.layout.dp_rank, dp_size=self.layout.dp, num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed, start_sample=start_sample,
            shuffle=self.cfg.data.shuffle if shuffle is None else shuffle)

    def train_step(self, batches) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the loss averaged over micro-batches and DP."""
        total = torch.zeros((), dtype=torch.float32, device=self.layout.device)
        n = 0
        for tokens in batches:
            loss = self.engine(tokens.to(self.layout.device, non_blocking=True))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
            n += 1
        return state.all_reduce_mean(total / n, state.dp_group()).item()

    @torch.no_grad()
    def validate(self) -> float:
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.layout.device)
        batches = iter(self.loader("val", shuffle=False))
        for _ in range(self.cfg.eval.batches):
            total += self.engine(next(batches).to(self.layout.device)).float()
        self.engine.train()
        return state.all_reduce_mean(total / self.cfg.eval.batches, state.dp_group()).item()

    def save(self, step: int) -> Path:
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(str(self.cfg.checkpoint_dir), tag=tag, client_state={"step": step})
        return self.cfg.checkpoint_dir / tag

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, layout = self.cfg, self.layout
        ga = cfg.grad_accum_steps(layout.world_size)
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        flops_per_token = model_flops_per_token(
            cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_size, cfg.model.num_heads,
            cfg.model.padded_vocab_size(self.vocab_size), cfg.model.seq_len)
        peak = peak_flops(layout.device, torch.bfloat16 if self.precision == "bf16" else torch.float32,
                          cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else None)
        log = MetricsLogger(cfg.run.dir, is_writer=layout.is_writer, total_steps=cfg.train.max_steps,
                            tensorboard=cfg.logging.tensorboard, print_every=cfg.logging.print_every)
        log.log_text(
            f"world {layout.world_size} = tp {layout.tp} x pp {layout.pp} x dp {layout.dp} | zero {cfg.zero.stage} | "
            f"{self.precision} on {layout.device.type} | params/rank "
            f"{sum(p.numel() for p in self.engine.module.parameters()) / 1e6:.2f}M | grad accum {ga}")
        batches = iter(self.loader("train"))
        nonfinite = 0
        if layout.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(1, cfg.train.max_steps + 1):
            start = time.perf_counter()
            loss = self.train_step(next(batches) for _ in range(ga))
            elapsed = time.perf_counter() - start
            tokens_per_s = tokens_per_step / elapsed
            metrics = {
                "loss": loss,
                "lr": self.engine.get_lr()[0],
                "grad_norm": _as_float(self.engine.get_global_grad_norm()),
                "tokens_per_s": tokens_per_s,
                "tflops": flops_per_token * tokens_per_s / layout.world_size / 1e12,
                "step_time_s": elapsed,
            }
            if peak:
                metrics["mfu"] = flops_per_token * tokens_per_s / (peak * layout.world_size)
            if layout.device.type == "cuda":
                metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if cfg.eval.interval and step % cfg.eval.interval == 0 or step == cfg.train.max_steps:
                metrics["val_loss"] = self.validate()
            log.log(step, metrics)
            nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
            if nonfinite >= cfg.train.max_nonfinite_steps:
                log.close()
                raise NonFiniteLossError(
                    f"loss was non-finite for {nonfinite} consecutive steps (last at step {step}); "
                    f"stopping (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). Lower optimizer.lr, "
                    f"raise optimizer.warmup_steps or check the data.")
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                self.save(step)
        saved_last = cfg.checkpoint.interval and cfg.train.max_steps % cfg.checkpoint.interval == 0
        if cfg.checkpoint.save_at_end and not saved_last:
            self.save(cfg.train.max_steps)
        log.close()
        return log.summary()


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)


def train(cfg: Config) -> dict:
    """Train one run in this process (one rank of the launcher's world) and tear the groups down."""
    trainer = Trainer.setup(cfg)
    try:
        summary = trainer.run()
        dist.barrier()
        return summary
    finally:
        state.shutdown()
