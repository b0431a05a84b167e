"""`python -m skiptron.training.kernels`: build the just-in-time C++ extensions once, in one process, before a job or
the test suite starts many processes that would each wait on the first build (about a minute each on 2 cores)."""
from __future__ import annotations

import sys
import time


def main() -> int:
    from skiptron.parallel.extensions import load_deepspeed_comm_op

    from . import cpu

    start = time.perf_counter()
    built = {"DeepSpeed CPU comm op": load_deepspeed_comm_op(), "SRU++ CPU recurrence": cpu.extension()}
    for name, module in built.items():
        print(f"skiptron kernels: {name}: {'ready' if module is not None else 'not available here'}", file=sys.stderr)
    print(f"skiptron kernels: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
