#!/usr/bin/env python3
"""Submit launch/slurm/train.sbatch with its sbatch options taken from the run's config, checked before queueing.

    python launch/slurm/submit.py --config FILE [dotted.key=value ...] [--dry-run] [-- extra sbatch options]

The config's `launch.slurm` mapping holds the sbatch options (`nodes`, `ntasks-per-node`, `gpus-per-node`, `time`,
`partition`, `account`, `array`, ...; e.g. `launch.slurm.nodes=4 launch.slurm.time=24:00:00`). The world size they
give (nodes x ntasks-per-node) is validated against the parallel layout and batch size here, so a job that cannot
start fails now instead of after hours in the queue. The job name is the run directory's name and the batch log goes
to <run.dir>/slurm-<jobid>.out; the config and overrides are passed on to the trainer unchanged.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SBATCH = Path(__file__).resolve().parent / "train.sbatch"


def sbatch_command(config: str, overrides: list[str], extra: list[str]) -> list[str]:
    from skiptron.training.config import load_config

    cfg = load_config(config, overrides)
    options = {"nodes": 1, "ntasks-per-node": 1, "job-name": Path(cfg.run.dir).name,
               "output": str(Path(cfg.run.dir) / "slurm-%j.out"), **cfg.launch.slurm}
    cfg.validate_for_launch(int(options["nodes"]) * int(options["ntasks-per-node"]), need_data=False)
    requeues = f"--export=ALL,SKIPTRON_MAX_REQUEUES={cfg.launch.max_restarts}"  # failure requeues, train.sbatch
    return ["sbatch", *(f"--{key}={value}" for key, value in options.items()), requeues, *extra, str(SBATCH),
            "--config", config, *overrides]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(prog="submit.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    from skiptron.training.config import ConfigError, load_config

    try:
        cmd = sbatch_command(args.config, args.overrides, extra)
    except ConfigError as err:
        print(f"submit.py: config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    Path(load_config(args.config, args.overrides).run.dir).mkdir(parents=True, exist_ok=True)  # for --output
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
