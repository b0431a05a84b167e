"""Pre-flight health check: per-rank matmul throughput, and all-reduce / all-to-all bandwidth over the real groups.

A synchronous job runs at the pace of its slowest rank: one throttled GPU, a node with a degraded link or a wrong
NCCL transport costs every step of a multi-day run. Measured for a few seconds before the model is built, the slow
ranks (and the groups they slow down) are named in the log instead of being inferred later from a low MFU.
The check reports and never stops the run: deciding whether a 30% slower node is acceptable is the user's call.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from . import launch
from .timing import synchronized_seconds

# Sizes that take well under a second per measurement: small on CPU (tests, rehearsals), realistic on GPUs.
SIZES = {"cpu": {"matmul": 256, "comm_bytes": 1 << 20, "iters": 3},
         "cuda": {"matmul": 8192, "comm_bytes": 256 << 20, "iters": 10}}


@dataclass(frozen=True)
class Measure:
    """One rank's number for one test; `group` holds the ranks that took part (one rank for a matmul)."""

    test: str  # matmul_tflops | allreduce_<group>_gbps | alltoall_<group>_gbps
    rank: int
    host: str
    group: tuple[int, ...]
    value: float


def _seconds(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up: first NCCL call sets up the communicator, first matmul picks a kernel
    return synchronized_seconds(lambda: [fn() for _ in range(iters)], device) / iters


def matmul_tflops(device: torch.device, n: int, iters: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _seconds(lambda: a @ b, iters, device) / 1e12


def allreduce_gbps(group, device: torch.device, nbytes: int, iters: int) -> float:
    """Bus bandwidth (NCCL-tests' definition: bytes x 2(n-1)/n per second), comparable across group sizes."""
    n = dist.get_world_size(group)
    x = torch.ones(nbytes // 4, device=device)
    t = _seconds(lambda: dist.all_reduce(x, group=group), iters, device)
    return nbytes * 2 * (n - 1) / n / t / 1e9


def alltoall_gbps(group, device: torch.device, nbytes: int, iters: int) -> float:
    n = dist.get_world_size(group)
    count = nbytes // 4 // n * n
    x, y = torch.ones(count, device=device), torch.empty(count, device=device)
    t = _seconds(lambda: dist.all_to_all_single(y, x, group=group), iters, device)
    return count * 4 * (n - 1) / n / t / 1e9


def _groups() -> dict[str, object]:
    """The groups training communicates over (size > 1 only): DP for gradients and token balancing, TP inside
    layers."""
    groups = {"dp": ps.get_data_parallel_group(), "tp": ps.get_tensor_model_parallel_group()}
    return {name: g for name, g in groups.items() if dist.get_world_size(g) > 1}


def measure(device: torch.device, host: str | None = None) -> list[Measure]:
    """This rank's measurements (collective: every rank calls it)."""
    size = SIZES["cuda" if device.type == "cuda" else "cpu"]
    rank, host = dist.get_rank(), host or launch.current().host
    out = [Measure("matmul_tflops", rank, host, (rank,), matmul_tflops(device, size["matmul"], size["iters"]))]
    for name, group in _groups().items():
        members = tuple(dist.get_process_group_ranks(group))
        for test, fn in (("allreduce", allreduce_gbps), ("alltoall", alltoall_gbps)):
            if test == "alltoall" and name != "dp":
                continue  # all-to-all runs over DP only (the token balancer)
            value = fn(group, device, size["comm_bytes"], size["iters"])
            out.append(Measure(f"{test}_{name}_gbps", rank, host, members, value))
    return out


def summarize(measures: list[Measure], outlier_ratio: float) -> tuple[list[str], list[str]]:
    """Lines for the log and the outliers: for each test, the median over ranks (matmul) or groups (collectives,
    averaged over their members), and every rank or group below `outlier_ratio` x the median."""
    lines, outliers = [], []
    for test in sorted({m.test for m in measures}):
        by_group: dict[tuple[int, ...], list[Measure]] = {}
        for m in measures:
            if m.test == test:
                by_group.setdefault(m.group, []).append(m)
        values = {g: statistics.fmean(m.value for m in ms) for g, ms in by_group.items()}
        median = statistics.median(values.values())
        lines.append(f"{test}: median {median:.3g}, min {min(values.values()):.3g}, max {max(values.values()):.3g} "
                     f"over {len(values)} {'ranks' if test.startswith('matmul') else 'groups'}")
        for group, value in sorted(values.items()):
            if value < outlier_ratio * median:
                hosts = sorted({m.host for m in by_group[group]})
                who = f"rank {group[0]}" if len(group) == 1 else f"group of ranks {list(group)}"
                outliers.append(f"{test}: {who} on {', '.join(hosts)}: {value:.3g} = {value / median:.2f} x median")
    return lines, outliers


def preflight(device: torch.device, outlier_ratio: float = 0.7, host: str | None = None) -> list[str]:
    """Measure on every rank, gather, and log the summary and the outliers on rank 0. Returns the outlier lines
    (on every rank, so callers may act on them alike)."""
    start = time.perf_counter()
    mine = measure(device, host)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    lines, outliers = summarize([m for ms in gathered for m in ms], outlier_ratio)
    if dist.get_rank() == 0:
        print(f"[health] pre-flight check over {dist.get_world_size()} ranks "
              f"({time.perf_counter() - start:.1f}s, launch.health_check=false skips it)", flush=True)
        for line in lines:
            print(f"[health]   {line}", flush=True)
        for line in outliers:
            print(f"[health] OUTLIER {line}", flush=True)
    return outliers
