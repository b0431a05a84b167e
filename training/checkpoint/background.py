"""At most one checkpoint save in flight on a background thread (`checkpoint.async_save`).

The step pays for the host snapshot (staging.py); the thread writes, fsyncs, hashes and publishes. Its collectives run
on a gloo group of its own, so they never interleave with the step's collectives on the main thread's groups, and
they use host tensors whatever the training device.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from .staging import HostStaging


class BackgroundSaves:
    def __init__(self, timeout_s: float):
        self.staging = HostStaging()
        self._timeout = timedelta(seconds=timeout_s)
        self._group = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-save")
        self._pending: tuple[int, Future] | None = None

    def submit(self, step: int, job: Callable) -> None:
        """Run `job(group)` (the save of `step`) in the background; the caller has waited for the previous one.
        Collective the first time: every rank creates the save's process group."""
        if self._pending is not None:
            raise RuntimeError("a checkpoint save is already in flight; wait() for it first")
        if self._group is None and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo", timeout=self._timeout)
        self._pending = (step, self._pool.submit(job, self._group))

    def busy(self) -> bool:
        """A save is still being written (without waiting for it)."""
        return self._pending is not None and not self._pending[1].done()

    def wait(self) -> int | None:
        """Block until the save in flight has been published and return its step (None: none was in flight).
        Raises the save's error (the same CheckpointError on every rank); the previous checkpoint is then `latest`."""
        if self._pending is None:
            return None
        (step, future), self._pending = self._pending, None
        try:
            future.result()
        finally:
            self.staging.release()
        return step
