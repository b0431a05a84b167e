"""The fused CPU recurrence: `sru_cpu.cpp`, compiled on first use with torch.utils.cpp_extension.load (cached under
torch's extension directory, so later processes only load it; `build_lock` keeps a killed build from blocking them)."""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from skiptron.parallel.extensions import build_lock

SOURCE = Path(__file__).with_name("sru_cpu.cpp")
# -ffast-math lets GCC vectorize exp() through glibc's vector math library; the result still matches the reference
# loop to ~1e-6 (tests/test_srupp.py checks 1e-5).
CFLAGS = ["-O3", "-ffast-math"]
# Wider vectors where torch says the CPU has them (~25% faster than the baseline x86-64 build at AVX512). The build is
# cached under a name that includes the capability, so a cache shared by different machines never hands one a binary
# with instructions it lacks (which -march=native could).
ARCH_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
}


def _build_target() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU."""
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    arch = ARCH_FLAGS.get(capability, [])
    return f"skiptron_sru_cpu_{capability.lower() if arch else 'base'}", CFLAGS + arch


@functools.cache
def extension():
    """The compiled module, or None (with one warning saying why) when it cannot be built, e.g. no C++ compiler."""
    try:
        from torch.utils.cpp_extension import load

        name, flags = _build_target()
        with build_lock(name):
            return load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                        verbose=os.environ.get("SKIPTRON_KERNEL_VERBOSE") == "1")
    except Exception as err:  # no compiler, no headers, a failed build: fall back, but say so
        warnings.warn(f"SRU++: the fused CPU recurrence could not be built ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}); using the PyTorch "
                      f"reference loop, which is much slower", RuntimeWarning, stacklevel=2)
        return None


class CpuKernel:
    """forward/backward on contiguous fp32/fp64 CPU tensors (the contract of `fused.Recurrence`)."""

    def __init__(self, module):
        self.module = module

    def forward(self, u, x, v, bias, c0):
        return self.module.forward(u, x, v, bias, c0)

    def backward(self, u, x, v, bias, c0, c, dh, dc_last):
        return self.module.backward(u, x, v, bias, c0, c, dh, dc_last)


def cpu_kernel() -> CpuKernel | None:
    module = extension()
    return None if module is None else CpuKernel(module)


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
