"""C++ extensions that torch builds just in time (DeepSpeed's CPU communication op, skiptron's fused SRU++
recurrence), loaded under a lock that the kernel releases when its holder dies.

torch.utils.cpp_extension guards a build with a lock *file*, which a killed process (a preempted job, a timed-out test)
leaves behind; every later load of that extension on the machine then waits on it forever. Each load here first takes
an `flock` beside the build directory: whoever holds it knows no other skiptron process is loading that extension, so
a lock file found then is stale, and is removed (with a warning naming it) before torch looks at it.
"""
from __future__ import annotations

import contextlib
import fcntl
import warnings
from pathlib import Path


def build_directory(name: str) -> Path:
    """Where torch builds extension `name` (TORCH_EXTENSIONS_DIR or its default root, per Python/CUDA version). Uses
    torch.utils.cpp_extension's private `_get_build_directory` (checked with torch 2.13.0), which also creates it."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@contextlib.contextmanager
def build_lock(name: str):
    """Exclusive right to load (and if needed build) extension `name` on this machine; a stale torch lock is cleared."""
    directory = build_directory(name)
    with open(directory.parent / f"{name}.skiptron-lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                warnings.warn(f"removing {stale}: a build lock left by a process that died while building {name}",
                              RuntimeWarning, stacklevel=3)
                stale.unlink(missing_ok=True)
            yield directory
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_deepspeed_comm_op():
    """Load DeepSpeed's shared-memory communication op (its CPU accelerator builds it when its comm backend starts)
    under `build_lock`; DeepSpeed keeps loaded ops per process, so its own load is then a lookup. None elsewhere."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return None
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    with build_lock(builder.NAME):
        return builder.load(verbose=False)
