"""`skiptron-bench-pipeline`: pipeline step time and measured bubble against the 1F1B model, and memory per stage.

For each pipeline size p (`--pp`, default 2 and 4) and micro-batch count m (`--micro-batches`, default 1 2 4 8) it
starts p fresh processes itself (gloo on CPU, nccl with one GPU per process; TP = DP = 1), builds the pipeline engine
and times `--steps` train steps on random tokens after `--warmup`. Per (p, m) it prints

    step time        median over the timed steps of the slowest rank's wall time
    bubble           measured: each stage's idle share of the pipelined phase (the trainer's `pipe/bubble`, from
                     DeepSpeed's instruction timings: 1 - forward+backward time / schedule time), mean over stages
    model            the 1F1B bubble (p-1)/(m+p-1) of equal stages with free communication
    memory           per stage: peak RSS of the process (CPU; peak allocated on GPU) and, on CPU, the peak RSS minus
                     the RSS before the model was built (what the model, optimizer, activations and buffers added)

Fresh processes per (p, m) keep each peak RSS its own. With more processes than cores (p = 4 on a 2-core machine) the
stages time-share the cores: compare measured bubbles with the model, not raw step times across p.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

from skiptron.tools.results import write_json
from skiptron.training import verbosity

PER_STAGE = ("peak_mib", "added_mib", "params_m")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(rank: int, pp: int, m: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(pp),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(pp))
    import torch
    import torch.distributed as dist

    from skiptron.parallel import state
    from skiptron.parallel.timing import synchronized_seconds
    from skiptron.training.config import load_config
    from skiptron.training.engine import build_engine
    from skiptron.training.trainer import Trainer, build_model, seed_everything

    torch.set_num_threads(args.threads)
    device, _ = state.init_world("auto")
    mb = args.micro_batch_size
    cfg = load_config(args.config, list(args.overrides) + [
        f"parallel.pp={pp}", f"train.micro_batch_size={mb}", f"train.global_batch_size={m * mb}"])
    layout = state.init_model_parallel(1, pp, device)
    seed_everything(cfg.train.seed)
    before = _rss_mib()
    engine, precision = build_engine(cfg, build_model(cfg, args.vocab_size, layout.device), layout)
    trainer = Trainer(cfg, layout, engine, precision, args.vocab_size, manifest={})
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, args.vocab_size, (mb, cfg.model.seq_len + 1), generator=g).to(device)
               for _ in range(m)]
    step_s, bubbles = [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        seconds = synchronized_seconds(lambda: trainer.train_step(iter(batches)), device)
        elapsed = torch.tensor(seconds, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        metrics = trainer.stage_metrics()  # collective; resets the bubble timers
        if i >= args.warmup:
            step_s.append(elapsed.item())
            bubbles.append([metrics[f"pipe/bubble/S{s}"] for s in range(pp)])
    peak = metrics[f"mem/S{layout.pp_rank}_gb"] * 1024
    mine = {"peak_mib": peak, "added_mib": peak - before if device.type == "cpu" else float("nan"),
            "params_m": sum(p.numel() for p in engine.module.parameters()) / 1e6}
    stages = [None] * pp
    dist.all_gather_object(stages, mine)
    if rank == 0:
        results.put({"pp": pp, "m": m, "step_s": statistics.median(step_s),
                     "bubble_per_stage": [statistics.mean(b[s] for b in bubbles) for s in range(pp)],
                     "bubble": statistics.mean(statistics.mean(b) for b in bubbles),
                     "model": (pp - 1) / (m + pp - 1), "stages": stages})
    state.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(pp: int, m: int, args) -> dict:
    """One (p, m) measurement in p fresh processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, pp, m, args, port, results)) for r in range(pp)]
    for p in procs:
        p.start()
    try:
        out = results.get(timeout=args.timeout)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"skiptron-bench-pipeline: pp={pp} m={m}: a worker exited with {[p.exitcode for p in procs]}")
    return out


def table(rows: list[dict]) -> str:
    lines = ["| p | m | step time | bubble measured (per stage) | model (p-1)/(m+p-1) | peak RSS MiB per stage | "
             "added MiB per stage | params per stage |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        per = " / ".join(f"{b:.2f}" for b in r["bubble_per_stage"])
        mem = {k: " / ".join(f"{s[k]:.0f}" if k != "params_m" else f"{s[k]:.2f}M" for s in r["stages"])
               for k in PER_STAGE}
        lines.append(f"| {r['pp']} | {r['m']} | {r['step_s'] * 1e3:.0f} ms | {r['bubble']:.2f} ({per}) | "
                     f"{r['model']:.2f} | {mem['peak_mib']} | {mem['added_mib']} | {mem['params_m']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny, 125m, 350m, 1.3b, 6.7b)")
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline sizes to measure (default: %(default)s)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="micro-batches per step to measure (default: %(default)s)")
    p.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=1024, help="vocabulary of the model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=int, default=900, help="seconds one (p, m) measurement may take")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. parallel.tp=2")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rows = []
    for pp in args.pp:
        for m in args.micro_batches:
            start = time.perf_counter()
            rows.append(run_one(pp, m, args))
            print(f"pp={pp} m={m}: step {rows[-1]['step_s'] * 1e3:.0f} ms, bubble {rows[-1]['bubble']:.2f} "
                  f"(model {rows[-1]['model']:.2f}) [{time.perf_counter() - start:.0f}s]", flush=True)
    print(table(rows))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
