"""Routed attention kernels against the boolean-mask SDPA call they replaced, in the same process.

    python -m skiptron.tools.bench_attention [--seq 1024] [--rate 0.5] [--heads 8] [--kv-heads 2] [--device cpu]

For one routed layer's attention (a batch of sequences, a fraction `rate` of each sequence's tokens selected) it
times forward + backward of: `kv: all` with the [b, n, s] mask (kernel `mask`, the call routed attention made
before), with the scattered-query causal kernel (`sdpa`) and, on CUDA, flex_attention (`flex`); `kv: active` with
the [b, n, n] mask it used to build and with `is_causal` on the packed rows (what it runs now). It prints milliseconds per call (median of `--repeat` rounds, the kernels interleaved in each round), each new
kernel's speed-up over its mask baseline (median of the per-round ratios) and the bytes the baseline's mask took.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from skiptron.training import attention


def _time_round_robin(calls: dict, repeat: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each call, `repeat` rounds, the kernels interleaved within a round so that a machine shared
    with other work slows baseline and candidate alike (the ratios are taken per round)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def run(seq: int, rate: float, heads: int, kv_heads: int, head_dim: int, batch: int, repeat: int,
        device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    n = max(int(seq * rate), 1)
    index = torch.stack([torch.randperm(seq, generator=g)[:n].sort().values for _ in range(batch)]).to(device)

    def leaf(h, length):
        return torch.randn(batch, h, length, head_dim, generator=g).to(device, dtype).requires_grad_()

    q, k, v = leaf(heads, n), leaf(kv_heads, seq), leaf(kv_heads, seq)
    qa, ka, va = leaf(heads, n), leaf(kv_heads, n), leaf(kv_heads, n)
    active_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)

    def step(out):
        out.float().sum().backward()

    calls = {
        "kv_all/mask (baseline)": lambda: step(attention.at_positions(q, index, k, v, "mask")),
        "kv_all/sdpa": lambda: step(attention.at_positions(q, index, k, v, "sdpa")),
        "kv_active/mask (baseline)": lambda: step(F.scaled_dot_product_attention(
            qa, ka, va, attn_mask=active_mask[:, None], enable_gqa=heads != kv_heads)),
        "kv_active/is_causal": lambda: step(attention.causal(qa, ka, va)),
    }
    if device.type == "cuda":
        calls["kv_all/flex"] = lambda: step(attention.at_positions(q, index, k, v, "flex"))
    times = _time_round_robin(calls, repeat, device)
    out = {name: statistics.median(t) for name, t in times.items()}
    for variant, new in (("kv_all", "sdpa"), ("kv_all", "flex"), ("kv_active", "is_causal")):
        if f"{variant}/{new}" in times:
            base = times[f"{variant}/mask (baseline)"]
            out[f"{variant}: {new} speed-up"] = statistics.median(b / t for b, t in zip(base, times[f"{variant}/{new}"]))
    out["kv_all/mask bytes"] = batch * n * seq
    out["kv_active/mask bytes"] = active_mask.numel()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024, help="sequence length s")
    p.add_argument("--rate", type=float, default=0.5, help="fraction of each sequence's tokens the router selects")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--batch", type=int, default=2, help="sequences per call")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per kernel (the median is printed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="tensor dtype")
    args = p.parse_args(argv)
    res = run(args.seq, args.rate, args.heads, args.kv_heads, args.head_dim, args.batch, args.repeat,
              torch.device(args.device), getattr(torch, args.dtype))
    for name, value in res.items():
        unit = "x" if "speed-up" in name else "" if "bytes" in name else " ms"
        print(f"{name:28s} {value:12.2f}{unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
