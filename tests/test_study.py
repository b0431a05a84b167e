"""skiptron-study isoflop: a micro study (1 dense + 1 routed arm x 2 seeds) writes its table and PNG, and a study
killed after its first result resumes without retraining the finished runs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skiptron.training.config import load_config

ROUTER = ("r50=model.skip.enabled=true model.skip.mode=capacity model.skip.target_rate=0.5 model.skip.kv=all "
          "model.skip.layers=all")


def study_command(study: Path, data: Path, *extra: str) -> list[str]:
    # 1x32 dense is the optimum of the two shapes at this budget; the routed arm is 32 wide with more layers
    return [sys.executable, "-m", "skiptron.tools.study", "isoflop", "--dir", str(study), "--data", str(data),
            "--budgets", "2e8", "--family", "1x32,4x64", "--head-dim", "16", "--dense-arms", "1",
            "--no-default-routers", "--router", ROUTER, "--seeds", "2", "--seq-len", "32", "--batch", "4", "--micro-batch", "4",
            "--eval-batches", "2", "--checkpoints", "2", "--tokens-per-param", "1", *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_study_writes_table_and_png_and_resumes_after_a_kill(tiny_data, tmp_path):
    study = tmp_path / "study"
    proc = subprocess.Popen(study_command(study, tiny_data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not list(study.glob("runs/*/result.json")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no run finished in 10 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and the run it is training
        proc.wait()
    finished = {p.parent.name: (p.parent / "metrics.jsonl").read_text() for p in study.glob("runs/*/result.json")}
    plan = json.loads((study / "plan.json").read_text())
    assert len(plan["arms"]) == 4 and 1 <= len(finished) < 4

    out = subprocess.run(study_command(study, tiny_data), capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    # a run killed after its final checkpoint but before its result counts as finished too
    counted = int(re.search(r"(\d+) finished", out.stdout).group(1))
    assert len(finished) <= counted < 4, out.stdout
    for name, metrics in finished.items():  # not retrained: same history, not one more "done" line for it
        assert (study / "runs" / name / "metrics.jsonl").read_text() == metrics
        assert f"done {name}:" not in out.stdout
    rows = json.loads((study / "results.json").read_text())["rows"]
    assert [(r["kind"], r["seeds_done"]) for r in rows] == [("dense", 2), ("routed", 2)]
    dense, routed = rows
    assert routed["layers"] > dense["layers"] and routed["params"] > dense["params"]
    for row in rows:
        assert 0 < row["val_loss_mean"] < 6 and row["val_loss_std"] >= 0
        # steps from the budget: FLOPs/token x tokens within one step of 2e8, and the capacity router spent exactly it
        assert abs(row["flops_per_token"] * row["tokens"] - 2e8) <= row["flops_per_token"] * 4 * 32 / 2
        assert row["flops_spent_ratio"] == pytest.approx(row["flops_per_token"] * row["tokens"] / 2e8, rel=1e-6)
    assert routed["flops_per_token"] == pytest.approx(dense["flops_per_token"], rel=0.25)
    table = (study / "table.md").read_text()
    assert "| 2e8 | dense-1x32 |" in table and "2/2" in table and "routed - best dense" in table
    assert (study / "isoflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_slurm_sweep_lines_are_valid_runs(tiny_data, tmp_path):
    study = tmp_path / "study"
    out = subprocess.run(study_command(study, tiny_data, "--slurm"), capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    lines = (study / "sweep.txt").read_text().splitlines()
    assert len(lines) == 4 and "--array=0-3" in out.stdout and "launch/slurm/study.sbatch" in out.stdout
    run_dirs = set()
    for line in lines:
        cfg = load_config("tiny", line.split())
        run_dirs.add(cfg.run.dir)
        assert cfg.train.max_steps >= 1 and cfg.eval.interval == 0 and cfg.resume == "auto"
    assert len(run_dirs) == 4  # every arm its own run directory
    assert not list(study.glob("runs/*/metrics.jsonl"))  # nothing trained
