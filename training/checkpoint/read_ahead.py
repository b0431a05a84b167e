"""Reading ahead under a memory bound: while the caller applies one item, a background thread prepares the next
ones (reading memory-mapped files and joining shards release the GIL), and what it has prepared that the caller has
not taken yet stays within a byte budget, so overlap never costs more memory than the caller allowed."""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

Item, Value = TypeVar("Item"), TypeVar("Value")
DEFAULT_BUCKET_MB = 256


def default_bucket_bytes(local_ranks: int) -> int:
    """`DEFAULT_BUCKET_MB` when this rank has a core its compute threads leave free (this process's cores shared by
    the `local_ranks` on the host), else 0: a reader thread on busy cores only competes with the compute (measured
    in docs/benchmarks.md: 2 ranks on 2 cores resharded 350m 2.2x slower with it, one rank on 2 cores 1.8x faster)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return DEFAULT_BUCKET_MB * 2**20 if cores // max(local_ranks, 1) > torch.get_num_threads() else 0


def read_ahead(items: Sequence[Item], load: Callable[[Item], Value], nbytes: Callable[[Item], int],
               bucket_bytes: int) -> Iterator[Value]:
    """`load(item)` for each of `items`, in order.

    With `bucket_bytes` > 0 one background thread loads ahead while the items loaded (or being loaded) and not yet
    taken fit in `bucket_bytes` by `nbytes`; it may always load the next item when none is waiting, so an item
    larger than the bucket passes alone. The caller holds the item it took besides: at most max(bucket, largest
    item) + one item alive, if the caller drops each item before taking the next. With 0, each item is loaded when
    taken, in the caller's thread (one item alive)."""
    if bucket_bytes <= 0:
        for item in items:
            yield load(item)
        return
    ready: queue.Queue = queue.Queue()
    budget = threading.Condition()
    pending = [0]  # bytes loaded or being loaded, not yet taken
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                size = nbytes(item)
                with budget:
                    budget.wait_for(lambda: stop.is_set() or not pending[0] or pending[0] + size <= bucket_bytes)
                    if stop.is_set():
                        return
                    pending[0] += size
                ready.put((load(item), size, None))
        except BaseException as err:  # handed to the caller, which raises it
            ready.put((None, 0, err))

    thread = threading.Thread(target=produce, name="skiptron-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in items:
            value, size, err = ready.get()
            if err is not None:
                raise err
            with budget:
                pending[0] -= size
                budget.notify_all()
            yield value
            value = None  # not kept alive here while the next one is awaited
    finally:
        stop.set()
        with budget:
            budget.notify_all()
        thread.join()
