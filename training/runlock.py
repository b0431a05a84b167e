"""One writer per run directory: `<run.dir>/run.lock`, held by rank 0 of the job that trains there.

The lock is an exclusive `flock` on the file, which the kernel (and NFSv4, or Lustre mounted with `-o flock`)
releases when the holder dies, however it dies (SIGKILL, OOM, a lost node's lease). The file's content names the
holder (host, pid, SLURM job id or torchrun run id, start time) for the refusal message; a file left by a dead job
is not locked, so the next job takes it over and says whose it was. A finished job releases it; a rerun of a
finished run with the same run.dir takes it again and resumes.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory; the message names it."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "torchrun_run": os.environ.get("TORCHELASTIC_RUN_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(holder: dict) -> str:
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job"):
        parts.append(f"SLURM job {holder['slurm_job']}")
    if holder.get("torchrun_run"):
        parts.append(f"torchrun run {holder['torchrun_run']}")
    return ", ".join(parts) + f", since {holder.get('since')}"


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; raise RunDirBusy naming the live holder. Returns a note when a dead job's lock was
        taken over (None otherwise)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            if (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
                return None  # an earlier run of this same process that was never released (tests, notebooks)
            raise RunDirBusy(f"run.dir {self.path.parent} is in use by another job ({_describe(holder)}; lock "
                             f"{self.path}); stop that job or choose another run.dir") from None
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous and not previous.get("released"):
            return f"took over the lock of a job that is gone ({_describe(previous)})"
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({**_holder(), "released": True}).encode(), 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}
