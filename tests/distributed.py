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
        torch.use_deterministic_algorithms(False)  # a run's train.deterministic is process-wide: not for the next test
    from skiptron.parallel.state import shutdown

    shutdown()


def one_tensor_gather() -> str:
    """The name of torch's all-gather into one tensor, as `skiptron.parallel.state.all_gather_tensor` resolves it:
    tests patch that name to count the calls."""
    import torch.distributed as dist

    return "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


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


# -- device placement of collective inputs ------------------------------------------------------------------------
# NCCL takes CUDA tensors only, so on GPUs every tensor handed to a collective must live on the layout's device. On
# CPU (gloo) a tensor made without `device=` is on the right device by accident, so placement bugs stay invisible.
# `collective_device_check` makes them visible: a torch function mode tags every tensor that a factory call
# (torch.tensor, zeros, arange, ...) in skiptron's own code creates without an explicit device (the tag, its call site,
# follows it through ops whose tensor inputs all carry it: clone, stack, cat, arithmetic, ...; an explicit
# `.to(device)` / `.cuda()` clears it), and torch.distributed's collectives refuse any tagged tensor, naming where it was
# made and which collective got it. On a GPU the same tensor would have been a CPU tensor handed to NCCL.
import contextlib  # noqa: E402
import sys  # noqa: E402

_FACTORIES = ("tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
              "rand", "randn", "randint", "randperm", "from_numpy")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "all_to_all", "all_to_all_single", "broadcast", "reduce", "scatter", "gather", "send", "recv", "isend",
                "irecv", "all_gather_single", "reduce_scatter_single")
_TAG = "_skiptron_host_origin"


def _tensors(obj):
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
    else:
        import torch

        if isinstance(obj, torch.Tensor):
            yield obj


def _skiptron_roots() -> tuple[str, ...]:
    import skiptron.parallel
    import skiptron.tools
    import skiptron.training

    return tuple(os.path.dirname(m.__file__) + os.sep for m in (skiptron.parallel, skiptron.training, skiptron.tools))


@contextlib.contextmanager
def collective_device_check(extra_roots: tuple[str, ...] = ()):
    """Within the block, a collective given a tensor that skiptron's code created without `device=` raises
    AssertionError naming the tensor's creation site and the collective (see the notes above)."""
    import torch
    import torch.distributed as dist
    from torch.overrides import TorchFunctionMode

    roots = _skiptron_roots() + tuple(os.path.abspath(r) + os.sep for r in extra_roots)
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    factories = {getattr(torch, name) for name in _FACTORIES}
    moves = {torch.Tensor.to, torch.Tensor.cuda}

    def project_caller() -> str | None:
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(torch_dir)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(roots):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        return None

    def tag(out, origin: str):
        for t in _tensors(out):
            setattr(t, _TAG, origin)

    class Tracker(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in factories:
                if kwargs.get("device") is None and (origin := project_caller()):
                    tag(out, origin)
                return out
            if func in moves and (func is torch.Tensor.cuda or "device" in kwargs or any(
                    isinstance(a, (str, torch.device)) or isinstance(a, torch.Tensor) for a in args[1:])):
                if getattr(out, _TAG, None):  # on CPU `.to("cpu")` returns the tensor itself
                    setattr(out, _TAG, None)
                return out  # an explicit move: placed by the caller
            inputs = list(_tensors((args, kwargs)))
            origins = [getattr(t, _TAG, None) for t in inputs]
            if inputs and all(origins):
                tag(out, origins[0])
            return out

    def guarded(name, fn):
        def collective(*args, **kwargs):
            for t in _tensors((args, kwargs)):
                origin = getattr(t, _TAG, None)
                if origin:
                    caller = sys._getframe(1)
                    raise AssertionError(
                        f"torch.distributed.{name} got a tensor created without device= at {origin} (called from "
                        f"{caller.f_code.co_filename}:{caller.f_lineno}); on NCCL it would be a CPU tensor: create it "
                        f"on the layout's device")
            return fn(*args, **kwargs)
        return collective

    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
    for name, fn in originals.items():
        setattr(dist, name, guarded(name, fn))
    try:
        with Tracker():
            yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def under_device_check(fn, *args, extra_roots: tuple[str, ...] = (), **kwargs):
    """fn(*args, **kwargs) inside `collective_device_check` (module-level, so a pool can run it)."""
    with collective_device_check(extra_roots):
        return fn(*args, **kwargs)
