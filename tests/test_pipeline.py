"""Pipeline parallelism (DeepSpeed's pipeline engine) composed with megatron-core TP and DP: every (TP, PP, DP)
layout trains the same model to the same numbers."""
import pytest
import torch

from runs import BASE, signal_at_step

LAYOUTS = [  # (tp, pp, dp, extra overrides)
    (1, 1, 1, []), (2, 1, 1, []), (1, 2, 1, []), (1, 1, 2, []), (2, 2, 1, []), (1, 2, 2, []), (2, 1, 2, []),
    (2, 2, 2, []),  # 8 processes on the test machine's cores: the model stays tiny (BASE: 2 layers, hidden 64)
    (2, 2, 1, ["zero.stage=0"]),  # the pipeline without ZeRO: the optimizer step clips (training/clipping.py)
]
METRICS = ("loss", "grad_norm")


def _train(overrides, data, run_dir, metrics=("loss",), stop_at=None):
    """Train BASE + overrides; returns per rank: rank 0 the logged metrics and whole weights, every rank its
    (megatron, deepspeed) coordinates and, on pipeline stages holding it, the tied embedding weight."""

    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from skiptron.training.config import load_config
    from skiptron.training.metrics import read_metrics
    from skiptron.training.pipeline import GPTPipe, check_rank_mapping
    from skiptron.training.trainer import Trainer
    from skiptron.training.weights import full_state_dict

    cfg = load_config(None, BASE + [f"data.path={data}", f"run.dir={run_dir}"] + list(overrides))
    trainer = Trainer.setup(cfg)
    if stop_at:
        signal_at_step(trainer, stop_at)
    trainer.run()
    module = trainer.engine.module
    weights = full_state_dict(module)
    lay = trainer.layout
    if isinstance(module, GPTPipe):
        coords = module.rank_coordinates[lay.rank]
        tied = module.tied_embedding()
        tied = None if tied is None else tied.detach().clone()
    else:
        topo = PipeModelDataParallelTopology(num_pp=lay.pp, num_mp=lay.tp, num_dp=lay.dp)
        coords, tied = check_rank_mapping(topo, lay.device)[lay.rank], None
    dist.barrier()
    values = None
    if dist.get_rank() == 0:
        records = read_metrics(run_dir)
        values = {k: [m.get(k) for m in records] for k in metrics}
        values["step"] = [m["step"] for m in records]
    return {"metrics": values, "weights": weights if dist.get_rank() == 0 else None, "coords": coords,
            "tied": tied, "stage": lay.pp_rank}


def _layout(tp, pp, dp):
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", "train.micro_batch_size=1", "train.global_batch_size=4"]


@pytest.fixture(scope="module")
def reference(pools, tiny_data, tmp_path_factory):
    return pools(1).run(_train, _layout(1, 1, 1), tiny_data, tmp_path_factory.mktemp("ref"), METRICS)[0]


def _same_weights(a, b, atol=1e-4):  # Adam amplifies float noise on tiny gradients
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert torch.all(diff <= atol + 1e-4 * b[name].abs()), f"{name}: max difference {diff.max().item():.3g}"


@pytest.mark.parametrize("tp,pp,dp,extra", LAYOUTS,
                         ids=[f"tp{t}-pp{p}-dp{d}" + "".join(f"-{o}" for o in e) for t, p, d, e in LAYOUTS])
def test_layout_trains_like_one_process(pools, tiny_data, tmp_path, reference, tp, pp, dp, extra):
    """Losses over 5 steps equal (1,1,1)'s to 1e-4, whole weights to 1e-5; megatron-core and DeepSpeed agree on
    every rank's (pp, dp, tp); the tied embedding is identical on the first and last stage after training. The
    gradient norm, clipped to 1 (it starts above), is the same whether DeepSpeed's ZeRO optimizer or the optimizer
    step at stage 0 (the reference, TP=2, TP=2 x PP=2 with zero.stage=0) computes it: tensor-parallel replicas and
    the second stage's copy of the tied embedding count once."""
    runs = pools(tp * pp * dp).run(_train, _layout(tp, pp, dp) + extra, tiny_data, tmp_path / "run", METRICS)
    losses = runs[0]["metrics"]["loss"]
    assert len(losses) == 5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["metrics"]["loss"]), atol=1e-4, rtol=0)
    norms = torch.tensor(reference["metrics"]["grad_norm"])
    assert norms[0] > 1, norms
    torch.testing.assert_close(torch.tensor(runs[0]["metrics"]["grad_norm"]), norms, atol=0, rtol=1e-4)
    _same_weights(runs[0]["weights"], reference["weights"])
    _check_ranks(runs, tp, pp, dp)


def _check_ranks(runs, tp, pp, dp):
    """Both libraries place every rank at the same, expected (pp, dp, tp); the tied embedding is identical on the
    first and last stage after training."""
    for rank, run in enumerate(runs):
        assert run["coords"]["megatron"] == run["coords"]["deepspeed"]
        assert run["coords"]["megatron"] == (rank // (tp * dp), rank // tp % dp, rank % tp)
    if pp > 1:
        tied = {}
        for run in runs:
            if run["tied"] is not None:
                tied.setdefault(run["stage"], []).append(run["tied"])
        assert sorted(tied) == [0, pp - 1] and len(tied[0]) == tp * dp
        for first, last in zip(tied[0], tied[pp - 1]):  # same (DP, TP) position on both ends (ranks in order)
            assert torch.equal(first, last)


SKIP = ["model.skip.enabled=true", "model.skip.target_rate=0.5", "model.num_layers=4", "parallel.balance_tokens=true",
        "parallel.balance_min_tokens=0"]
SKIP_METRICS = ("loss", "skip/exec_rate", "skip/aux_loss", "skip/imbalance_before", "skip/rate/L0", "skip/rate/L3")


@pytest.fixture(scope="module")
def routed_reference(pools, tiny_data, tmp_path_factory):
    return pools(1).run(_train, _layout(1, 1, 1) + SKIP, tiny_data, tmp_path_factory.mktemp("routed"),
                        SKIP_METRICS)[0]


@pytest.mark.parametrize("tp,pp,dp", [(1, 2, 2), (2, 2, 2)], ids=["tp1-pp2-dp2", "tp2-pp2-dp2"])
def test_skip_routing_under_pipeline(pools, tiny_data, tmp_path, routed_reference, tp, pp, dp):
    """Routed layers on both stages, with the DP token balancer running in each stage's DP group and every other
    block recomputed in the backward: losses, routing metrics and weights (routers included) equal those of
    (1,1,1); rank mapping and tied embedding as in the plain layouts."""
    ref = routed_reference
    runs = pools(tp * pp * dp).run(_train, _layout(tp, pp, dp) + SKIP + ["parallel.activation_checkpointing=every:2"],
                                   tiny_data, tmp_path / "pp", SKIP_METRICS)
    got = runs[0]["metrics"]
    for key in ("loss", "skip/exec_rate", "skip/aux_loss", "skip/rate/L0", "skip/rate/L3"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(ref["metrics"][key]), atol=1e-4, rtol=0,
                                   msg=key)
    assert all(v is not None for v in got["skip/imbalance_before"]), "the balancer did not run"
    assert any(v > 0 for v in got["skip/aux_loss"])
    _same_weights(runs[0]["weights"], ref["weights"])
    assert any("router" in n for n in ref["weights"])
    _check_ranks(runs, tp, pp, dp)


def test_activation_checkpointing_changes_nothing(pools, tiny_data, tmp_path, reference):
    for spec in ("full", "every:2"):
        run = pools(2).run(_train, _layout(1, 2, 1) + [f"parallel.activation_checkpointing={spec}"], tiny_data,
                           tmp_path / spec.replace(":", ""))[0]
        torch.testing.assert_close(torch.tensor(run["metrics"]["loss"]), torch.tensor(reference["metrics"]["loss"]),
                                   atol=1e-4, rtol=0)
    run = pools(1).run(_train, _layout(1, 1, 1) + ["parallel.activation_checkpointing=full"], tiny_data,
                       tmp_path / "gpt")[0]
    torch.testing.assert_close(torch.tensor(run["metrics"]["loss"]), torch.tensor(reference["metrics"]["loss"]),
                               atol=1e-5, rtol=0)


def test_resume_under_tp2_pp2_and_resharded(pools, tiny_data, tmp_path):
    """6 steps == 3 steps, stopped by a signal and checkpointed, + resume + 3 steps, under (2,2,1): exact. The
    step-3 checkpoint resharded to (1,1,2) (PP -> no PP) continues the same trajectory, and that run's step-4
    checkpoint resharded back to (1,2,2) (no PP -> PP) too: Adam moments came over, so several steps agree."""
    ov = ["train.max_steps=6", "checkpoint.keep=0"]
    pool = pools(4)
    full = pool.run(_train, _layout(2, 2, 1) + ov, tiny_data, tmp_path / "full")[0]
    first = pool.run(_train, _layout(2, 2, 1) + ov, tiny_data, tmp_path / "cut", stop_at=3)[0]
    assert first["metrics"]["step"] == [1, 2, 3]
    cut = tmp_path / "cut/checkpoints/step00000003"
    second = pool.run(_train, _layout(2, 2, 1) + ov, tiny_data, tmp_path / "cut")[0]
    assert second["metrics"]["step"] == [1, 2, 3, 4, 5, 6]
    assert second["metrics"]["loss"] == full["metrics"]["loss"]
    for name, value in full["weights"].items():
        assert torch.equal(value, second["weights"][name]), name

    ref = dict(zip(full["metrics"]["step"], full["metrics"]["loss"]))
    to_dp = pools(2).run(_train, _layout(1, 1, 2) + ov + [f"resume={cut}", "checkpoint.interval=4"], tiny_data,
                         tmp_path / "to-dp")[0]
    assert to_dp["metrics"]["step"] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor(to_dp["metrics"]["loss"]), torch.tensor([ref[s] for s in (4, 5, 6)]),
                               atol=1e-5, rtol=0)
    _same_weights(to_dp["weights"], full["weights"], atol=1e-5)
    back = pool.run(_train, _layout(1, 2, 2) + ov + [f"resume={tmp_path / 'to-dp/checkpoints/step00000004'}"],
                    tiny_data, tmp_path / "back")[0]
    assert back["metrics"]["step"] == [5, 6]
    torch.testing.assert_close(torch.tensor(back["metrics"]["loss"]), torch.tensor([ref[5], ref[6]]), atol=1e-5,
                               rtol=0)
    _same_weights(back["weights"], full["weights"], atol=1e-5)


def test_bubble_and_stage_memory_are_reported(pool2, tiny_data, tmp_path):
    """(1,2,1) with 1 and with 8 micro-batches per step: every step logs each stage's bubble fraction in (0, 1)
    and peak memory; the bubble shrinks with more micro-batches, as (p-1)/(m+p-1) says (1/2 -> 1/9). Micro-batches
    of 8 samples and hidden 256, so that compute, not the p2p latency of tiny messages, fills the schedule."""
    metrics = ("pipe/bubble", "pipe/bubble/S0", "pipe/bubble/S1", "mem/S0_gb", "mem/S1_gb")
    bubble = {}
    for m in (1, 8):
        ov = ["parallel.pp=2", "model.hidden_size=256", "train.micro_batch_size=8", f"train.global_batch_size={8 * m}",
              "train.max_steps=3"]
        got = pool2.run(_train, ov, tiny_data, tmp_path / f"m{m}", metrics)[0]["metrics"]
        for key in metrics:
            assert len(got[key]) == 3 and all(v is not None for v in got[key]), key
        for key in ("pipe/bubble/S0", "pipe/bubble/S1"):
            assert all(0 < v < 1 for v in got[key]), (m, key, got[key])
        for key in ("mem/S0_gb", "mem/S1_gb"):  # peak RSS of a torch process on CPU: some 0.1 to a few GiB
            assert all(0.05 < v < 16 for v in got[key]), (m, key, got[key])
        bubble[m] = sum(got["pipe/bubble"]) / 3
    assert bubble[1] > 0.25 and bubble[8] < bubble[1] - 0.1, bubble


def _mismatched_topology():
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from skiptron.parallel.state import init_model_parallel
    from skiptron.training.pipeline import MappingError, check_rank_mapping

    init_model_parallel(2, 1, torch.device("cpu"))
    check_rank_mapping(ProcessTopology(axes=["pipe", "data", "model"], dims=[1, 2, 2]), torch.device("cpu"))  # agrees
    try:
        check_rank_mapping(ProcessTopology(axes=["pipe", "model", "data"], dims=[1, 2, 2]), torch.device("cpu"))  # TP across the slow axis
    except MappingError as err:
        return str(err)
    return None


def test_rank_mapping_mismatch_is_an_error(pool4):
    for message in pool4.run(_mismatched_topology):
        assert message and "rank mapping differs" in message and "megatron (pp, dp, tp)" in message


@pytest.mark.parametrize("overrides,match", [
    (["parallel.pp=2", "zero.stage=2"], "ZeRO-2 cannot be combined with pipeline"),
    (["parallel.pp=2", "zero.stage=3"], "ZeRO-3 cannot be combined with pipeline"),
    (["parallel.pp=8"], "every stage needs at least one block"),
    (["parallel.sequence_parallel=true", "parallel.pp=2"], "parallel.pp: pipeline parallelism"),
    (["parallel.activation_checkpointing=some"], "parallel.activation_checkpointing"),
])
def test_pipeline_config_validation(overrides, match):
    from skiptron.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, BASE + overrides)
