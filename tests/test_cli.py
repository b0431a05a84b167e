"""The command line: every option documented, config errors in one line, no third-party noise, plain progress
lines when a launcher forwards the output."""
import argparse
import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from runs import BASE

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Transformer Engine and Apex are not installed", "FutureWarning", "DeprecationWarning",
         "Setting accelerator to CPU", "deepspeed_shm_comm_op built successfully")


def console_scripts() -> dict[str, str]:
    """name -> module of every console script setup.py installs."""
    text = (ROOT / "setup.py").read_text()
    return dict(re.findall(r'"(skiptron-[\w-]+)=(skiptron\.tools\.\w+):main"', text))


def _walk(parser: argparse.ArgumentParser, prog: str):
    """(command, option) of every option and positional of `parser` and its sub-commands, with its help."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield prog, f"sub-command {name}", helps.get(name)
                yield from _walk(sub, f"{prog} {name}")
            continue
        yield prog, "/".join(action.option_strings) or action.dest, action.help


def test_every_option_of_every_console_script_has_help():
    scripts = console_scripts()
    assert len(scripts) >= 12, scripts
    missing, without_verbose = [], []
    for name, module in scripts.items():
        parser = importlib.import_module(module).build_parser()
        options = list(_walk(parser, name))
        missing += [f"{prog}: {option}" for prog, option, help_text in options
                    if not help_text or help_text == argparse.SUPPRESS]
        leaves = {prog for prog, _, _ in options}
        without_verbose += [prog for prog in leaves if not any(p == prog and o == "--verbose" for p, o, _ in options)
                            and not any(p.startswith(prog + " ") for p in leaves)]
    assert not missing, f"options without --help text: {missing}"
    assert not without_verbose, f"commands without --verbose: {without_verbose}"


def test_yaml_syntax_error_is_one_config_error_line(tmp_path, capsys):
    from skiptron.tools.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: [64\ntrain:\n  max_steps: 3\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(rf"skiptron-train: config error: {re.escape(str(bad))}:4:6: YAML syntax error: .+", lines[0]), \
        lines[0]


def test_override_that_is_not_yaml_names_the_override():
    from skiptron.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"override 'model.skip.layers=\[1, 2': not a YAML value"):
        load_config(None, ["model.skip.layers=[1, 2"])


def _single_rank_run(args, data, run_dir, env=None, launcher=()):
    cmd = [*launcher, sys.executable, "-m", "skiptron.tools.train", "--config", "tiny", *BASE, f"data.path={data}",
           f"run.dir={run_dir}", "train.max_steps=3", "logging.print_every=1", "launch.health_check=false", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_verbose_brings_the_third_party_warnings_back(tiny_data, tmp_path):
    """(Their absence by default is checked on the 2-rank torchrun run of tests/test_training.py.)"""
    verbose = _single_rank_run(["--verbose"], tiny_data, tmp_path / "verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Transformer Engine and Apex are not installed" in verbose.stderr
    assert "step 3/3" in verbose.stdout


@pytest.mark.skipif(not shutil.which("mpirun"), reason="no mpirun (tests/run.sh installs openmpi-bin as root)")
def test_progress_under_mpirun_is_plain_lines(tiny_data, tmp_path):
    """OpenMPI gives its ranks a pseudo-terminal even when mpirun's own output is a pipe: the live bar would fill
    the log with escape codes. One rank started by mpirun (rank and rendezvous given, so no mpi4py is needed)."""
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    rank = ["-x", "RANK=0", "-x", "WORLD_SIZE=1", "-x", "MASTER_ADDR=127.0.0.1", "-x", "MASTER_PORT=29671",
            "-x", "OMP_NUM_THREADS=1", "-x", "DS_ACCELERATOR=cpu"]
    probe = subprocess.run(["mpirun", "--oversubscribe", "-np", "1", sys.executable, "-c",
                            "import sys; print(sys.stdout.isatty())"], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, **env))
    out = _single_rank_run([], tiny_data, tmp_path / "mpi", env=env,
                           launcher=("mpirun", "--oversubscribe", "-np", "1", *rank))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "\x1b" not in out.stdout, out.stdout[-2000:]
    assert not [n for n in NOISE if n in out.stdout + out.stderr], (out.stdout + out.stderr)[-3000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("step ")][-1].startswith("step 3/3 | loss")
    assert probe.stdout.strip() == "True"  # the case this guards: the rank's stdout is a terminal


def test_pretraining_leaves_finetuning_to_skiptron_finetune(capsys):
    """trainer.py does not import the finetuning code; skiptron-train sends finetune.* settings to skiptron-finetune
    (which passes masking.Finetuning to the trainer's one extension point: tests/test_masking.py)."""
    from skiptron.tools.train import main

    probe = subprocess.run([sys.executable, "-c", "import sys, skiptron.training.trainer; "
                            "print('skiptron.training.masking' in sys.modules)"], capture_output=True, text=True,
                           timeout=300)
    assert probe.stdout.strip() == "False", probe.stderr[-2000:]
    assert main(["--config", "tiny", "finetune.method=mask"]) == 2
    assert "skiptron-finetune train" in capsys.readouterr().err


def test_which_launchers_forward_the_output():
    from skiptron.parallel.launch import output_is_forwarded

    assert output_is_forwarded({"OMPI_COMM_WORLD_SIZE": "8"}) and output_is_forwarded({"PMI_SIZE": "8"})
    assert output_is_forwarded({"SLURM_STEP_ID": "0", "SLURM_PROCID": "3"})
    assert not output_is_forwarded({"SLURM_STEP_ID": "0", "SLURM_PTY_PORT": "4242"})  # srun --pty: a real terminal
    assert not output_is_forwarded({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"})


def test_bench_interval_of_the_rounds_median():
    """`skiptron-bench`'s bootstrap interval: a shift every round shows lies outside it, noise around parity inside."""
    from skiptron.tools.bench import median_interval

    faster = [1.04, 1.06, 1.05, 1.07, 1.03, 1.05, 1.06, 1.04]
    low, high = median_interval(faster)
    assert 1.0 < low <= 1.05 <= high < 1.07
    low, high = median_interval([0.93, 1.08, 0.97, 1.05, 1.01, 0.95, 1.04, 0.99])
    assert low < 1.0 < high
    assert median_interval([1.2]) == (1.2, 1.2)


def test_bench_times_skiptron_against_transformers_llama(tmp_path):
    """Two rounds of `skiptron-bench` on a toy shape: both systems step, the JSON holds the ratio,
    the rounds' ratios and their interval."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "skiptron.tools.bench", "--config", "tiny", "model.num_layers=1",
                          "model.hidden_size=64", "model.num_heads=2", "model.seq_len=32", "train.micro_batch_size=2",
                          "train.global_batch_size=2", "--vocab-size", "256", "--rounds", "2", "--steps", "1",
                          "--warmup", "1", "--no-plain", "--matmul-size", "64", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    import json

    result = json.loads(out.read_text())
    assert len(result["ratio_llama_per_round"]) == 2 and result["ratio_llama"] > 0
    low, high = result["ratio_llama_median_of_rounds_95"]
    assert low <= result["ratio_llama_median_of_rounds"] <= high
    assert result["skiptron"]["tokens_per_s"] > 0 and result["llama"]["tokens_per_s"] > 0
    assert "95% bootstrap interval" in run.stdout


TOY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=2", "model.seq_len=32",
       "train.micro_batch_size=2", "train.global_batch_size=2"]


def _bench_routing(tmp_path, mode: str, *args: str) -> tuple[dict, str]:
    out = tmp_path / f"{mode}.json"
    run = subprocess.run([sys.executable, "-m", "skiptron.tools.bench_routing", mode, *args, "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    import json

    return json.loads(out.read_text()), run.stdout


def test_bench_routing_compute_prices_routed_steps_by_their_flops(tmp_path):
    """`skiptron-bench-routing compute` on a toy shape: every routed variant runs fewer FLOPs than the dense model
    (rate 0.5), and each time / FLOP ratio comes with the rounds' median inside its interval."""
    result, stdout = _bench_routing(tmp_path, "compute", "--modes", "capacity", "--rounds", "2", "--steps", "1",
                                    "--warmup", "1", "--vocab-size", "256", *TOY)
    assert set(result["step_s"]) == {"dense", "routed kv=all", "routed kv=active"}
    assert result["flop_ratio_vs_dense"]["dense"] == 1.0
    for name, ratio in result["flop_ratio_vs_dense"].items():
        assert result["step_s"][name] > 0
        if name != "dense":
            assert 0.5 < ratio < 1.0, (name, ratio)
            low, high = result["overhead_vs_flops_median_of_rounds_95"][name]
            assert low <= statistics.median(result["overhead_vs_flops_per_round"][name]) <= high
    assert "target: time / FLOP ratio <= 1.15" in stdout


def test_bench_routing_decode_and_plan_report(tmp_path):
    """`decode`: tokens/s at batch 1 and 8 for the dense model and every router, with the routed models' execution
    rates; `plan`: the balancer's host time for each DP group size asked for."""
    result, _ = _bench_routing(tmp_path, "decode", "--rounds", "1", "--warmup", "0", "--prompt", "4",
                               "--new-tokens", "3", "--vocab-size", "256", *TOY)
    for batch in ("batch1", "batch8"):
        rates, per_s = result[batch]["exec_rate"], result[batch]["tokens_per_s"]
        assert rates["dense"] == 1.0 and len(rates) >= 4, rates
        assert all(0.0 <= r <= 1.0 for r in rates.values()) and all(v > 0 for v in per_s.values())
    plan, stdout = _bench_routing(tmp_path, "plan", "--worlds", "8,64", "--rounds", "1", "--steps", "2",
                                  "--warmup", "0")
    assert set(plan) == {"8", "64"} and all(v > 0 for v in plan.values()), plan
    assert "DP group of     64 ranks" in stdout
