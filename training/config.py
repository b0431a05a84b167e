"""One typed, validated configuration for a run.

A run's config is a YAML file (a preset from `configs/` or a path) plus `dotted.key=value` overrides from the
command line. Everything is validated before any process group exists, and every error names the offending key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SkipConfig(Section):
    """Learned per-token layer skipping (filled in by the skip-routing work)."""

    enabled: bool = False


class ModelConfig(Section):
    block: Literal["transformer"] = "transformer"
    num_layers: int = Field(4, ge=1)
    hidden_size: int = Field(256, ge=8)
    num_heads: int = Field(4, ge=1)
    ffn_hidden_size: int | None = Field(None, ge=1, description="default: 8/3 * hidden, rounded up to 64")
    seq_len: int = Field(256, ge=2)
    vocab_size: int | None = Field(None, ge=2, description="default: the prepared data's vocabulary")
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    tie_embeddings: bool = True
    bias: bool = False
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    init_std: float = Field(0.02, gt=0)
    skip: SkipConfig = SkipConfig()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64

    def padded_vocab_size(self, vocab_size: int | None = None) -> int:
        """Vocabulary rounded up to `make_vocab_size_divisible_by`, independent of TP, so every layout builds the
        same embedding and draws the same initial weights."""
        v = vocab_size or self.vocab_size
        m = self.make_vocab_size_divisible_by
        return -(-v // m) * m

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size: {self.hidden_size} is not divisible by model.num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.hidden_size: head dim {self.head_dim} (hidden / heads) must be even for rotary")
        return self


class ParallelConfig(Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    init_timeout_s: int = Field(600, ge=1)


class ZeroConfig(Section):
    stage: int = Field(1, description="DeepSpeed ZeRO stage, 0-3")
    overlap_comm: bool = False
    reduce_bucket_size: int = Field(50_000_000, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if not 0 <= self.stage <= 3:
            raise ConfigError(f"zero.stage: {self.stage} is out of range; use 0, 1, 2 or 3")
        return self


class OptimizerConfig(Section):
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(16, ge=1)
    grad_accum: int | None = Field(None, ge=1, description="default: global / (micro x DP)")
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_nonfinite_steps: int = Field(3, ge=1)


class DataConfig(Section):
    path: str | None = None
    num_workers: int = Field(1, ge=0)
    shuffle: bool = True


class EvalConfig(Section):
    interval: int = Field(100, ge=0, description="steps between validations, 0 = only at the end")
    batches: int = Field(8, ge=1, description="micro-batches per rank in one validation")


class RunConfig(Section):
    dir: str = "runs/default"


class LoggingConfig(Section):
    print_every: int = Field(10, ge=1)
    tensorboard: bool = True
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU; default: known GPUs only")


class CheckpointConfig(Section):
    dir: str | None = Field(None, description="default: <run.dir>/checkpoints")
    interval: int = Field(0, ge=0, description="steps between saves, 0 = only at the end")
    save_at_end: bool = True


class Config(Section):
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    zero: ZeroConfig = ZeroConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.model.num_heads % self.parallel.tp:
            raise ConfigError(
                f"model.num_heads: {self.model.num_heads} attention heads are not divisible by parallel.tp={self.parallel.tp}")
        if self.model.ffn_size % self.parallel.tp:
            raise ConfigError(f"model.ffn_hidden_size: {self.model.ffn_size} is not divisible by parallel.tp={self.parallel.tp}")
        if self.model.make_vocab_size_divisible_by % self.parallel.tp:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by: {self.model.make_vocab_size_divisible_by} must be a multiple of "
                f"parallel.tp={self.parallel.tp} so the padded vocabulary splits evenly")
        if self.parallel.pp > 1:
            raise ConfigError("parallel.pp: pipeline parallelism is not available yet; use parallel.pp=1")
        return self

    # -- layout-dependent checks ------------------------------------------------------------------------------
    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.tp * self.parallel.pp
        if world_size % mp:
            raise ConfigError(
                f"parallel.tp: world size {world_size} is not divisible by parallel.tp x parallel.pp = "
                f"{self.parallel.tp} x {self.parallel.pp}")
        return world_size // mp

    def grad_accum_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        t = self.train
        ga = t.grad_accum or t.global_batch_size // (t.micro_batch_size * dp)
        if ga < 1 or t.global_batch_size != t.micro_batch_size * ga * dp:
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} != train.micro_batch_size ({t.micro_batch_size}) x "
                f"train.grad_accum ({t.grad_accum or 'derived'}) x data-parallel size ({dp})")
        return ga

    def validate_for_launch(self, world_size: int, *, need_data: bool = True) -> None:
        """The checks that depend on the launch: world size and data on disk. Call before creating process groups."""
        self.grad_accum_steps(world_size)
        if need_data:
            if not self.data.path:
                raise ConfigError("data.path: no prepared data directory given (run `skiptron-data prepare --out DIR`)")
            manifest = Path(self.data.path) / "manifest.json"
            if not manifest.is_file():
                raise ConfigError(f"data.path: {self.data.path} is not a prepared data directory ({manifest} missing)")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.dir) / "checkpoints")


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _set_dotted(tree: dict, path: list[str], value) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A path to a YAML file, or the name of a preset in configs/ (`tiny`, `125m`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {name_or_path} not found (presets: {presets})")


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if isinstance(e.get("ctx", {}).get("error"), ConfigError):
            lines.append(str(e["ctx"]["error"]))
        else:
            lines.append(f"{key}: {msg}" if key else msg)
    return "; ".join(lines)


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or preset name) and apply `dotted.key=value` overrides."""
    tree: dict = {}
    if path is not None:
        file = resolve_config_path(path)
        tree = yaml.safe_load(file.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    return build_config(tree)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
