"""Device-aware wall-clock timing of regions of work.

On a GPU, `time.perf_counter()` around a region measures how long the host took to launch its kernels, not how long
they ran. `Stopwatch` times each region with a pair of CUDA events recorded on the current stream and reads them only
when asked (`take()`: one synchronize for all pending regions), so timing a region adds no host synchronization to
it. On CPUs (and any other device) regions are timed with `perf_counter`, which there is the work's own time.

    watch = Stopwatch(device)
    with watch.region("exchange"):
        ...
    watch.take()                    # {"exchange": seconds}, and resets

`synchronized_seconds(fn, device)` is the blocking form for benchmarks: the device is drained before and after.
"""
from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["Stopwatch", "synchronize", "synchronized_seconds"]


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished all queued work (nothing to do on CPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized_seconds(fn, device: torch.device) -> float:
    """Seconds `fn()` takes on `device`, the device drained before and after (for benchmarks, not the training loop)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class Stopwatch:
    """Accumulates the time of named regions on one device; `take()` returns {name: seconds} and starts over."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._pending: list[tuple[str, object, object]] = []  # CUDA: (name, start event, end event)
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def region(self, name: str):
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, time.perf_counter() - start)

    def _add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """Seconds per region name since the last `take()` (CUDA: waits for the recorded regions to finish)."""
        if self._pending:
            for name, start, end in self._pending:
                end.synchronize()
                self._add(name, start.elapsed_time(end) / 1e3)
            self._pending = []
        out, self._seconds = self._seconds, {}
        return out
