"""Config loading, overrides and validation: every error names its key, before any process group exists."""
import pytest
import yaml

from skiptron.training.config import ConfigError, load_config, save_config


@pytest.mark.parametrize("preset", ["tiny", "125m", "350m", "1.3b", "6.7b"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


def test_overrides_are_typed_and_dotted():
    cfg = load_config("tiny", ["model.num_layers=8", "parallel.tp=2", "optimizer.lr=1e-4", "model.tie_embeddings=false"])
    assert cfg.model.num_layers == 8 and cfg.parallel.tp == 2
    assert cfg.optimizer.lr == 1e-4 and cfg.model.tie_embeddings is False


@pytest.mark.parametrize("overrides,world,key", [
    (["model.hidden_sise=8"], 1, "model.hidden_sise: unknown key"),
    (["parallel.balance_min_imbalance=1.0"], 1, "unknown key, replaced by parallel.balance_min_tokens"),
    (["model.num_heads=3", "model.hidden_size=96", "parallel.tp=2"], 2, "model.num_heads: 3 attention heads"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible"),
    (["train.global_batch_size=24"], 2, "train.global_batch_size"),
    (["train.grad_accum=2"], 2, "train.global_batch_size"),
    (["zero.stage=4"], 1, "zero.stage"),
    (["zero.stage=-1"], 1, "zero.stage"),
    (["data.path=/nonexistent/dir"], 1, "data.path: /nonexistent/dir is not a prepared data directory"),
    (["data.path=null"], 1, "data.path"),
    (["train.max_steps=many"], 1, "train.max_steps"),
    (["train.precision=fp8"], 1, "train.precision"),
    (["model.hidden_size"], 1, "dotted.key=value"),
    (["parallel.sequence_parallel=true", "parallel.tp=3", "model.num_heads=3", "model.hidden_size=96",
      "model.ffn_hidden_size=258", "model.make_vocab_size_divisible_by=384"], 3, "model.seq_len: 256 is not divisible"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "model.block=srupp"], 2, "model.block: 'srupp'"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "model.skip.enabled=true"], 2, "model.skip.enabled"),
    (["parallel.sequence_parallel=true", "parallel.pp=2"], 2, "parallel.pp: pipeline parallelism"),
])
def test_invalid_settings_name_the_key(overrides, world, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg = load_config("tiny", overrides)
        cfg.validate_for_launch(world)


@pytest.mark.parametrize("backend", ["gloo", "auto"])
def test_sequence_parallel_is_accepted_on_any_backend(backend):
    """gloo emulates reduce-scatter exactly (parallel/sequence_parallel.py), so only the model's limits apply."""
    cfg = load_config("tiny", ["parallel.sequence_parallel=true", "parallel.tp=2", f"parallel.backend={backend}"])
    assert cfg.parallel.sequence_parallel


def test_grad_accum_is_derived():
    cfg = load_config("tiny", ["train.micro_batch_size=2", "train.global_batch_size=16"])
    assert cfg.grad_accum_steps(2) == 4 and cfg.grad_accum_steps(8) == 1


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["model.num_layers=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["num_layers"] == 3


def test_missing_config_file_lists_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-config")


def test_a_saved_config_with_a_replaced_key_still_loads(tmp_path):
    """Checkpoints of earlier versions keep loading: their config.yaml's parallel.balance_min_imbalance (1.0 = exchange
    at any imbalance) reads as balance_min_tokens 0; another ratio gives way to the default, with a warning."""
    from skiptron.training.config import load_config, save_config

    saved = tmp_path / "config.yaml"
    save_config(load_config("tiny"), saved)
    text = saved.read_text().replace("balance_min_tokens: 128", "balance_min_imbalance: 1.0")
    saved.write_text(text)
    assert load_config(saved).parallel.balance_min_tokens == 0
    saved.write_text(text.replace("balance_min_imbalance: 1.0", "balance_min_imbalance: 1.3"))
    with pytest.warns(UserWarning, match="balance_min_imbalance=1.3 has no equivalent"):
        assert load_config(saved).parallel.balance_min_tokens == 128
