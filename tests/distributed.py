"""A pool of real gloo processes shared by many tests, so each test does not pay for a new process group.

`pool.run(fn, *args)` runs a module-level function on every rank and returns the per-rank results; an exception on
any rank fails the test with that rank's traceback. A pool whose ranks failed is rebuilt for the next test.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
import multiprocessing as mp

TIMEOUT_S = int(os.environ.get("SKIPTRON_TEST_TIMEOUT", "600"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            value = fn(*args, **kwargs)
            pickle.dumps(value)  # fail here, not silently in the queue's feeder thread
            results.put((rank, True, value))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    from skiptron.parallel.state import shutdown

    shutdown()


class DistPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.world_size)]
        self.procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self.tasks[r], self.results),
                                  daemon=True) for r in range(self.world_size)]
        for p in self.procs:
            p.start()
        self.healthy = True

    def run(self, fn, *args, **kwargs) -> list:
        if not self.healthy:
            self.close(force=True)
            self._start()
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, errors = [None] * self.world_size, []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=TIMEOUT_S)
                if ok:
                    out[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
                    self.healthy = False
                    break
        except Exception as err:  # a rank died or hung
            self.healthy = False
            errors.append(f"no answer from all ranks within {TIMEOUT_S}s: {err!r}")
        if errors:
            raise AssertionError("\n".join(errors))
        return out

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.kill()
