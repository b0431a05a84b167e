"""`skiptron-train --config FILE [dotted.key=value ...]`: one rank of a training run (started by a launcher)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from skiptron.training import verbosity
from skiptron.training.config import ConfigError, load_config

TRUST_OVERRIDE = "checkpoint.trust_pickle=true"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-train", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file or preset name (tiny, 125m, 350m, 1.3b, 6.7b)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.tp=2 train.max_steps=50")
    add_trust_argument(p)
    verbosity.add_argument(p)
    return p


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust-checkpoint`: the command-line form of checkpoint.trust_pickle (see training/checkpoint/files.py)."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoint files whose pickles reference code (refused by default: loading them "
                             "could run anything); same as checkpoint.trust_pickle=true")


def config_from_args(args):
    """The run's config from --config, the overrides and --trust-checkpoint; ConfigError names the problem."""
    overrides = list(args.overrides) + ([TRUST_OVERRIDE] if args.trust_checkpoint else [])
    return load_config(args.config, overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    verbosity.configure(args.verbose or None)
    from skiptron.training.checkpoint import CheckpointError

    try:
        cfg = config_from_args(args)
        if cfg.finetune.method != "full" or cfg.finetune.base:
            raise ConfigError("finetune: skiptron-train pretrains; finetune.method / finetune.base are read by "
                              "`skiptron-finetune train` (same arguments)")
    except ConfigError as err:
        print(f"skiptron-train: config error: {err}", file=sys.stderr)
        return 2
    from skiptron.training.runlock import RunDirBusy
    from skiptron.training.trainer import TrainingDiverged, train

    try:
        summary = train(cfg)
    except ConfigError as err:
        print(f"skiptron-train: config error: {err}", file=sys.stderr)
        return 2
    except (RunDirBusy, TrainingDiverged) as err:  # the same on every rank: rank 0 says it
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"skiptron-train: {err}", file=sys.stderr)
        return 3 if isinstance(err, RunDirBusy) else 1
    except CheckpointError as err:
        print(f"skiptron-train: checkpoint error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        from skiptron.tools.plot import plot_runs
        from skiptron.training.loader import read_manifest

        run = Path(cfg.run.dir)
        sources = cfg.data.sources()
        entropy = read_manifest(sources[0].path).get("unigram_entropy") if len(sources) == 1 else None
        if summary.get("best_val_loss") is not None and entropy:
            print(f"best validation loss {summary['best_val_loss']:.3f} nats/token "
                  f"(the data's unigram entropy: {entropy:.3f})")
        print(f"run directory: {run}")
        print(f"  config:      {run / 'config.yaml'}")
        print(f"  metrics:     {run / 'metrics.jsonl'}")
        print(f"  tensorboard: {run / 'tensorboard'}")
        print(f"  curves:      {plot_runs([run], run / 'curves.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
