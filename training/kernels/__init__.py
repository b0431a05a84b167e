"""Fused kernels. `sru_recurrence` runs the SRU++ elementwise recurrence (see `reference.py` for the math) with the
fastest implementation available for its tensors:

- CPU, fp32/fp64: a C++ extension compiled on first use (`cpu.py`); other CPU dtypes are computed in fp32.
- CUDA: a Triton kernel (`triton_sru.py`), fp32 math and states for any input dtype.
- otherwise, or when the kernel cannot be built (no compiler, no triton): the PyTorch reference loop, with a warning.

`impl` forces one: "reference", "cpu", "triton" (an error if unavailable), or "auto". The environment variable
SKIPTRON_SRU_IMPL sets the default for "auto" (e.g. `reference` to rule the kernels out while debugging).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import cpu, triton_sru
from .fused import Recurrence
from .reference import check_shapes, reference_recurrence

IMPLS = ("auto", "reference", "cpu", "triton")
__all__ = ["sru_recurrence", "reference_recurrence", "available_impl", "IMPLS"]


def _backend(impl: str, x: torch.Tensor):
    """The fused backend for `impl` on x's device, None for the reference loop."""
    if impl == "reference":
        return None
    if impl == "cpu":
        if x.device.type != "cpu":
            raise ValueError(f"SRU recurrence: impl='cpu' needs CPU tensors, got {x.device}")
        kernel = cpu.cpu_kernel()
        if kernel is None:
            raise RuntimeError("SRU recurrence: impl='cpu' but the C++ extension could not be built (see the warning)")
        return kernel
    if impl == "triton":
        if not triton_sru.supports(x):
            raise RuntimeError("SRU recurrence: impl='triton' needs the `triton` package and CUDA tensors "
                               "(or TRITON_INTERPRET=1 to run it on the CPU)")
        return triton_sru.triton_kernel()
    # auto
    if x.device.type == "cpu":
        return cpu.cpu_kernel()
    if triton_sru.supports(x):
        return triton_sru.triton_kernel()
    _warn_once(f"SRU recurrence: no fused kernel for {x.device} tensors (is triton installed?); using the slow "
               f"PyTorch reference loop")
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def available_impl(device: torch.device | str = "cpu") -> str:
    """Which implementation "auto" picks on `device` (builds the CPU extension if needed)."""
    x = torch.empty(1, 1, 1, device=device)
    backend = _backend(_default_impl(), x)
    return {None: "reference", cpu.CpuKernel: "cpu", triton_sru.TritonKernel: "triton"}[
        None if backend is None else type(backend)]


def _default_impl() -> str:
    impl = os.environ.get("SKIPTRON_SRU_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"SKIPTRON_SRU_IMPL={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


def sru_recurrence(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, c0: torch.Tensor,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, S, D] and the last state [B, D] of the recurrence. u [B, S, 3, D] holds the candidate, forget and reset
    inputs; x [B, S, D] the highway input; v and bias [2, D] the forget and reset rows; c0 [B, D] the initial state.
    Differentiable in all of them."""
    if impl not in IMPLS:
        raise ValueError(f"SRU recurrence: impl={impl!r} is not one of {', '.join(IMPLS)}")
    check_shapes(u, x, v, bias, c0)
    backend = _backend(_default_impl() if impl == "auto" else impl, x)
    if backend is None:
        return reference_recurrence(u, x, v, bias, c0)
    if isinstance(backend, cpu.CpuKernel) and not cpu.supports(x):  # bf16/fp16 on CPU: compute in fp32
        h, c = Recurrence.apply(backend, *(t.float() for t in (u, x, v, bias, c0)))
        return h.to(x.dtype), c.to(c0.dtype)
    return Recurrence.apply(backend, u, x, v, bias, c0)
