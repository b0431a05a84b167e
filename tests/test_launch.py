"""Launching: every launcher reaches the same trainer and the same losses, on a real SLURM cluster, under mpirun and
under torchrun with two "nodes"; a launch with a missing rank fails fast and names it; the health check names slow
ranks. The SLURM tests start a real 2-node cluster (launch/local_cluster.sh) and skip, saying why, only where it
cannot run (not root and no SLURM installed); tests/run.sh installs what they need on CI."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from runs import BASE, train_preset
from skiptron.parallel import health, launch

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data, run_dir, *extra):
    return ["--config", "tiny", *BASE, f"data.path={data}", f"run.dir={run_dir}", *extra]


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


# -- discovery, unit level ------------------------------------------------------------------------------------
def test_slurm_formats():
    assert launch.expand_hostlist("node[1-2]") == ["node1", "node2"]
    assert launch.expand_hostlist("gpu[01-03,07],login1,a[9-10]b") == [
        "gpu01", "gpu02", "gpu03", "gpu07", "login1", "a9b", "a10b"]
    assert launch.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert launch.port_from_job_id(123) == launch.port_from_job_id("123") != launch.port_from_job_id(124)
    assert launch._ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_discovery_per_launcher():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "localhost,other",
             "SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "other"}
    info = launch.discover(slurm)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("slurm", 3, 4, 1, 2)
    assert (info.master_addr, info.master_port, info.host) == ("localhost", launch.port_from_job_id(4242), "other")
    assert launch.discover({**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "7"}).master_addr == "10.0.0.1"
    # torchrun inside a SLURM job, and mpirun inside an allocation, win over the allocation's variables
    assert launch.detect_launcher({**slurm, "TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert launch.detect_launcher({**slurm, "OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert launch.detect_launcher({}) == "single"
    with pytest.raises(launch.LaunchError, match="SLURM_JOB_NODELIST"):
        launch.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})


def test_submit_fills_sbatch_options_from_the_config_and_rejects_bad_layouts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("submit", ROOT / "launch/slurm/submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    cmd = submit.sbatch_command("tiny", ["launch.slurm.nodes=2", 'launch.slurm.time="2:00:00"'], ["--qos=x"])
    assert cmd[:6] == ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--job-name=tiny",
                       "--output=runs/tiny/slurm-%j.out", "--time=2:00:00"]
    assert cmd[6:10] == ["--export=ALL,SKIPTRON_MAX_REQUEUES=3", "--qos=x", str(ROOT / "launch/slurm/train.sbatch"),
                         "--config"]
    from skiptron.training.config import ConfigError

    with pytest.raises(ConfigError, match="data-parallel size \\(3\\)"):  # 3 ranks cannot split a batch of 16
        submit.sbatch_command("tiny", ["launch.slurm.nodes=3"], [])
    with pytest.raises(ConfigError, match="launch.slurm.time"):
        submit.sbatch_command("tiny", ["launch.slurm.time=1:00:00"], [])


# -- health check ---------------------------------------------------------------------------------------------
def test_health_summary_names_outliers():
    m = [health.Measure("matmul_tflops", r, f"h{r // 2}", (r,), v) for r, v in enumerate([10.0, 9.8, 10.1, 4.0])]
    m += [health.Measure("allreduce_dp_gbps", r, f"h{r // 2}", g, v)
          for g, v in (((0, 1), 5.0), ((2, 3), 1.0), ((4, 5), 5.2)) for r in g]
    lines, outliers = health.summarize(m, 0.7)
    assert len(lines) == 2
    assert any("rank 3 on h1" in o and "0.40 x median" in o for o in outliers), outliers
    assert any("group of ranks [2, 3]" in o for o in outliers) and len(outliers) == 2


def _preflight_tp2():
    from skiptron.parallel import state

    state.init_model_parallel(2, 1, torch.device("cpu"))
    return sorted({m.test for m in health.measure(torch.device("cpu"))}), health.preflight(torch.device("cpu"))


def test_health_check_runs_over_the_real_groups(pool4):
    """TP=2 x DP=2: matmul per rank, all-reduce over TP and DP groups, all-to-all over DP."""
    results = pool4.run(_preflight_tp2)
    assert results[0][0] == ["allreduce_dp_gbps", "allreduce_tp_gbps", "alltoall_dp_gbps", "matmul_tflops"]
    assert all(r[1] == results[0][1] for r in results)  # every rank sees the same outliers


# -- real launches: all must match a torchrun run of the same config -----------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory, pools):
    """Losses of what `skiptron-train` trains on 2 ranks, run in the shared pool (one-node torchrun itself is
    tested in tests/test_training.py): every launcher below must reproduce them."""
    run = tmp_path_factory.mktemp("ref")
    pools(2).run(train_preset, "tiny", BASE, tiny_data, run)
    return _losses(run)


def test_torchrun_two_nodes_matches(tiny_data, tmp_path, reference):
    """Two torchrun agents on the loopback (--nnodes 2 --node-rank 0/1) train like one node with 2 processes."""
    master = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(["bash", "launch/torchrun.sh", "--nproc-per-node", "1", "--nnodes", "2",
                               "--node-rank", str(r), "--master", master, *_args(tiny_data, tmp_path / "run")],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert f"rank 0/2 (local 0/1) on {socket.gethostname()} via torchrun: rendezvous at {master}" in outs[0]
    assert "[launch] rank 1/2" not in outs[1]  # non-zero ranks are quiet unless something goes wrong
    assert _losses(tmp_path / "run") == pytest.approx(reference, abs=1e-5)


@pytest.mark.skipif(not shutil.which("mpirun"), reason="no mpirun (tests/run.sh installs openmpi-bin as root)")
def test_mpirun_two_ranks_matches(tiny_data, tmp_path, reference):
    pytest.importorskip("mpi4py", reason="mpi4py missing (tests/run.sh installs it)")
    out = _check(subprocess.run(["bash", "launch/mpirun.sh", "-np", "2", "--oversubscribe",
                                 *_args(tiny_data, tmp_path / "run")],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300))
    assert "rank 0/2 (local 0/2)" in out and "via mpi: rendezvous at" in out and "[launch] rank 1/2" not in out
    assert _losses(tmp_path / "run") == pytest.approx(reference, abs=1e-5)


def test_missing_rank_and_unreachable_master_fail_fast(tiny_data, tmp_path):
    """Rank 0 of a world of 2 whose rank 1 never starts, and a rank 1 whose master never starts: both fail within
    the rendezvous timeout, naming the missing rank and the unreachable address."""
    timeout_s = 5
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    procs = [subprocess.Popen(["skiptron-train", *_args(tiny_data, tmp_path / f"r{rank}",
                                                        f"launch.rendezvous_timeout_s={timeout_s}")],
                              env=dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(_free_port())), **common)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    elapsed = time.monotonic() - start
    assert all(p.returncode != 0 for p in procs)
    assert "1 of 2 ranks arrived; missing ranks: 1; hosts that arrived" in outs[0], outs[0][-2000:]
    assert "rank 1 on" in outs[1] and "could not reach the master at 127.0.0.1:" in outs[1], outs[1][-2000:]
    assert elapsed < timeout_s + 40, elapsed  # the timeout plus process start-up, not the 600 s default


# -- a real SLURM cluster ------------------------------------------------------------------------------------
def _free_port_triple() -> int:
    """A base port whose next two are free too, below Linux's ephemeral range (32768 up), where gloo's and the
    stores' sockets of other tests come and go: a daemon that cannot bind its port leaves its node down."""
    for offset in range(3000):
        base = 20000 + (os.getpid() + 7 * offset) % 4000 * 3
        try:
            for port in range(base, base + 3):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no three consecutive free ports in 20000-32000")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A 2-node SLURM cluster of its own (own directory, ports and munged), stopped at the end of the module."""
    directory = tmp_path_factory.mktemp("slurm")
    env = dict(ENV, SKIPTRON_CLUSTER_DIR=str(directory), SKIPTRON_CLUSTER_PORT=str(_free_port_triple()))
    start = subprocess.run(["bash", "launch/local_cluster.sh", "start"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    if start.returncode == 3:
        pytest.skip(f"no local SLURM cluster here: {start.stderr.strip()}")
    assert start.returncode == 0, start.stderr
    env["SLURM_CONF"] = start.stdout.strip().split("=", 1)[1]
    yield env
    subprocess.run(["bash", "launch/local_cluster.sh", "stop"], cwd=ROOT, env=env, timeout=120)


def _job_state(env, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait_job(env, job: str, timeout_s: float = 240, on_pending=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _job_state(env, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if on_pending and state.get("JobState") == "PENDING":
            on_pending(state)
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish within {timeout_s}s: {state}")


def _sbatch(env, *args) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _start_requeued_when_ready(env, job: str):
    """An `on_pending` for `_wait_job`: a requeued job waits for its revoked credential to expire (cred_expire, 20 s
    on the local cluster) and then for the scheduler's next pass; once the credential has expired, skip the second
    wait. Starting it sooner makes slurmd refuse it ("Job credential revoked") and the job fails."""
    requeued_at = []

    def start_now(state):
        if state.get("Restarts") == "1":
            requeued_at.append(time.monotonic())
            if time.monotonic() - requeued_at[0] > 22:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)

    return start_now


def test_sbatch_two_nodes_matches_torchrun(slurm, tiny_data, tmp_path, reference):
    """`sbatch -N 2 --ntasks-per-node=1 launch/slurm/train.sbatch --config tiny ...` on the real local cluster: one
    rank per node, rendezvous at node1's address with the job-id port, same losses as torchrun."""
    env = dict(slurm, SKIPTRON_LOG_DIR=str(tmp_path / "logs"))
    job = _sbatch(env, "-N", "2", "--ntasks-per-node=1", f"--output={tmp_path}/job.out",
                  "launch/slurm/train.sbatch", *_args(tiny_data, tmp_path / "run"))
    state = _wait_job(env, job)
    batch_log = (tmp_path / "job.out").read_text()
    ranks = [(tmp_path / "logs" / f"rank-{r}.log").read_text() for r in (0, 1)]
    assert state["JobState"] == "COMPLETED", batch_log + ranks[0][-3000:] + ranks[1][-3000:]
    port = launch.port_from_job_id(job)
    assert f"rank 0/2 (local 0/1) on node1 via slurm: rendezvous at 127.0.0.1:{port}" in ranks[0]
    assert "[launch] rank 1/2" not in ranks[1]  # non-zero ranks are quiet unless something goes wrong
    assert "[health] pre-flight check over 2 ranks" in ranks[0]
    assert _losses(tmp_path / "run") == pytest.approx(reference, abs=1e-5)


def _final_weights(run_dir) -> dict:
    """Model weights of the newest checkpoint (DP=2 with ZeRO-1: the model file holds the whole model)."""
    ckpt = Path(run_dir) / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_sbatch_preempted_job_saves_requeues_and_resumes_to_the_same_result(slurm, tiny_data, tmp_path, pool2):
    """USR1 to the batch script mid-run (what `--signal=B:USR1@300` sends before the time limit): every rank saves at
    the same step and exits with the requeue code, the script requeues the job, the restart resumes from the sharded
    checkpoint, and the run ends with the same final loss and weights as an uninterrupted run."""
    steps = ["train.max_steps=40", "checkpoint.save_at_end=true", "logging.print_every=1"]
    ref = tmp_path / "ref"
    pool2.run(train_preset, "tiny", BASE + steps, tiny_data, ref)
    run, env = tmp_path / "run", dict(slurm, SKIPTRON_LOG_DIR=str(tmp_path / "logs"))
    job = _sbatch(env, "-N", "2", "--ntasks-per-node=1", f"--output={tmp_path}/job.out",
                  "launch/slurm/train.sbatch", *_args(tiny_data, run, *steps))
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 10:
        assert time.monotonic() < deadline and _job_state(env, job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)

    state = _wait_job(env, job, on_pending=_start_requeued_when_ready(env, job))
    batch_log = (tmp_path / "job.out").read_text()
    rank0 = (tmp_path / "logs" / "rank-0.log").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", batch_log + rank0[-3000:]
    assert "(exit 75): requeueing job" in batch_log and f"job {job} restart 1" in batch_log
    assert "resumed from" in rank0
    assert _losses(run)[-1] == pytest.approx(_losses(ref)[-1], abs=1e-5)
    mine, theirs = _final_weights(run), _final_weights(ref)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sbatch_failed_job_requeues_itself_and_resumes_to_the_same_weights(slurm, tiny_data, tmp_path, pool2):
    """Rank 1 (node2) is SIGKILLed at step 12 of a 2-node job: the watchdog ends rank 0 naming it, the batch script
    requeues the job as a failure restart (not only on exit 75), the restart resumes from the step-10 checkpoint,
    and the job completes with the weights, bitwise, of an uninterrupted run."""
    steps = ["train.max_steps=24", "checkpoint.interval=5", "checkpoint.save_at_end=true", "logging.print_every=1",
             "launch.collective_timeout_s=10"]
    run = tmp_path / "run"
    env = dict(slurm, SKIPTRON_LOG_DIR=str(tmp_path / "logs"),
               SKIPTRON_FAULTS=f"kill:step=12:rank=1:once={tmp_path}/fired")
    job = _sbatch(env, "-N", "2", "--ntasks-per-node=1", f"--output={tmp_path}/job.out",
                  "launch/slurm/train.sbatch", *_args(tiny_data, run, *steps))
    pool2.run(train_preset, "tiny", BASE + steps, tiny_data, tmp_path / "ref")
    state = _wait_job(env, job, timeout_s=900, on_pending=_start_requeued_when_ready(env, job))
    batch_log = (tmp_path / "job.out").read_text()
    rank0 = (tmp_path / "logs" / "rank-0.log").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", batch_log + rank0[-3000:]
    assert re.search(r"training failed \(exit \d+\): requeueing job", batch_log), batch_log  # srun: 137 or 76
    assert "(failure restart 1 of 3)" in batch_log
    assert "[watchdog] rank 1 on node2" in rank0 and "died at step 12" in rank0, rank0[-3000:]
    assert "resumed from" in rank0 and "step00000010: step 10" in rank0
    mine, ref = _final_weights(run), _final_weights(tmp_path / "ref")
    assert mine.keys() == ref.keys()
    for name in ref:
        assert ref[name] is None and mine[name] is None or torch.equal(mine[name], ref[name]), name
