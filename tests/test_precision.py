"""Reduced precision on CPU (DeepSpeed's CPU accelerator): bf16 training across layouts, exact resume, resharding
of bf16 checkpoints of every ZeRO stage; fp16 where this CPU allows it; TF32 / deterministic switches.

Tolerances: bf16 keeps fp32 master weights and (ZeRO 1-3) fp32 gradient accumulation, but the forward and backward
run in bf16 (8-bit mantissa, relative rounding 2^-8 = 0.4%). Layouts that only regroup fp32 sums (DP=2 vs DP=1 x 2
accumulated micro-batches, ZeRO 0 vs 1 vs 2 vs 3 with one micro-batch per rank) agree to 1e-3 in the loss; layouts
that change bf16 matmul shapes (TP=2 vs TP=1) to BF16_LOSS_ATOL.
"""
import os

import pytest
import torch

from runs import train_run as _train
from test_checkpoint import _train as _ckpt_train

BF16 = ["train.precision=bf16"]
BF16_LOSS_ATOL = 2e-2  # 5 steps of a 2-layer model, losses ~5: 0.4%, a few bf16 roundings
FP32_REGROUPED_ATOL = 1e-3


def _close(a, b, atol):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


def _close_weights(a: dict, b: dict, steps: int = 5, lr: float = 3e-3):
    """Weights of two bf16 runs: Adam moves an element by at most ~lr per step, so rounding noise on near-zero
    gradients can separate single elements by up to 2 x steps x lr; on average they must stay far closer."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert diff.max() <= 2 * steps * lr and diff.mean() < 1e-3, (name, diff.max().item(), diff.mean().item())


def _bf16_representable(weights: dict) -> bool:
    return all(torch.equal(w, w.bfloat16().float()) for w in weights.values())


def test_bf16_trains_and_tp2_matches_tp1(pool2, tiny_data, tmp_path):
    """bf16 TP=2 (DP=1) follows TP=1 (DP=2) within bf16 tolerance, and both learn in bf16."""
    tp1 = pool2.run(_train, BF16 + ["parallel.tp=1", "zero.stage=1"], tiny_data, tmp_path / "tp1")
    tp2 = pool2.run(_train, BF16 + ["parallel.tp=2", "zero.stage=1"], tiny_data, tmp_path / "tp2")
    losses = tp1[0][0]
    assert losses[-1] < losses[0] - 0.3, losses
    _close(tp2[0][0], losses, BF16_LOSS_ATOL)
    assert _bf16_representable(tp1[0][1]) and _bf16_representable(tp2[0][1]), "the model did not run in bf16"
    _close_weights(tp2[0][1], tp1[0][1])


def test_bf16_dp2_equals_dp1_with_accumulation(pools, tiny_data, tmp_path):
    """DP=2 x micro-batch b == DP=1 x 2 accumulated micro-batches of b (fp32 accumulation and reduction)."""
    ov = BF16 + ["zero.stage=1", "train.max_steps=3"]
    (ref, ref_weights), = pools(1).run(_train, ov, tiny_data, tmp_path / "dp1")
    runs = pools(2).run(_train, ov, tiny_data, tmp_path / "dp2")
    _close(runs[0][0], ref, FP32_REGROUPED_ATOL)
    _close_weights(runs[0][1], ref_weights, steps=3)


# One bf16 run per ZeRO stage (DP=2, deterministic mode, 6 steps, a checkpoint at step 3) serves the tests below.
STEPS, HALF = 6, 3
RUN = BF16 + [f"train.max_steps={STEPS}", f"checkpoint.interval={HALF}", "train.deterministic=true"]


@pytest.fixture(scope="module")
def bf16_runs(pools, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {s: {"result": pools(2).run(_ckpt_train, RUN + [f"zero.stage={s}"], tiny_data, root / f"z{s}"),
                "checkpoint": root / f"z{s}" / "checkpoints" / f"step{HALF:08d}"} for s in range(4)}


def test_bf16_zero_stages_agree(bf16_runs):
    losses = {s: [run["result"][0]["losses"][i] for i in range(1, STEPS + 1)] for s, run in bf16_runs.items()}
    """ZeRO 0-3 in bf16 follow the same trajectory. ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer) reduces bf16
    gradients, 1-3 fp32 ones: with one micro-batch per rank that regroups no sum, so all agree to 1e-3. (Before
    `engine._undo_fp16_optimizer_init_step`, ZeRO-0 was 1.6% off after 5 steps: DeepSpeed's zero-gradient step at
    construction left Adam's step count at 1.)"""
    for stage in (0, 2, 3):
        _close(losses[stage], losses[1], FP32_REGROUPED_ATOL)
    assert losses[1][-1] < losses[1][0] - 0.3


def test_bf16_exact_resume_in_deterministic_mode(pool2, tiny_data, tmp_path, bf16_runs):
    """bf16, ZeRO-1, deterministic mode: resuming the step-3 checkpoint gives steps 4-6 and the final weights
    bitwise equal to the uninterrupted run."""
    full = bf16_runs[1]["result"]
    resumed = pool2.run(_ckpt_train, RUN + ["zero.stage=1", f"resume={bf16_runs[1]['checkpoint']}"], tiny_data,
                        tmp_path / "resumed")
    assert resumed[0]["start"] == HALF
    assert all(resumed[0]["losses"][s] == full[0]["losses"][s] for s in range(HALF + 1, STEPS + 1))
    for rank in range(2):
        for name, w in full[rank]["weights"].items():
            assert torch.equal(resumed[rank]["weights"][name], w), name


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_checkpoint_of_every_zero_stage_reshards(pool2, tiny_data, tmp_path, bf16_runs, stage):
    """A bf16 checkpoint of ZeRO stage s resumes under TP=2 and another ZeRO stage: the fp32 masters and Adam
    moments come over (from DeepSpeed's bf16 files; ZeRO-0's masters from its FP16_Optimizer state), so the run
    continues the original trajectory within bf16 tolerance (a resume that lost them would restart near the
    initial loss, ~0.5 higher). Into ZeRO-3 and ZeRO-0 the shards are read ahead in a background thread (a 1 MB
    bucket) while the caller gathers ZeRO-3's parameters or fills FP16_Optimizer's masters; into 1 and 2, one at a
    time."""
    after = {0: 1, 1: 0, 2: 3, 3: 2}[stage]
    full = bf16_runs[stage]["result"]
    read_ahead = "checkpoint.reshard_bucket_mb=" + ("1" if after in (0, 3) else "0")
    resumed = pool2.run(_ckpt_train, RUN + [f"zero.stage={after}", "parallel.tp=2", read_ahead,
                                            f"resume={bf16_runs[stage]['checkpoint']}"], tiny_data, tmp_path / "run")
    assert resumed[0]["start"] == HALF
    ref, got = full[0]["losses"], resumed[0]["losses"]
    _close([got[s] for s in range(HALF + 1, STEPS + 1)], [ref[s] for s in range(HALF + 1, STEPS + 1)],
           BF16_LOSS_ATOL)
    _close_weights(resumed[0]["weights"], full[0]["weights"], steps=HALF)


def test_fp16_where_the_cpu_allows_it(pool2, tiny_data, tmp_path):
    """fp16 (dynamic loss scaling) trains and ZeRO 0-3 agree, on CPUs with oneDNN fp16; elsewhere the config is
    refused naming the key and the reason."""
    from skiptron.training.config import load_config
    from skiptron.training.engine import cpu_fp16_supported, resolve_precision

    if not cpu_fp16_supported():
        with pytest.raises(ValueError, match="train.precision: fp16 needs a CPU with oneDNN fp16"):
            resolve_precision(load_config(None, ["train.precision=fp16"]), torch.device("cpu"))
        pytest.skip("this CPU has no oneDNN fp16: DeepSpeed's CPU accelerator refuses fp16 (the refusal is checked)")
    losses = {s: pool2.run(_train, ["train.precision=fp16", f"zero.stage={s}"], tiny_data, tmp_path / f"z{s}")[0][0]
              for s in range(4)}
    assert losses[0][-1] < losses[0][0]
    for stage in (1, 2, 3):
        _close(losses[stage], losses[0], BF16_LOSS_ATOL)


def test_numeric_switches():
    """train.tf32 and train.deterministic set torch's process-wide switches (and turn them back off)."""
    from skiptron.training import numerics
    from skiptron.training.config import load_config

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    applied = {}
    try:
        applied = numerics.configure(load_config(None, ["train.tf32=false", "train.deterministic=true"]).train)["env"]
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        numerics.configure(load_config(None, []).train)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        numerics.set_deterministic(False)
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
        for key in applied:
            os.environ.pop(key, None)
