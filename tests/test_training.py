"""Training with DeepSpeed across data-parallel, ZeRO and tensor-parallel layouts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import BASE, train_run as _train

def _assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("stage", [0, 1])
def test_dp2_equals_dp1_with_accumulation(pools, tiny_data, tmp_path, stage):
    """DP=2 x micro-batch b updates the weights exactly as DP=1 with two accumulated micro-batches of b. (At DP=1
    ZeRO-1 runs as stage 0 with its gradient all-reduce skipped: engine.zero_stage, engine.gradient_sync.)"""
    ov = [f"zero.stage={stage}", "train.max_steps=3"]
    (ref_losses, ref_weights), = pools(1).run(_train, ov, tiny_data, tmp_path / "dp1")
    runs = pools(2).run(_train, ov, tiny_data, tmp_path / "dp2")
    torch.testing.assert_close(torch.tensor(runs[0][0]), torch.tensor(ref_losses), atol=1e-5, rtol=0)
    for _, weights in runs:
        _assert_same_weights(weights, ref_weights)
    initial = pools(1).run(_train, ov + ["train.max_steps=1", "optimizer.lr=1e-12"], tiny_data, tmp_path / "init")
    assert any((initial[0][1][n] - ref_weights[n]).abs().max() > 1e-4 for n in ref_weights), "weights never moved"


@pytest.mark.parametrize("overrides, world, precision, ran", [
    (["zero.stage=1"], 1, "fp32", 0), (["zero.stage=2", "parallel.tp=2"], 2, "fp32", 0),
    (["zero.stage=1"], 2, "fp32", 1), (["zero.stage=2"], 1, "bf16", 2), (["zero.stage=3"], 1, "fp32", 3),
    (["zero.stage=1", "parallel.pp=2"], 2, "fp32", 1),
])
def test_zero_over_one_dp_rank_in_fp32_runs_as_stage_0(overrides, world, precision, ran):
    """ZeRO 1-2 partition nothing over one DP rank: fp32 without a pipeline runs DeepSpeed's stage 0 (the same
    update, checked against a DP=2 ZeRO-1 run by test_dp2_equals_dp1_with_accumulation[1]); bf16 keeps its fp32
    gradient accumulation, ZeRO-3 its partitioned construction, a pipeline its engine's ZeRO-1."""
    from skiptron.training.config import load_config
    from skiptron.training.engine import deepspeed_config

    cfg = load_config("tiny", overrides)
    assert deepspeed_config(cfg, world, precision)["zero_optimization"]["stage"] == ran


@pytest.mark.parametrize("overrides, stages", [([], (0, 1, 2, 3)), (["model.tie_embeddings=false", "model.vocab_size=512"], (0, 3))],
                         ids=["tied", "untied"])
def test_zero_stages_give_the_same_losses(pool2, tiny_data, tmp_path, overrides, stages):
    """Untied: the loss uses the output layer's weight outside that module's forward (ZeRO-3 gathers it for the
    head's)."""
    losses = {s: pool2.run(_train, overrides + [f"zero.stage={s}"], tiny_data, tmp_path / f"z{s}")[0][0]
              for s in stages}
    for stage in stages[1:]:
        torch.testing.assert_close(torch.tensor(losses[stage]), torch.tensor(losses[0]), atol=1e-5, rtol=0)
    assert losses[0][-1] < losses[0][0]


def test_tp2_trains_like_tp1(pool2, tiny_data, tmp_path):
    """TP=2 (DP=1) and TP=1 (DP=2, each replica on half of the batch) follow the same trajectory."""
    tp1 = pool2.run(_train, ["parallel.tp=1"], tiny_data, tmp_path / "tp1")
    tp2 = pool2.run(_train, ["parallel.tp=2", "zero.stage=2"], tiny_data, tmp_path / "tp2")
    torch.testing.assert_close(torch.tensor(tp2[0][0]), torch.tensor(tp1[0][0]), atol=1e-5, rtol=0)
    _assert_same_weights(tp2[0][1], tp1[0][1])
    _assert_same_weights(tp2[1][1], tp1[0][1])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sequence_parallel_trains_like_tp2(pool2, tiny_data, tmp_path, stage):
    """TP=2 with sequence parallelism (gloo: emulated reduce-scatter) follows TP=2's trajectory, norm gains included
    (their gradients are summed over the sequence shards once, before ZeRO sees them)."""
    ov = ["parallel.tp=2", f"zero.stage={stage}", "parallel.activation_checkpointing=every:2"]
    ref = pool2.run(_train, ov, tiny_data, tmp_path / "tp2")
    runs = pool2.run(_train, ov + ["parallel.sequence_parallel=true"], tiny_data, tmp_path / "sp")
    torch.testing.assert_close(torch.tensor(runs[0][0]), torch.tensor(ref[0][0]), atol=1e-5, rtol=0)
    for (_, weights), (_, ref_weights) in zip(runs, ref):
        _assert_same_weights(weights, ref_weights)


def _train_counting_graphs(overrides, data, run_dir):
    """`_train`, plus how many graphs torch.compile built during it (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    losses, weights = _train(overrides, data, run_dir)
    return losses, weights, counters["stats"]["unique_graphs"] - before


@pytest.mark.parametrize("model", [[], ["model.num_layers=2", "model.skip.enabled=true", "model.skip.kv=active"]],
                         ids=["dense", "routed"])
def test_compiled_blocks_train_like_eager(pools, tiny_data, tmp_path, model):
    """train.compile=true (torch.compile of each block) follows eager's losses and weights to fp32 tolerance, dense
    and routed (the active-token counts change every step: dynamic shapes). With the aot_eager backend (graph capture
    and AOT autograd, no code generation: inductor's C++ build takes minutes on these 2 cores; skiptron-bench
    measures inductor)."""
    ov = ["train.max_steps=3", "model.num_layers=1", "train.compile_backend=aot_eager"] + model
    (eager, eager_weights, none), = pools(1).run(_train_counting_graphs, ov, tiny_data, tmp_path / "eager")
    (compiled, weights, graphs), = pools(1).run(_train_counting_graphs, ov + ["train.compile=true"], tiny_data,
                                                tmp_path / "compiled")
    assert none == 0 and graphs > 0, (none, graphs)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-5, rtol=0)
    _assert_same_weights(weights, eager_weights)


def test_cli_run_under_torchrun(tiny_data, tmp_path):
    """The console script under torchrun: the model learns, and metrics, config and curves are written."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29613",
           "-m", "skiptron.tools.train", "--config", "tiny", *BASE, f"data.path={tiny_data}", f"run.dir={run}",
           "train.max_steps=40", "eval.interval=20", "optimizer.lr=5e-3", "optimizer.warmup_steps=5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= records[0].keys()
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert (run / "config.yaml").is_file() and (run / "curves.png").is_file()
    assert "curves" in out.stdout
    # a pipe gets plain lines; no third-party noise by default; rank 1 is silent (tests/test_cli.py: --verbose)
    from test_cli import NOISE

    assert "\x1b" not in out.stdout and "step 40/40 | loss" in out.stdout
    assert not [n for n in NOISE if n in out.stdout + out.stderr], (out.stdout + out.stderr)[-3000:]
    assert "[launch] rank 0/2" in out.stderr and "[launch] rank 1/2" not in out.stderr


def _routed_inductor_vs_eager(overrides):
    """Losses and gradients of a routed model, eager and with `compile_blocks` (inductor), over steps whose
    active-token counts differ."""
    from skiptron.parallel.state import init_model_parallel
    from skiptron.training.config import load_config
    from skiptron.training.model import GPT, compile_blocks

    init_model_parallel(1, 1, torch.device("cpu"))
    cfg = load_config("tiny", ["model.num_layers=1", "model.seq_len=64", "model.skip.enabled=true"] + overrides)
    def build():
        torch.manual_seed(0)
        return GPT(cfg.model, 512, 1, balance=None)

    eager, compiled = build(), build()
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), compiled.parameters()))
    names = compile_blocks(compiled, "inductor")
    counts, out = [], []
    for step in range(3):
        tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(step))
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss, _, routing = model(tokens, return_output=True)
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            if model is eager:
                counts.append(routing[0].active_tokens)
    return names, counts, out


@pytest.mark.parametrize("kv", ["all", "active"])
def test_inductor_compiles_a_routed_block_like_eager(pools, kv):
    """The inductor backend (the test above uses aot_eager) on a routed block: its decision-shaped frames once made
    inductor fail on symbolic sizes, so only the router, norms and MLP are compiled; they must match eager."""
    names, counts, out = pools(1).run(_routed_inductor_vs_eager, [f"model.skip.kv={kv}"])[0]
    assert {"blocks.0.block.mlp", "blocks.0.router.proj"} <= set(names) and "blocks.0" not in names, names
    assert len(set(counts)) > 1, counts  # the compiled MLP saw several row counts
    for (loss_e, grads_e), (loss_c, grads_c) in zip(out[::2], out[1::2]):
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=0)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)


def _train_step_reads(overrides):
    """The host's reads of device values during one train step (DP=2, ZeRO-1, 2 micro-batches), by whose code."""
    from skiptron.parallel import state
    from skiptron.parallel.syncs import host_reads
    from skiptron.training.config import load_config
    from skiptron.training.engine import build_engine
    from skiptron.training.trainer import Trainer, build_model, seed_everything

    cfg = load_config("tiny", ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32",
                               "train.micro_batch_size=2", "train.global_batch_size=8"] + overrides)
    layout = state.init_model_parallel(1, 1, torch.device("cpu"))
    seed_everything(0)
    engine, precision = build_engine(cfg, build_model(cfg, 512, layout.device), layout)
    trainer = Trainer(cfg, layout, engine, precision, 512, manifest={})
    batches = [torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(layout.rank * 2 + i))
               for i in range(2)]
    trainer.train_step(iter(batches))
    with host_reads() as reads:
        trainer.train_step(iter(batches))
    engine.destroy()
    root = str(Path(build_model.__code__.co_filename).parents[1])  # skiptron's package directory
    ours = [r for r in reads if r.caller.startswith(root) and "site-packages" not in r.caller]
    return [f"{r.op} at {r.caller}" for r in ours], len(reads) - len(ours)


@pytest.mark.parametrize("overrides", [[], ["model.skip.enabled=true"],
                                       ["model.skip.enabled=true", "model.skip.mode=capacity",
                                        "parallel.balance_min_tokens=0"]], ids=["dense", "threshold", "capacity"])
def test_a_train_step_reads_the_device_once_per_routed_layer(pool2, overrides):
    """What makes a GPU's host wait in a train step, in skiptron's code: the step's loss and routing metrics (two
    reads), and one per routed layer and micro-batch (its counts); nothing per dense layer, micro-batch or
    parameter. DeepSpeed's ZeRO step reads its gradient norm's validity itself (counted apart, not bounded here)."""
    for ours, _ in pool2.run(_train_step_reads, overrides):
        routed = 2 * 2 if overrides else 0  # 2 routed layers x 2 micro-batches
        assert len(ours) == routed + (2 if overrides else 1), ours
