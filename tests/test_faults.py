"""Faults without lost work: a dead or stalled rank ends the job fast, naming it; a killed job restarts from its
newest checkpoint to the bitwise result of an uninterrupted run (torchrun restarts, a SLURM requeue); non-finite
steps never reach the weights or a checkpoint; one writer per run directory. Faults are injected with
SKIPTRON_FAULTS (training/faults.py) into real processes."""
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from runs import BASE, train_preset

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
FAST = ["launch.health_check=false", "launch.collective_timeout_s=10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data, run_dir, *extra):
    return ["--config", "tiny", *BASE, *FAST, f"data.path={data}", f"run.dir={run_dir}", *extra]


def _ranks(args, faults: str, world: int = 2, **popen):
    """`world` ranks of skiptron-train started directly with env:// variables (as srun or mpirun start them: no
    agent that kills the others when one dies)."""
    port = str(_free_port())
    return [subprocess.Popen(["skiptron-train", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=dict(ENV, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SKIPTRON_FAULTS=faults),
                             **popen)
            for r in range(world)]


def _leftovers(marker: str) -> list[str]:
    """Processes (data-loader workers included) whose command line names `marker` (a test's own tmp path)."""
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


# -- a dead or stalled rank ends the job within launch.collective_timeout_s --------------------------------------
def _collect(procs, timeout_s: float = 240) -> list[dict]:
    """Run processes to their end, timestamping every output line as it arrives and the exit."""
    import threading

    results = [None] * len(procs)

    def read(i, proc):
        lines = [(time.monotonic(), line) for line in proc.stdout]
        proc.wait()
        results[i] = {"lines": lines, "out": "".join(text for _, text in lines), "rc": proc.returncode,
                      "exit": time.monotonic()}

    threads = [threading.Thread(target=read, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert all(results), "a rank did not end"
    return results


def _when(result: dict, text: str) -> float:
    return next(t for t, line in result["lines"] if text in line)


def test_dead_and_stalled_ranks_end_the_job_naming_them(tiny_data, tmp_path):
    """Two jobs of 2 ranks at once: in one, rank 1 is SIGKILLed inside the checkpoint save of step 4; in the other,
    rank 1 hangs in data loading at step 5 (alive, making no progress). Every surviving rank exits with
    EXIT_RANK_FAILED within collective_timeout_s (10 s) + 30 s of the fault, rank 0 prints one watchdog line naming
    rank 1, its host, the step and the phase, the kill is not reported as a disk problem, and no process of either
    job (data-loader workers included) is left."""
    from skiptron.parallel.watchdog import EXIT_RANK_FAILED

    common = ["checkpoint.interval=2", "train.max_steps=40", "data.num_workers=1", "logging.print_every=1"]
    procs = (_ranks(_args(tiny_data, tmp_path / "killed", *common), "kill:at=save:step=4:rank=1")
             + _ranks(_args(tiny_data, tmp_path / "hung", *common), "hang:step=5:rank=1"))
    k0, k1, h0, h1 = _collect(procs)
    host = socket.gethostname()
    assert k1["rc"] == -signal.SIGKILL and "[faults] kill on rank 1 at save of step 4" in k1["out"], k1["out"][-3000:]
    assert k0["rc"] == EXIT_RANK_FAILED, k0["out"][-3000:]
    assert k0["out"].count("[watchdog]") == 1, k0["out"][-3000:]
    verdict = next(line for line in k0["out"].splitlines() if "[watchdog]" in line)
    assert f"[watchdog] rank 1 on {host}" in verdict and "died at step 4 during checkpoint save" in verdict, verdict
    assert "could not write" not in k0["out"] and "MiB free" not in k0["out"]
    assert k0["exit"] - k1["exit"] < 10 + 30
    assert [h0["rc"], h1["rc"]] == [EXIT_RANK_FAILED] * 2, h0["out"][-3000:]
    assert h0["out"].count("[watchdog]") == 1 and "[watchdog]" not in h1["out"], h0["out"][-3000:]
    verdict = next(line for line in h0["out"].splitlines() if "[watchdog]" in line)
    assert f"rank 1 on {host}" in verdict and "stopped making progress at step 5 during data loading" in verdict, verdict
    hang = _when(h1, "[faults] hang on rank 1")
    assert 10 <= h0["exit"] - hang < 10 + 30 and h1["exit"] - hang < 10 + 30
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))


# -- non-finite steps never reach the weights or a checkpoint ---------------------------------------------------
NAN = ["train.max_steps=7", "checkpoint.interval=1", "checkpoint.keep=0", "optimizer.warmup_steps=2",
       "launch.health_check=false"]


def _train(overrides, data, run_dir, faults="", stdout=False):
    import contextlib
    import io

    import torch.distributed as dist

    from runs import train_run

    os.environ["SKIPTRON_FAULTS"] = faults
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            values, weights = train_run(NAN + list(overrides), data, run_dir,
                                        metrics=("loss", "train/skipped", "train/skipped_nonfinite"))
    finally:
        os.environ.pop("SKIPTRON_FAULTS")
    dist.barrier()
    return values, weights, buffer.getvalue() if stdout else None


def _doctor_progress(ckpt_dir: Path, steps: int, samples_per_step: int) -> None:
    """Make a checkpoint say it is `steps` later, its batches consumed but not applied: a run that skipped
    those updates (the schedule, the optimizer's step count and the weights stay)."""
    from skiptron.training import checkpoint as ckpt

    meta = json.loads((ckpt_dir / "trainer.json").read_text())
    meta["step"] += steps
    meta["consumed_samples"] += steps * samples_per_step
    (ckpt_dir / "trainer.json").write_text(json.dumps(meta))
    _rehash(ckpt_dir, "trainer.json")
    new = ckpt_dir.with_name(ckpt.step_tag(meta["step"]))
    ckpt_dir.rename(new)
    (new.parent / "latest").write_text(new.name)


def _rehash(ckpt_dir: Path, name: str) -> None:
    from skiptron.training.checkpoint.files import _sha256

    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"][name] = {"size": (ckpt_dir / name).stat().st_size, "sha256": _sha256(ckpt_dir / name)}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


def _all_finite(root: Path) -> list[str]:
    from skiptron.training import checkpoint as ckpt

    bad = []
    for path in ckpt.list_checkpoints(root):
        weights, moments, _, _ = ckpt.read_full_state(path)
        bad += [f"{path.name}/{n}" for n, w in weights.items() if not torch.isfinite(w).all()]
        bad += [f"{path.name}/{n}.{k}" for n, m in moments.items() for k, v in m.items() if not torch.isfinite(v).all()]
    return bad


@pytest.mark.parametrize("zero, fault", [(0, "nan-grad"), (1, "nan-loss")], ids=["zero0-nan-grad", "zero1-nan-loss"])
def test_nonfinite_step_is_skipped_on_every_rank(pool2, tiny_data, tmp_path, zero, fault):
    """A NaN in one rank's gradient (ZeRO-0: the guard's gate skips it) or in the loss (ZeRO-1: DeepSpeed's own
    overflow check gets there first) at step 4: no update that step, the run ends with the same weights, bitwise,
    as a run that skipped step 4's update (step 3's checkpoint, its batches of step 4 marked consumed, resumed),
    the skip is counted, and no checkpoint holds a non-finite tensor."""
    layout = [f"zero.stage={zero}"]
    faulty = pool2.run(_train, layout, tiny_data, tmp_path / "faulty", f"{fault}:step=4:rank=1")
    values = faulty[0][0]
    assert values["train/skipped"] == [0, 0, 0, 1, 0, 0, 0] and values["train/skipped_nonfinite"][-1] == 1
    assert all(torch.isfinite(torch.tensor(values["loss"][i])) for i in (0, 1, 2, 4, 5, 6))
    assert not _all_finite(tmp_path / "faulty/checkpoints")
    clean = pool2.run(_train, layout, tiny_data, tmp_path / "clean")
    (tmp_path / "ref/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "clean/checkpoints/step00000003", tmp_path / "ref/checkpoints/step00000003")
    _doctor_progress(tmp_path / "ref/checkpoints/step00000003", 1, 4)
    ref = pool2.run(_train, layout, tiny_data, tmp_path / "ref")
    assert values["loss"][4:] == ref[0][0]["loss"] != clean[0][0]["loss"][4:]
    for rank in range(2):
        for name, w in ref[rank][1].items():
            assert torch.equal(faulty[rank][1][name], w), name


def test_consecutive_skipped_steps_stop_the_run_and_mark_the_checkpoints(pool2, tiny_data, tmp_path):
    """train.max_nonfinite_steps=3 consecutive skipped steps: TrainingDiverged with the reason; checkpoints saved
    during the streak are marked and resume prefers the older healthy one, saying so."""
    from skiptron.training import checkpoint as ckpt

    with pytest.raises(AssertionError, match="training diverged: 3 consecutive steps were skipped.*3 nonfinite"):
        pool2.run(_train, [], tiny_data, tmp_path / "run", "nan-loss:step=3;nan-loss:step=4;nan-loss:step=5")
    root = tmp_path / "run/checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [f"step0000000{s}" for s in (4, 3, 2, 1)]
    assert ckpt.read_meta(root / "step00000004")["health"]["skipped_streak"] == 2
    messages = []
    order = ckpt.resumable(root, log=messages.append)
    assert [p.name for p in order] == ["step00000002", "step00000001", "step00000004", "step00000003"]
    assert "step00000004 was saved after 2 consecutive skipped" in messages[0]


def _resume_start(overrides, data, run_dir):
    import contextlib
    import io

    from skiptron.training.config import load_config
    from skiptron.training.trainer import Trainer

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        trainer = Trainer.setup(load_config(None, BASE + NAN + [f"data.path={data}", f"run.dir={run_dir}"] + overrides))
    start = trainer.progress.step
    # a save of non-finite weights is refused, naming the tensor
    with torch.no_grad():
        next(trainer.engine.module.parameters()).view(-1)[0] = float("nan")
    from skiptron.training import checkpoint as ckpt

    try:
        trainer.save()
        refused = None
    except ckpt.CheckpointError as err:
        refused = str(err)
    if trainer.lock:
        trainer.lock.release()
    return start, buffer.getvalue(), refused


def test_checkpoint_with_nan_weights_is_refused_at_resume_and_the_previous_one_used(pool2, tiny_data, tmp_path):
    """A checkpoint doctored to hold a NaN weight (its manifest updated, so only the values are wrong) is refused
    at resume with a message naming it, and the previous one is loaded; saving NaN weights is refused; when every
    checkpoint is corrupt, resume fails listing each and why."""
    from skiptron.training import checkpoint as ckpt

    pool2.run(_train, ["zero.stage=0", "train.max_steps=3"], tiny_data, tmp_path / "run")
    newest = tmp_path / "run/checkpoints/step00000003"
    model_file = newest / "mp_rank_00_model_states.pt"
    state = torch.load(model_file, map_location="cpu", weights_only=False)
    state["module"]["embedding.tokens.weight"][5, 7] = float("nan")
    torch.save(state, model_file)
    _rehash(newest, model_file.name)
    ckpt.verify(newest)  # the files are intact: only the values are wrong
    results = pool2.run(_resume_start, ["zero.stage=0"], tiny_data, tmp_path / "run")
    start, out, refused = results[0]
    assert start == 2, out
    assert f"checkpoint {newest} holds non-finite values (embedding.tokens.weight (rank 0)" in out
    assert "resumed from" in out and "step00000002: step 2" in out
    assert refused.startswith("not saving step 2: non-finite values in ") and "(rank 0)" in refused
    for path in ckpt.list_checkpoints(tmp_path / "run/checkpoints"):
        (path / "rank00001.pt").write_bytes(b"torn")
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint under .*step00000003: .*rank00001.pt has 4 "
                                                   r"bytes.*step00000002: .*step00000001: "):
        list(ckpt.resumable(tmp_path / "run/checkpoints", log=None))


# -- one writer per run directory ------------------------------------------------------------------------------
def test_second_job_on_a_live_run_dir_is_refused_and_a_dead_jobs_lock_taken_over(tiny_data, tmp_path):
    run = tmp_path / "run"
    env = dict(ENV, SKIPTRON_FAULTS="hang:step=3")
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.Popen(["skiptron-train", *_args(tiny_data, run, "train.max_steps=5")], env=env, **common)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.2)
    second = subprocess.run(["skiptron-train", *_args(tiny_data, run, "train.max_steps=5")], env=ENV,
                            capture_output=True, text=True, timeout=180)
    assert second.returncode == 3, second.stderr[-3000:]
    assert (f"run.dir {run} is in use by another job (host {socket.gethostname()}, pid {first.pid}"
            in second.stderr), second.stderr[-3000:]
    first.kill()
    first.communicate()
    third = subprocess.run(["skiptron-train", *_args(tiny_data, run, "train.max_steps=5")], env=ENV,
                           capture_output=True, text=True, timeout=180)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock of a job that is gone (host {socket.gethostname()}, pid {first.pid}" in third.stdout


# -- automatic recovery --------------------------------------------------------------------------------------------
CHAOS = ["train.max_steps=24", "checkpoint.interval=2", "checkpoint.keep=2", "checkpoint.save_at_end=true",
         "logging.print_every=1"]


def _final_model(run_dir: Path) -> dict:
    root = run_dir / "checkpoints"
    path = root / (root / "latest").read_text()
    return torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_chaos_random_kills_under_torchrun_restarts_end_bitwise_equal(pool2, tiny_data, tmp_path):
    """24 steps under `launch/torchrun.sh --max-restarts 4` while a random rank is SIGKILLed at 3 random steps, one
    of them inside a checkpoint save: every restart resumes from the newest complete checkpoint and the final
    weights are bitwise those of an uninterrupted run."""
    seed = int(os.environ.get("SKIPTRON_CHAOS_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    kills = [(rng.randint(3, 8), "step"), (rng.choice([10, 12, 14]), "save"), (rng.randint(16, 22), "step")]
    faults = ";".join(f"kill:at={at}:step={step}:rank={rng.randint(0, 1)}:once={tmp_path}/fired-{i}"
                      for i, (step, at) in enumerate(kills))
    run = tmp_path / "chaos"
    proc = subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--max-restarts", "4",
                           *_args(tiny_data, run, *CHAOS)], cwd=ROOT, env=dict(ENV, SKIPTRON_FAULTS=faults),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"seed {seed}, faults {faults}\n{out[-4000:]}"
    assert out.count("[faults] kill") == 3 and out.count("resumed from") == 3, f"seed {seed}\n{out[-4000:]}"
    assert "could not write" not in out
    pool2.run(train_preset, "tiny", BASE + FAST + CHAOS, tiny_data, tmp_path / "ref")
    mine, ref = _final_model(run), _final_model(tmp_path / "ref")
    assert mine.keys() == ref.keys()
    for name in ref:
        assert ref[name] is None and mine[name] is None or torch.equal(mine[name], ref[name]), f"seed {seed}: {name}"


def test_sigterm_to_the_torchrun_script_saves_and_exits_75(tiny_data, tmp_path):
    """SIGTERM to launch/torchrun.sh (how to preempt a torchrun job; torchrun itself exits 1): the ranks save at
    the same step and the script exits with 75, also with --max-restarts."""
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.signals import EXIT_PREEMPTED

    run = tmp_path / "run"
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--max-restarts", "1",
                             *_args(tiny_data, run, "train.max_steps=100000", "logging.print_every=1")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, out[-4000:]
    assert "[torchrun.sh] SIGTERM: asking the ranks to checkpoint and stop" in out
    found = ckpt.find_resumable(run / "checkpoints", log=None)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert found.name == ckpt.step_tag(steps[-1])


def test_guard_flags_a_step_whose_gradients_hold_any_non_finite_value():
    """One running sum of the gradients' sums: NaN, +inf, and +inf in one gradient with -inf in another (whose sum
    is NaN, not a cancellation) all reject the step; finite gradients and losses pass it."""
    from skiptron.training.guard import StepGuard

    def verdict(poison: dict[int, float]):
        layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        params = list(layers.parameters())
        for i, value in poison.items():  # before the guard's hooks, which then see the poisoned gradient
            params[i].register_hook(lambda g, v=value: g.index_fill(-1, torch.tensor([0]), v))
        guard = StepGuard(torch.device("cpu"))
        guard.watch(layers)
        loss = layers(torch.randn(3, 4)).square().mean()
        guard.observe_loss(loss)
        loss.backward()
        return guard.decide()

    clean = verdict({})
    assert clean.apply and not clean.nonfinite and math.isfinite(clean.loss)
    for poison in ({0: float("nan")}, {2: float("inf")}, {0: float("inf"), 2: float("-inf")}):
        got = verdict(poison)
        assert got.nonfinite and not got.apply and math.isnan(got.loss), poison
