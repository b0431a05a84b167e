"""Process-wide numeric settings of a run: TF32 for fp32 matmuls, and the deterministic mode.

Both are global switches of torch (and environment variables its CUDA libraries read when they start), so they are
set once per process, before any CUDA work: `configure(cfg.train)` at the top of `Trainer.setup`.

TF32 (`train.tf32`, default on) lets fp32 matmuls and convolutions use the tensor cores of Ampere and newer GPUs
(10-bit mantissa inputs, fp32 accumulation): several times the fp32 throughput, what Megatron-LM and torchtitan use.
It affects only CUDA fp32 math (bf16/fp16 runs keep fp32 masters and reductions); CPUs are untouched.

Deterministic mode (`train.deterministic`) makes a step's result a function of its inputs only, so the bitwise
resume promise also holds on GPUs:
* `torch.use_deterministic_algorithms(True)` (strict: an op without a deterministic kernel raises, naming itself).
  In strict mode torch runs the deterministic backward of flash and memory-efficient SDPA and of embedding /
  `index_add` (sorted accumulation instead of atomics), and leaves cuDNN attention out (disabled here as well);
* `CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS's split-K reductions in a fixed order; read when cuBLAS starts);
* cuDNN: `deterministic=True`, `benchmark=False` (no autotuned, run-dependent algorithm choice);
* NCCL: `NCCL_ALGO=Ring`, `NCCL_PROTO=Simple` unless already set, so every collective reduces in the same order
  whatever message size heuristics would pick (NCCL is deterministic for a fixed algorithm, protocol and topology).
Cost: slower attention backward and embedding backward and somewhat slower collectives on GPUs (see
docs/benchmarks.md for what has been measured). On CPUs the same kernels run either way; the switch is then a check.
"""
from __future__ import annotations

import os

import torch

DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls / convolutions on CUDA through TF32 tensor cores (`enabled`) or in full IEEE fp32."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def set_deterministic(enabled: bool) -> dict[str, str]:
    """Switch torch's deterministic algorithms (and the CUDA libraries' settings) on or off; returns the
    environment variables it set (an existing value is left alone: the user's choice wins)."""
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark
    torch.backends.cuda.enable_cudnn_sdp(not enabled)
    applied = {}
    if enabled:
        for key, value in DETERMINISTIC_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                applied[key] = value
    return applied


def configure(train) -> dict[str, object]:
    """Apply a `TrainConfig`'s numeric settings to this process; returns what was set (for the run's log)."""
    set_tf32(train.tf32)
    return {"tf32": train.tf32, "deterministic": train.deterministic, "env": set_deterministic(train.deterministic)}
