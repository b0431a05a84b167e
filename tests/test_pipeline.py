"""Pipeline parallelism (DeepSpeed's pipeline engine) composed with megatron-core TP and DP: every (TP, PP, DP)
layout trains the same model to the same numbers."""
import pytest
import torch

from runs import BASE, signal_at_step

LAYOUTS = {  # (tp, pp, dp) -> extra overrides
    (1, 1, 1): [], (2, 1, 1): [], (1, 2, 1): [], (1, 1, 2): [], (2, 2, 1): [], (1, 2, 2): [], (2, 1, 2): [],
}


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
        coords, tied = check_rank_mapping(topo)[lay.rank], None
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
    return pools(1).run(_train, _layout(1, 1, 1), tiny_data, tmp_path_factory.mktemp("ref"))[0]


def _same_weights(a, b, atol=1e-4):  # Adam amplifies float noise on tiny gradients
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert torch.all(diff <= atol + 1e-4 * b[name].abs()), f"{name}: max difference {diff.max().item():.3g}"


@pytest.mark.parametrize("tp,pp,dp", list(LAYOUTS), ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in LAYOUTS])
def test_layout_trains_like_one_process(pools, tiny_data, tmp_path, reference, tp, pp, dp):
    """Losses over 5 steps equal (1,1,1)'s to 1e-4, whole weights to 1e-5; megatron-core and DeepSpeed agree on
    every rank's (pp, dp, tp); the tied embedding is identical on the first and last stage after training."""
    ov = _layout(tp, pp, dp) + LAYOUTS[(tp, pp, dp)]
    runs = pools(tp * pp * dp).run(_train, ov, tiny_data, tmp_path / "run")
    losses = runs[0]["metrics"]["loss"]
    assert len(losses) == 5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["metrics"]["loss"]), atol=1e-4, rtol=0)
    _same_weights(runs[0]["weights"], reference["weights"])
    for rank, run in enumerate(runs):
        assert run["coords"]["megatron"] == run["coords"]["deepspeed"]
        assert run["coords"]["megatron"] == (rank // (tp * dp), rank // tp % dp, rank % tp)
    if pp > 1:
        tied = {}
        for run in runs:
            if run["tied"] is not None:
                tied.setdefault(run["stage"], []).append(run["tied"])
        assert sorted(tied) == [0, pp - 1]
        for first, last in zip(tied[0], tied[pp - 1]):  # same TP shard on both ends (ranks in TP order)
            assert torch.equal(first, last)


SKIP = ["model.skip.enabled=true", "model.skip.target_rate=0.5", "model.num_layers=4", "parallel.balance_tokens=true"]


def test_skip_routing_under_pipeline(pools, tiny_data, tmp_path):
    """Routed layers on both stages of (1,2,2), with the DP token balancer running in each stage's DP group and
    every other block recomputed in the backward: losses, routing metrics and weights (routers included) equal
    those of (1,1,1)."""
    metrics = ("loss", "skip/exec_rate", "skip/aux_loss", "skip/imbalance_before", "skip/rate/L0", "skip/rate/L3")
    ov = _layout(1, 1, 1) + SKIP
    ref = pools(1).run(_train, ov, tiny_data, tmp_path / "ref", metrics)[0]
    runs = pools(4).run(_train, _layout(1, 2, 2) + SKIP + ["parallel.activation_checkpointing=every:2"],
                        tiny_data, tmp_path / "pp", metrics)
    got = runs[0]["metrics"]
    for key in ("loss", "skip/exec_rate", "skip/aux_loss", "skip/rate/L0", "skip/rate/L3"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(ref["metrics"][key]), atol=1e-4, rtol=0,
                                   msg=key)
    assert all(v is not None for v in got["skip/imbalance_before"]), "the balancer did not run"
    assert any(v > 0 for v in got["skip/aux_loss"])
    _same_weights(runs[0]["weights"], ref["weights"])
    assert any("router" in n for n in ref["weights"])


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


def test_resume_under_tp2_pp2(pools, tiny_data, tmp_path):
    """6 steps == 3 steps, stopped by a signal and checkpointed, + resume + 3 steps, under (2,2,1): exact."""
    ov = _layout(2, 2, 1) + ["train.max_steps=6", "checkpoint.keep=0"]
    pool = pools(4)
    full = pool.run(_train, ov, tiny_data, tmp_path / "full")[0]
    first = pool.run(_train, ov, tiny_data, tmp_path / "cut", stop_at=3)[0]
    assert first["metrics"]["step"] == [1, 2, 3]
    second = pool.run(_train, ov, tiny_data, tmp_path / "cut")[0]
    assert second["metrics"]["step"] == [1, 2, 3, 4, 5, 6]
    assert second["metrics"]["loss"] == full["metrics"]["loss"]
    for name, value in full["weights"].items():
        assert torch.equal(value, second["weights"][name]), name
    with pytest.raises(AssertionError, match="pipeline-parallel layout is not supported"):
        pool.run(_train, _layout(1, 1, 4) + ["train.max_steps=6"], tiny_data, tmp_path / "cut")


def _mismatched_topology():
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from skiptron.parallel.state import init_model_parallel
    from skiptron.training.pipeline import MappingError, check_rank_mapping

    init_model_parallel(2, 1, torch.device("cpu"))
    check_rank_mapping(ProcessTopology(axes=["pipe", "data", "model"], dims=[1, 2, 2]))  # agrees
    try:
        check_rank_mapping(ProcessTopology(axes=["pipe", "model", "data"], dims=[1, 2, 2]))  # TP across the slow axis
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
    (["parallel.sequence_parallel=true", "parallel.backend=gloo"], "gloo backend"),
    (["parallel.activation_checkpointing=some"], "parallel.activation_checkpointing"),
])
def test_pipeline_config_validation(overrides, match):
    from skiptron.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, BASE + overrides)
