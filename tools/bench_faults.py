"""`skiptron-bench-faults --config tiny|125m --data DIR [overrides]`: what a dead rank costs in time.

Two real ranks of `skiptron-train` (env:// launch, as srun or mpirun start them) train on DIR; rank 1 is SIGKILLed
at the start of step `--kill-step` (SKIPTRON_FAULTS). Measured, on this machine's clock:

    death -> exit        from rank 1's death to rank 0's exit (gloo's error, then the watchdog's verdict)
    restart -> resumed   a new launch of the same command: from starting the processes to `resumed from` (imports,
                         rendezvous, engine, checkpoint load)
    resumed -> step      from there to the first new step's progress line

A checkpoint is saved every `--kill-step - 1` steps so the restart resumes one step before the kill.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from skiptron.tools.results import write_json
from skiptron.training import verbosity


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], faults: str) -> list[dict]:
    """Start 2 ranks; returns per rank {proc, lines: [(monotonic time, line)]} filled by reader threads."""
    port = str(_free_port())
    ranks = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, SKIPTRON_FAULTS=faults, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(["skiptron-train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        rank = {"proc": proc, "lines": []}
        rank["reader"] = threading.Thread(target=lambda rk=rank: rk["lines"].extend(
            (time.monotonic(), line) for line in rk["proc"].stdout), daemon=True)
        rank["reader"].start()
        ranks.append(rank)
    return ranks


def _finish(ranks: list[dict], timeout_s: float) -> None:
    for rank in ranks:
        rank["proc"].wait(timeout=timeout_s)
        rank["exit"] = time.monotonic()
        rank["reader"].join(timeout=10)


def _first(rank: dict, text: str) -> float:
    found = [t for t, line in rank["lines"] if text in line]
    if not found:
        raise SystemExit(f"no line with {text!r} in the output:\n" + "".join(l for _, l in rank["lines"])[-3000:])
    return found[0]


def run(args) -> dict:
    run_dir = Path(args.dir or tempfile.mkdtemp(prefix="skiptron-bench-faults-"))
    common = ["--config", args.config, f"data.path={args.data}", f"run.dir={run_dir}", "launch.health_check=false",
              f"launch.collective_timeout_s={args.timeout}", f"checkpoint.interval={args.kill_step - 1}",
              f"train.max_steps={args.kill_step + 1}", "checkpoint.save_at_end=false", "logging.print_every=1",
              "logging.tensorboard=false", "eval.interval=0", "eval.batches=1", *args.overrides]
    killed = _launch(common, f"kill:step={args.kill_step}:rank=1")
    # rank 1 dies first; poll it so its death time is measured, not the reader's
    while killed[1]["proc"].poll() is None:
        time.sleep(0.01)
    death = time.monotonic()
    _finish(killed, args.timeout + 300)
    death_to_exit = killed[0]["exit"] - death
    verdict = next((line.strip() for _, line in killed[0]["lines"] if "[watchdog]" in line), "(no watchdog line)")
    start = time.monotonic()
    restarted = _launch(common, "")
    _finish(restarted, 1800)
    resumed = _first(restarted[0], "resumed from")
    first_step = _first(restarted[0], f"step {args.kill_step}/")
    result = {"config": args.config, "overrides": args.overrides, "collective_timeout_s": args.timeout,
              "death_to_exit_s": death_to_exit, "exit_code": killed[0]["proc"].returncode,
              "restart_to_resumed_s": resumed - start, "resumed_to_first_step_s": first_step - resumed,
              "restart_to_first_step_s": first_step - start, "verdict": verdict}
    print(f"{args.config}: death -> exit {death_to_exit:.1f} s (exit {result['exit_code']}; "
          f"launch.collective_timeout_s={args.timeout})")
    print(f"  {verdict}")
    print(f"restart -> resumed {result['restart_to_resumed_s']:.1f} s, resumed -> first new step "
          f"{result['resumed_to_first_step_s']:.1f} s (restart -> first new step "
          f"{result['restart_to_first_step_s']:.1f} s)")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="a preset name or YAML file (default: tiny)")
    p.add_argument("--data", required=True, help="a prepared data directory (skiptron-data prepare)")
    p.add_argument("--kill-step", type=int, default=4, help="the step at which one rank is SIGKILLed (default: 4)")
    p.add_argument("--timeout", type=int, default=120, help="launch.collective_timeout_s")
    p.add_argument("--dir", help="the run directory (default: a new temporary directory)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    result = run(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
