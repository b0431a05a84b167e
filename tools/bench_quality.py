"""`skiptron-bench-quality`: validation quality of model variants at equal wall-clock training time.

    skiptron-bench-quality --data data/bytes --budget-s 240 \\
        --variant transformer= \\
        --variant srupp-k2="model.block=srupp model.srupp.attention_every=2 model.hidden_size=512" \\
        [common overrides ...]

For each variant (config overrides on top of `--config` and the common overrides): its parameter count, its train
step time (measured by short `skiptron-train` runs, alternating between the variants over `--rounds` rounds so that
machine load hits all alike), then one training run of budget / step-time steps and the validation loss at its end,
in nats per token and in bits per token (bits per byte with byte-level tokens). Equal wall-clock time means equal
*measured* step time x steps, so the comparison does not depend on the load during the long runs.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from skiptron.tools.results import write_json
from skiptron.training.config import load_config
from skiptron.training import verbosity
from skiptron.training.metrics import read_metrics


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=\"key=value ...\"")
    return name, overrides.split()


def parameter_count(config: str, overrides: list[str], vocab: int) -> int:
    """Parameters of the model a config builds (one local process group, TP=1)."""
    import torch.distributed as dist

    from skiptron.parallel import state
    from skiptron.training.model import GPT

    cfg = load_config(config, overrides)
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("SKIPTRON_BENCH_PORT", "29533"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        device, _ = state.init_world("gloo")
        state.init_model_parallel(1, 1, device)
    return sum(p.numel() for p in GPT(cfg.model, vocab, 1).parameters())


def train(config: str, overrides: list[str], run_dir: Path, nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--no-python",
           "skiptron-train", "--config", config, f"run.dir={run_dir}", "resume=none", "logging.tensorboard=false",
           "checkpoint.save_at_end=false", "checkpoint.interval=0", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"skiptron-bench-quality: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return read_metrics(run_dir)


def run(args) -> list[dict]:
    common = [f"data.path={args.data}", *args.overrides]
    vocab = load_config(args.config, common).model.vocab_size or _data_vocab(args.data)
    work = Path(args.dir or tempfile.mkdtemp(prefix="skiptron-quality-"))
    rows = {name: {"variant": name, "overrides": ov, "params": parameter_count(args.config, common + ov, vocab)}
            for name, ov in args.variant}
    step_times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(args.rounds):
        for name, ov in args.variant:
            timing = common + ov + [f"train.max_steps={args.timing_steps}", "eval.interval=0", "eval.batches=1"]
            records = train(args.config, timing, work / f"time-{name}-{r}", args.nproc)
            step_times[name] += [m["step_time_s"] for m in records if "step_time_s" in m][2:]
    for name, ov in args.variant:
        row = rows[name]
        row["step_s"] = statistics.median(step_times[name])
        row["steps"] = max(1, round(args.budget_s / row["step_s"]))
        final = common + ov + [f"train.max_steps={row['steps']}", "eval.interval=0", f"eval.batches={args.eval_batches}"]
        records = train(args.config, final, work / f"train-{name}", args.nproc)
        row["val_loss"] = [m["val_loss"] for m in records if m.get("val_loss") is not None][-1]
        row["bits_per_token"] = row["val_loss"] / math.log(2)
        print(f"{name:14s} {row['params'] / 1e6:6.2f} M params | step {row['step_s'] * 1e3:7.1f} ms | "
              f"{row['steps']:5d} steps | val {row['val_loss']:.4f} nats = {row['bits_per_token']:.4f} bits/token",
              flush=True)
    return list(rows.values())


def _data_vocab(data: str) -> int:
    import json

    return json.loads((Path(data) / "manifest.json").read_text())["vocab_size"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny, 125m, 350m, 1.3b, 6.7b)")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--variant", type=_variant, action="append", required=True, help='NAME="key=value ..."')
    p.add_argument("--budget-s", type=float, default=240, help="training time per variant, at the measured step time")
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    p.add_argument("--timing-steps", type=int, default=8, help="steps per timing run (the first 2 are not counted)")
    p.add_argument("--eval-batches", type=int, default=32, help="validation micro-batches per run (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (DP)")
    p.add_argument("--dir", help="where the runs go (default: a new temporary directory)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("overrides", nargs="*", help="common config overrides")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    rows = run(args)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
