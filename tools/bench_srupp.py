"""`skiptron-bench-srupp`: the SRU++ recurrence, fused kernel against the PyTorch reference loop.

Times forward + backward of `sru_recurrence` (the hot spot of an SRU++ layer; the projections around it are ordinary
GEMMs) on random inputs at one shape, alternating the two implementations so machine noise hits both alike, and
prints the median times and the speed-up. Defaults: CPU, fp32, seq 512, batch 8, hidden 512. On a GPU
(`--device cuda --dtype bf16 --seq 2048 --batch 16 --hidden 2048`) the fused side is the Triton kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from skiptron.parallel.timing import synchronized_seconds
from skiptron.training import verbosity
from skiptron.training.kernels import available_impl, reference_recurrence, sru_recurrence

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(batch: int, seq: int, hidden: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()
    return make(batch, seq, 3, hidden), make(batch, seq, hidden), make(2, hidden, scale=0.5), make(2, hidden), \
        make(batch, hidden)


def time_once(fn, inputs, device: torch.device) -> float:
    """Seconds for one forward + backward through h and the last state."""
    for t in inputs:
        t.grad = None

    def run():
        h, c = fn(*inputs)
        (h.float().sum() + c.float().sum()).backward()
    return synchronized_seconds(run, device)


def parity(inputs) -> dict[str, float]:
    """Largest |fused - reference| of the outputs (h, last state) and of every input's gradient, relative to the
    reference's largest magnitude (so one tolerance fits fp32 and bf16)."""
    results = {}
    for name, fn in (("fused", sru_recurrence), ("reference", reference_recurrence)):
        for t in inputs:
            t.grad = None
        h, c = fn(*inputs)
        (h.float().sum() + 0.5 * c.float().sum()).backward()
        results[name] = {"h": h.detach().float(), "c": c.detach().float(),
                         **{f"grad_{n}": t.grad.float() for n, t in zip(("u", "x", "v", "bias", "c0"), inputs)}}
    return {k: ((results["fused"][k] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            for k, ref in results["reference"].items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-srupp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512, help="sequence length (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=512, help="hidden units of the recurrence (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each implementation (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); default: torch's")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    verbosity.add_argument(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Time both implementations; the result as a dict (what `--json` prints)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = _inputs(args.batch, args.seq, args.hidden, device, DTYPES[args.dtype])
    fused_impl = available_impl(device)
    if fused_impl == "reference":
        raise SystemExit(f"skiptron-bench-srupp: no fused kernel on {device} (see the warning above)")
    impls = {"fused": sru_recurrence, "reference": reference_recurrence}
    for fn in impls.values():  # warm-up: builds the extension, JIT-compiles the Triton kernel
        time_once(fn, inputs, device)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            times[name].append(time_once(fn, inputs, device))
    fused, ref = (statistics.median(times[name]) for name in impls)
    return {"relative_error": parity(inputs),"seq": args.seq, "batch": args.batch, "hidden": args.hidden, "device": str(device), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "fused_impl": fused_impl, "repeats": args.repeats,
            "fused_ms": fused * 1e3, "reference_ms": ref * 1e3, "speedup": ref / fused}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        r = result
        print(f"SRU++ recurrence forward+backward, seq {r['seq']} x batch {r['batch']} x hidden {r['hidden']}, "
              f"{r['dtype']} on {r['device']} ({r['threads']} threads), median of {r['repeats']}:")
        print(f"  fused ({r['fused_impl']}){'':<8} {r['fused_ms']:10.1f} ms")
        print(f"  reference loop   {r['reference_ms']:10.1f} ms")
        print(f"  speed-up         {r['speedup']:10.1f}x")
        print(f"  largest relative error fused vs reference (outputs, gradients): "
              f"{max(r['relative_error'].values()):.2e}")


if __name__ == "__main__":
    main()
