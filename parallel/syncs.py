"""Reads of device values by the host: each one makes a GPU's host wait until the device has caught up, so the host
stops running ahead of the kernels and the device idles while the next ones are launched.

`host_reads()` collects them for the code run inside it, by name and caller: the aten ops that must read a device
value to return (`nonzero`'s size, `.item()`, ...) and `Tensor.tolist`. The same count on any device, so the CPU
test suite checks what a GPU would pay; on CUDA, `cuda_synchronizations()` is torch's own account (its sync debug
mode).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose output shape or value the host must read from the device (torch 2.13); bincount reads its input's
# largest value to size its output (on CUDA: `.item()` inside the op, which the CPU's kernel does not show)
READING_OPS = frozenset({"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique2", "unique_dim",
                         "unique_consecutive", "repeat_interleave", "bincount"})


class Read(NamedTuple):
    op: str  # the aten op, or "tolist"
    caller: str  # "path:line" of the innermost frame outside torch


def _caller() -> str:
    frame = sys._getframe(1)
    torch_dir = f"{os.sep}torch{os.sep}"
    while frame is not None and (torch_dir in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _Reads(TorchDispatchMode):
    """Sees every aten op below Python (`torch.utils._python_dispatch` is private: checked against torch 2.13)."""

    def __init__(self, reads: list[Read]):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in READING_OPS:
            self.reads.append(Read(name, _caller()))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads() -> Iterator[list[Read]]:
    """The reads made inside, in order. `Tensor.tolist` does not pass through torch's dispatcher, so it is wrapped
    for the duration (not thread-safe: a diagnostic for tests and checks)."""
    reads: list[Read] = []
    tolist = torch.Tensor.tolist

    def read_list(tensor):
        reads.append(Read("tolist", _caller()))
        return tolist(tensor)

    torch.Tensor.tolist = read_list
    try:
        with _Reads(reads):
            yield reads
    finally:
        torch.Tensor.tolist = tolist


@contextlib.contextmanager
def cuda_synchronizations() -> Iterator[list[str]]:
    """The synchronizing CUDA operations torch reports inside (`torch.cuda.set_sync_debug_mode`), as messages."""
    found: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))
