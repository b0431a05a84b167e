"""`skiptron-bench-checkpoint --config tiny|125m|...`: what checkpointing costs.

One process, random tokens, the configured model, optimizer and ZeRO stage: times a train step, then a full save
(finiteness check of weights and optimizer state, DeepSpeed shards + RNG/extra state + manifest with checksums,
fsynced, published atomically), the finiteness check alone, and a load of it into the same engine, and reports the
checkpoint's size and the fraction of training time spent saving at the configured `checkpoint.interval`:
save / (interval x step + save).

Then the same save asynchronously (`checkpoint.async_save`): the stall (what the step waits for: DeepSpeed's state
dicts and the host snapshot), how long the background write takes until the checkpoint is published, and the time of
the train steps that run while it writes (they share the CPU with the writer), next to the plain step.

`--sequences N` times steps of N sequences instead of the configured global batch (a 125m step of 256 x 2048 tokens
takes minutes on a CPU): the full step is then estimated as global_batch / N times the measured one, and that is
said in the output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from skiptron.parallel import state
from skiptron.parallel.timing import synchronized_seconds
from skiptron.tools.bench import alternate_timings
from skiptron.tools.results import write_json
from skiptron.training import checkpoint as ckpt
from skiptron.training.config import load_config
from skiptron.training.engine import build_engine
from skiptron.training.model import GPT
from skiptron.training.trainer import Trainer, seed_everything
from skiptron.training import verbosity


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _drop_page_cache() -> None:
    """Make the load read from the disk, not from the page cache the save just filled (Linux, root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(f"--cold needs root on Linux to write /proc/sys/vm/drop_caches: {err}") from err


def run(args) -> dict:
    device, _ = state.init_world("auto")
    out_dir = Path(args.dir or tempfile.mkdtemp(prefix="skiptron-bench-ckpt-"))
    overrides = list(args.overrides) + [f"run.dir={out_dir}", f"checkpoint.dir={out_dir / 'checkpoints'}"]
    cfg = load_config(args.config, overrides)
    interval, global_batch = cfg.checkpoint.interval, cfg.train.global_batch_size
    sequences = args.sequences or global_batch
    if args.sequences:
        micro = min(cfg.train.micro_batch_size, sequences)
        cfg = load_config(args.config, overrides + [f"train.micro_batch_size={micro}",
                                                    f"train.global_batch_size={sequences}"])
    layout = state.init_model_parallel(cfg.parallel.tp, 1, device)
    if layout.world_size != 1:
        raise SystemExit("the checkpoint benchmark runs as one process")
    seed_everything(cfg.train.seed)
    engine, precision = build_engine(cfg, GPT(cfg.model, args.vocab_size, cfg.parallel.tp), layout)
    trainer = Trainer(cfg, layout, engine, precision, args.vocab_size, manifest={})
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1), generator=g)
               .to(device) for _ in range(cfg.grad_accum_steps(1))]
    step_s = statistics.median(alternate_timings({"step": lambda: trainer.train_step(iter(batches))}, device,
                                                 1, args.rounds, 1)["step"])
    full_step_s = step_s * global_batch / sequences

    saves, checks, verifies, loads, path = [], [], [], [], None
    for i in range(args.rounds):
        trainer.progress.step = i + 1
        start = time.perf_counter()
        ckpt.nonfinite_state(engine)  # the finiteness check every save runs first (checkpoint.check_finite)
        checks.append(time.perf_counter() - start)
        start = time.perf_counter()
        path = ckpt.save(engine, cfg, layout, trainer.progress, args.vocab_size, trainer.extra_state)
        saves.append(time.perf_counter() - start)
        if args.cold:
            _drop_page_cache()
        start = time.perf_counter()
        ckpt.verify(path, collective=True)  # what a resume checks before it loads (sizes and sha256 of every file)
        verifies.append(time.perf_counter() - start)
        if args.cold:
            _drop_page_cache()
        start = time.perf_counter()
        ckpt.load(engine, cfg, layout, path, args.vocab_size, trainer.extra_state, log=None)
        loads.append(time.perf_counter() - start)
    save_s, load_s, check_s = statistics.median(saves), statistics.median(loads), statistics.median(checks)
    verify_s = statistics.median(verifies)
    size = _size(path)
    stall_s, write_s, overlapped_step_s = _async_saves(trainer, cfg, layout, args, batches, first_step=args.rounds + 1)
    params = sum(p.numel() for p in engine.module.parameters())
    fraction = save_s / (interval * full_step_s + save_s) if interval else None
    result = {"config": args.config, "overrides": args.overrides, "params": params,
              "zero_stage": engine.zero_optimization_stage(),
              "checkpoint_bytes": size, "save_s": save_s, "load_s": load_s, "step_s": full_step_s,
              "step_measured_on_sequences": sequences, "cold_load": args.cold, "interval": interval, "save_fraction": fraction,
              "save_mb_per_s": size / save_s / 1e6, "finite_check_s": check_s, "resume_verify_s": verify_s,
              "async_stall_s": stall_s, "async_stall_fraction_of_save": stall_s / save_s,
              "async_write_s": write_s, "step_s_during_async_write": overlapped_step_s,
              "measured_step_s": step_s}
    print(f"{args.config}: {params / 1e6:.1f} M parameters, ZeRO-{engine.zero_optimization_stage()}, {precision}")
    print(f"checkpoint {size / 1e6:.1f} MB | save {save_s:.2f} s ({size / save_s / 1e6:.0f} MB/s) | "
          f"load {load_s:.2f} s ({'cold' if args.cold else 'warm'} page cache) | resume's verification (sizes, "
          f"sha256) {verify_s:.2f} s before it")
    print(f"finiteness check (checkpoint.check_finite, part of the save): {check_s:.3f} s = "
          f"{100 * check_s / save_s:.1f}% of the save; without it a save takes {save_s - check_s:.2f} s")
    estimate = f" (estimated from {sequences} sequences)" if args.sequences else ""
    print(f"train step {full_step_s:.2f} s{estimate}")
    if fraction is not None:
        print(f"checkpoint.interval={interval}: {100 * fraction:.2g}% of training time spent saving")
    print(f"async save: stall {stall_s:.3f} s = {100 * stall_s / save_s:.1f}% of the synchronous save | published "
          f"{write_s:.2f} s after the stall | a step started during the write {overlapped_step_s:.2f} s (measured "
          f"step alone {step_s:.2f} s)")
    state.shutdown()
    if not args.dir:
        shutil.rmtree(out_dir)
    return result


def _async_saves(trainer, cfg, layout, args, batches, first_step: int) -> tuple[float, float, float]:
    """Medians over `args.rounds` asynchronous saves of each kind: the stall; the time from the stall until the save
    is published (waiting at once); the time of one train step taken while a save is being written."""
    background = ckpt.BackgroundSaves(cfg.launch.collective_timeout_s)
    stalls, writes, overlapped = [], [], []
    for i in range(2 * args.rounds):
        trainer.progress.step = first_step + i
        start = time.perf_counter()
        ckpt.save(trainer.engine, cfg, layout, trainer.progress, args.vocab_size, trainer.extra_state,
                  background=background)
        stalled = time.perf_counter()
        stalls.append(stalled - start)
        if i % 2:
            overlapped.append(synchronized_seconds(lambda: trainer.train_step(iter(batches)), layout.device))
            background.wait()
        else:
            background.wait()
            writes.append(time.perf_counter() - stalled)
    return statistics.median(stalls), statistics.median(writes), statistics.median(overlapped)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny, 125m, 350m, 1.3b, 6.7b)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the model (default: %(default)s)")
    p.add_argument("--sequences", type=int, help="time steps of this many sequences and scale to the global batch")
    p.add_argument("--rounds", type=int, default=3, help="save/load rounds (default: %(default)s)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each load (Linux, root)")
    p.add_argument("--dir", help="where to write the checkpoints (default: a new temporary directory)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. parallel.tp=2")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    result = run(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
