"""Memory accounting for the code paths that must hold only one rank's share of a model (construction, conversion).

`AllocationMeter` counts the tensor storages created while it is active and still alive, so a test can assert on
what the construction code itself allocated (its peak, and the largest single tensor) instead of on the process's
RSS, which other allocations and the allocator's caching blur. `peak_rss_bytes` is the process-wide high-water mark
the benchmark reports. `large_blocks_returned` keeps glibc from holding on to the transient whole tensors of those
paths; `host_blocks_reused` is the opposite policy, for the training step on the CPU.
"""
from __future__ import annotations

import contextlib
import ctypes

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationMeter(TorchDispatchMode):
    """Inside `with AllocationMeter() as meter:` every new tensor storage an op creates is counted (bytes) until it
    is freed, whichever code created it (ours, megatron-core's, DeepSpeed's). `peak` is the most bytes alive at
    once, `largest` the biggest single storage, `live` what is alive now; storages made before entering are not
    counted. Storages are tracked by their Python objects, which torch keeps alive exactly as long as the storage
    itself (storage PyObject preservation, torch 2.13.0), so a storage shared by views counts once and is freed
    when its last view goes."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._alive: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def _count(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self._alive or size == 0:
            return
        self._alive[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, size)
        weakref.finalize(storage, self._freed, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_id(v) for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and _storage_id(value) not in inputs:
                self._count(value)  # a view of an input (or an in-place result) allocated nothing new
        return out


def _storage_id(tensor: torch.Tensor) -> int | None:
    if tensor.device.type == "meta" or tensor.is_sparse:
        return None
    return id(tensor.untyped_storage())


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class AnonPeak:
    """`with AnonPeak() as anon:` samples this process's anonymous resident memory (RssAnon: what it allocated, not
    the page cache of files it maps) every `interval` seconds in a thread; `start` and `peak` in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._done = threading.Event()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, _status_bytes("RssAnon"))

    def __enter__(self):
        self.start = self.peak = _status_bytes("RssAnon")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))


def reset_peak_rss() -> None:
    """Start VmHWM over from the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) in bytes."""
    return _status_bytes("VmHWM")


def current_rss_bytes() -> int:
    """This process's resident set size now (VmRSS) in bytes."""
    return _status_bytes("VmRSS")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's own threshold adjustment stops (64-bit)
_GLIBC_MMAP_MAX = 65536  # glibc's default limit on the number of mmapped blocks
_MALLOPT_INT_MAX = 2**31 - 1


@contextlib.contextmanager
def large_blocks_returned(threshold: int = 64 * 2**10, reuse_after: bool = False):
    """Within this context, blocks of `threshold` bytes or more are mmapped, so freeing one returns it to the system.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB); blocks below it then come
    from the heap and stay in the process when freed. Code that builds or loads a model one whole parameter at a time
    would keep every freed transient parameter's pages (measured: ZeRO-3 construction at 350m peaked at 1590 MB RSS
    per rank with 622 MB allocated, 1059 MB with this). Afterwards, with `reuse_after`, host blocks are kept for
    reuse (`host_blocks_reused`, for training on the CPU); otherwise the thresholds are set where glibc's adjustment
    ends up (32 MiB, trimming at 64 MiB). Nothing happens where there is no glibc `mallopt`."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if reuse_after:
            host_blocks_reused()
        else:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
            mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)


def host_blocks_reused() -> None:
    """From now on every host block, however large, comes from the heap and stays in the process when freed (glibc:
    no mmap, no trimming), so the next step's buffers of the same sizes land on resident pages instead of fresh
    mappings whose every page faults in. For training on the CPU: DeepSpeed frees and reallocates its gradient
    buckets and flat gradient partition every step, and the logits and their gradient exceed glibc's 32 MiB mmap
    ceiling; faulting them in each step cost skiptron 23% of an 8 x 512 step on this VM (docs/benchmarks.md). The
    price: RSS stays at its high-water mark, which is higher, since torch's 64-byte-aligned requests rarely fit a
    freed block of their own size (peak RSS with a step at 350m +35%); `train.cpu_heap=release` opts out. Nothing
    happens where there is no glibc `mallopt`."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_MAX, 0)
        mallopt(_M_TRIM_THRESHOLD, _MALLOPT_INT_MAX)


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_MADV_DONTNEED = 4  # Linux
_PAGE = 4096


def release_file_pages(tensors: list[torch.Tensor]) -> int:
    """Drop this process's resident pages under `tensors`, views of privately memory-mapped files that were only
    read (torch.load(mmap=True)); touching them again reads them from the file. A tensor not wholly inside a private
    file mapping (allocated memory, whose contents madvise would zero) is left alone. Linux only (elsewhere nothing
    happens). Returns the bytes released."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or not tensors:
        return 0
    mappings = _private_file_mappings()
    released = 0
    for t in tensors:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in mappings):
            continue
        first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # the pages wholly inside the tensor
        if last > first and madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            released += last - first
    return released


def _private_file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of regular files (/proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0" and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges
