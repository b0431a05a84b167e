"""Stopping on a signal: SIGTERM / SIGUSR1 make the trainer save at the next step boundary and exit for a requeue."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving (EX_TEMPFAIL: "try again", i.e. requeue me).
EXIT_PREEMPTED = 75


class StopSignals:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit) request a stop.

    The handler only records the signal; `requested()` is called at step boundaries and agrees across all ranks
    (a max all-reduce), so every rank saves the same step and exits together even if only one got the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self) -> int | None:
        """The signal number if any rank got one (collective), else None."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


class Preempted(SystemExit):
    """Raised by `train()` after a signal-triggered save: the process exits with EXIT_PREEMPTED."""

    def __init__(self, signum: int, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.signum, self.step = signum, step
