"""A watchdog that bounds how long a job outlives a dead or stalled rank.

Without it, survivors of a dead rank wait inside their next collective: gloo notices a closed socket at once, but
NCCL, a lost node (no TCP reset) or a rank that is alive and stuck (data loading, a deadlock) hold every other rank
until `parallel.init_timeout_s` (600 s) or the allocation's time limit, and the error names nobody.

Every rank runs a daemon thread that writes a heartbeat to the rendezvous store every `interval` seconds: a beat
counter (alive), a progress counter the training loop advances at each phase of a step (progressing), the step and
phase, host and pid. Rank 0's thread reads all heartbeats and judges with its own clock (no clock sync needed):

    dead      the beat counter has not changed for `timeout` s (the process, or its node, is gone); once any rank
              reported a communication error, 3 intervals suffice: a live rank beats every interval
    stalled   alive, but the progress counter has not changed for `timeout` s while stall checks are on (they are
              off during start-up until the first step completes, and during checkpoint saves); the least advanced
              rank is named (the others wait for it in a collective)

Rank 1 watches rank 0's heartbeat (rank 0 may die while the store survives, e.g. torchrun's agent store); when the
store itself is gone (it lives in rank 0 outside torchrun) rank 1 reports rank 0 as unreachable. The one rank that
judges prints a single line naming the rank, host, step and phase, publishes it in the store, and every rank that
reads it ends its process (and its data-loader workers) with EXIT_RANK_FAILED, also when blocked in a collective.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

# Exit code of every rank ended by the watchdog (a peer died or stalled, or this rank stalled).
EXIT_RANK_FAILED = 76
_STORE_FAILURES_BEFORE_VERDICT = 3


@dataclass
class _Seen:
    """What the judge last saw of one rank, timed with the judge's own monotonic clock."""

    beat: int = -1
    progress: int = -1
    beat_at: float = field(default_factory=time.monotonic)
    progress_at: float = field(default_factory=time.monotonic)
    record: dict = field(default_factory=dict)


class Watchdog:
    """Heartbeats, progress marks and the judge for one training run (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float,
                 run_id: str, host: str | None = None, interval_s: float | None = None):
        self.rank, self.world_size = rank, world_size
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or max(0.5, min(5.0, self.timeout_s / 6))
        self.host = host or socket.gethostname()
        self.prefix = f"skiptron/watchdog/{run_id}"
        self._addr = (master_addr, master_port)
        self._step, self._phase, self._progress, self._stall_checks = 0, "start-up", 0, False
        self._errors_seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    # -- called by the training loop ----------------------------------------------------------------------------
    def start(self) -> "Watchdog":
        import datetime

        import torch.distributed as dist

        # A client of its own: the process group's store connection stays the main thread's.
        self._store = dist.TCPStore(self._addr[0], self._addr[1], is_master=False, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=max(5.0, self.interval_s * 2)))
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="skiptron-watchdog", daemon=True)
        self._thread.start()
        return self

    def progress(self, step: int, phase: str) -> None:
        """The loop reached `phase` of `step` (each call counts as progress)."""
        self._step, self._phase = step, phase
        self._progress += 1

    def stall_checks(self, on: bool) -> None:
        """Judge this rank's progress from now on (the trainer turns it on once the first step is done: start-up,
        compilation and the first step may take longer than the timeout)."""
        self._stall_checks = on

    @contextmanager
    def paused(self, phase: str):
        """No stall check inside (a checkpoint save may take longer than the timeout); dead ranks still count."""
        previous, self._stall_checks = self._stall_checks, False
        self.progress(self._step, phase)
        yield  # on an exception the phase stays: the verdict names where the job was
        self._stall_checks = previous
        self.progress(self._step, "train")

    def communication_failed(self, err: BaseException) -> None:
        """A collective raised on this rank (a peer's socket closed, a timeout): report it and wait for the judge's
        verdict, which ends this process. Returns only if no verdict came within the timeout."""
        if self._store is None:
            return
        try:
            self._store.set(f"{self.prefix}/error/{self.rank}", f"step {self._step}: {str(err).splitlines()[0]}")
        except Exception:  # the store is gone too: the loop's next beat judges that
            pass
        deadline = time.monotonic() + self.timeout_s + 4 * self.interval_s
        while time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            time.sleep(0.2)

    def stop(self, clean: bool = True) -> None:
        """Stop the thread; a clean end also marks this rank done (no longer judged). After an unclean one the
        heartbeat just stops, and the judge names this rank once its peers fail on it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 4)
        if clean:
            try:
                self._publish(done=True)
            except Exception:
                pass
        self._thread = None

    # -- the thread ------------------------------------------------------------------------------------------------
    def _publish(self, done: bool = False) -> None:
        self._beat = getattr(self, "_beat", 0) + 1
        record = {"beat": self._beat, "progress": self._progress, "step": self._step, "phase": self._phase,
                  "stall_checks": self._stall_checks, "host": self.host, "pid": os.getpid(), "done": done}
        self._store.set(f"{self.prefix}/hb/{self.rank}", json.dumps(record))

    def _loop(self) -> None:
        seen: dict[int, _Seen] = {}
        store_failures = 0
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                verdict = self._store.get(f"{self.prefix}/verdict") if self._store.check(
                    [f"{self.prefix}/verdict"]) else None
                if verdict is None:
                    watched = range(self.world_size) if self.rank == 0 else [0] if self.rank == 1 else []
                    verdict = self._judge(seen, watched)
                    if verdict and self._claim():
                        print(f"[watchdog] {verdict}", file=sys.stderr, flush=True)
                        self._store.set(f"{self.prefix}/verdict", verdict)
                        self._wait_for_acknowledgements(seen)
                else:
                    self._store.add(f"{self.prefix}/verdict_read", 1)
                store_failures = 0
            except Exception as err:  # the store (hosted by rank 0 outside torchrun) stopped answering
                store_failures += 1
                if store_failures < _STORE_FAILURES_BEFORE_VERDICT:
                    continue
                if self.rank == 1:
                    print(f"[watchdog] rank 0 (the rendezvous store at {self._addr[0]}:{self._addr[1]}) is "
                          f"unreachable since step {self._step} ({str(err).splitlines()[0]}): it died or its node "
                          f"was lost; ending the job", file=sys.stderr, flush=True)
                _end_process()
            if verdict is not None:
                _end_process()

    def _wait_for_acknowledgements(self, seen: dict[int, _Seen]) -> None:
        """Keep the store (hosted by rank 0 outside torchrun) up until the live ranks (heartbeat seen within two
        intervals) have read the verdict."""
        now = time.monotonic()
        live = sum(1 for r, s in seen.items() if r != self.rank and now - s.beat_at < 2 * self.interval_s)
        deadline = time.monotonic() + 3 * self.interval_s
        while time.monotonic() < deadline and self._store.add(f"{self.prefix}/verdict_read", 0) < live:
            time.sleep(0.1)

    def _claim(self) -> bool:
        """Only the first judge to decide prints the verdict."""
        return self._store.add(f"{self.prefix}/verdict_claims", 1) == 1

    def _judge(self, seen: dict[int, _Seen], watched) -> str | None:
        keys = [f"{self.prefix}/hb/{r}" for r in watched]
        if not keys:
            return None
        now = time.monotonic()
        present = [r for r, key in zip(watched, keys) if self._store.check([key])]
        records = dict(zip(present, (json.loads(v) for v in self._store.multi_get(
            [f"{self.prefix}/hb/{r}" for r in present])))) if present else {}
        errors = self._reported_errors()
        dead_after = 3 * self.interval_s if errors else self.timeout_s
        for r in watched:
            s = seen.setdefault(r, _Seen())
            rec = records.get(r)
            if rec is None:
                if now - s.beat_at > max(self.timeout_s, 3 * self.interval_s):  # never signed in
                    return f"rank {r} never sent a heartbeat within {self.timeout_s:.0f}s; ending the job"
                continue
            if rec["done"]:
                s.beat_at = s.progress_at = now
                continue
            if rec["beat"] != s.beat:
                s.beat, s.beat_at = rec["beat"], now
            if rec["progress"] != s.progress or not rec["stall_checks"]:
                s.progress, s.progress_at = rec["progress"], now
            s.record = rec
        live = {r: s for r, s in seen.items() if s.record and not s.record.get("done")}
        for r, s in sorted(live.items()):
            if now - s.beat_at > dead_after:
                why = (f"after {_name_errors(errors)}" if errors else
                       f"launch.collective_timeout_s={self.timeout_s:.0f}")
                return (f"rank {r} on {s.record['host']} (pid {s.record['pid']}) died at step {self._step} during "
                        f"{self._phase} (as seen from rank {self.rank}; its last heartbeat: step {s.record['step']}, "
                        f"{s.record['phase']}, {now - s.beat_at:.0f}s ago; {why}); ending the job")
        if self.rank != 0:  # the deputy watches rank 0's life only: stalls are judged with every rank in view
            return None
        stalled = {}
        if any(now - s.progress_at > self.timeout_s for s in live.values()):
            # heartbeats arrive up to an interval late: a rank that stopped first may have been seen stopping later
            stalled = {r: s for r, s in live.items() if now - s.progress_at > self.timeout_s - 3 * self.interval_s}
        if stalled:
            least = min(s.record["progress"] for s in stalled.values())
            culprits = sorted(r for r, s in stalled.items() if s.record["progress"] == least)
            s = stalled[culprits[0]]
            who = (f"rank {culprits[0]} on {s.record['host']} (pid {s.record['pid']})" if len(culprits) == 1 else
                   f"ranks {', '.join(map(str, culprits))} (a hung collective?)")
            marks = ", ".join(f"rank {r}: {v.record['progress']}" for r, v in sorted(live.items()))
            return (f"{who} stopped making progress at step {s.record['step']} during {s.record['phase']}: "
                    f"nothing for {now - s.progress_at:.0f}s (launch.collective_timeout_s={self.timeout_s:.0f}; "
                    f"progress marks {marks}); ending the job")
        if errors and all(now - s.progress_at > self.timeout_s for s in live.values()):
            return f"{_name_errors(errors)} and no rank is missing; ending the job"
        return None

    def _reported_errors(self) -> dict[int, str]:
        for r in range(self.world_size):
            if r not in self._errors_seen and self._store.check([f"{self.prefix}/error/{r}"]):
                self._errors_seen[r] = self._store.get(f"{self.prefix}/error/{r}").decode()
        return self._errors_seen


def is_communication_error(err: BaseException) -> bool:
    """A collective failed (torch's DistError, a gloo/NCCL transport error), here or in what caused `err`."""
    import torch.distributed as dist

    markers = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "timeout")
    while err is not None:
        if isinstance(err, dist.DistError) or any(m in str(err).lower() for m in markers):
            return True
        err = err.__cause__ or err.__context__
    return False


def _name_errors(errors: dict[int, str]) -> str:
    r = min(errors)
    more = f" (and {len(errors) - 1} more ranks)" if len(errors) > 1 else ""
    return f"rank {r} saw a communication error{more} at {errors[r]}"


def _end_process() -> None:
    """End this rank now, from the watchdog thread: the main thread may be blocked in a collective for minutes."""
    import multiprocessing

    for child in multiprocessing.active_children():  # data-loader workers: no orphans
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_RANK_FAILED)


def start(timeout_s: float, step: int = 0) -> Watchdog | None:
    """A started watchdog for this process's rank in the current world (collective), None for a single process."""
    import time as _time

    import torch.distributed as dist

    from . import launch

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    run_id = [f"{_time.time_ns():x}"]
    dist.broadcast_object_list(run_id, src=0)  # heartbeats of an earlier run on the same store never count
    info = launch.current()
    dog = Watchdog(dist.get_rank(), dist.get_world_size(), os.environ.get("MASTER_ADDR", info.master_addr),
                   int(os.environ.get("MASTER_PORT", info.master_port)), timeout_s, run_id[0], host=info.host)
    dog._step = step
    return dog.start()
