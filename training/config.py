"""One typed, validated configuration for a run.

A run's config is a YAML file (a preset from `configs/` or a path) plus `dotted.key=value` overrides from the
command line. Everything is validated before any process group exists, and every error names the offending key.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .blend import Source, parse_blend

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SkipConfig(Section):
    """Learned per-token layer skipping ("Learning to Skip for Language Modeling")."""

    enabled: bool = False
    granularity: Literal["layer", "mlp", "attention"] = "layer"
    layers: str | list[int] = Field("all", description="all | inner (all but first and last) | every:K | [i, ...]")
    kv: Literal["all", "active"] = Field(
        "all", description="all: skipped tokens still give keys/values; active: they are invisible (Mixture-of-Depths)")
    target_rate: float = Field(0.5, gt=0, le=1, description="fraction of tokens each routed layer executes")
    kv_all_kernel: Literal["auto", "sdpa", "flex", "mask"] = Field(
        "auto", description="kv: all attention kernel (all exact): sdpa = causal SDPA over the queries scattered to "
                            "their positions (flash on GPU; costs a dense layer's attention), flex = flex_attention "
                            "with a block mask (only the selected rows; compiled on GPU), mask = SDPA with a [b, n, s] "
                            "mask; auto = flex on CUDA (sdpa if it does not compile), mask on CPU")
    router: Literal["sigmoid", "gumbel", "mod"] = Field(
        "sigmoid", description="sigmoid: p = sigmoid(w.x + b), p > 0.5 (threshold) or a DP-batch top-k (capacity), the "
                               "branch scaled by p, budget controller; gumbel: SkipLayer, 2 logits, straight-through "
                               "Gumbel-softmax, greedy at inference; mod: Mixture-of-Depths, top-k per sequence, the "
                               "branch scaled by the router weight, a causal predictor decides at inference")
    mode: Literal["threshold", "capacity"] = Field(
        "threshold", description="router sigmoid: threshold = p > 0.5 per token, capacity = top-k over the DP batch")
    aux_loss_weight: float = Field(
        1.0, ge=0, description="weight of sum over routed layers of (rate - target)^2; default 1.0, 0.1 for gumbel "
                               "(the SkipLayer paper), unused by mod (its capacity is exact)")
    controller_rate: float = Field(
        0.2, ge=0, le=1, description="threshold mode: per-step pull of the router offset to the budget; 0 = aux loss only")
    gumbel_temperature: float = Field(1.0, gt=0, description="router gumbel: temperature of the soft (backward) path")
    predictor_hidden: int = Field(64, ge=1, description="router mod: hidden width of the causal decision predictor")
    predictor_loss_weight: float = Field(
        1.0, ge=0, description="router mod: weight of the predictor's BCE loss (its input is stop-gradient, so only "
                               "the predictor learns from it)")

    @model_validator(mode="before")
    @classmethod
    def _router_defaults(cls, data):
        """The papers' settings for keys left unset: gumbel (SkipLayer) kv all and a 0.1 capacity-loss weight; mod
        (Mixture-of-Depths) every other layer, kv active, capacity 0.125."""
        if isinstance(data, dict):
            defaults = {"gumbel": {"aux_loss_weight": 0.1},
                        "mod": {"layers": "every:2", "kv": "active", "target_rate": 0.125}}.get(data.get("router"), {})
            data = {**defaults, **data}
        return data

    @model_validator(mode="after")
    def _check_router(self):
        if self.router != "sigmoid" and self.mode != "threshold":
            raise ConfigError(f"model.skip.mode: 'capacity' is a mode of router sigmoid; router {self.router} decides "
                              f"on its own ({'top-k per sequence' if self.router == 'mod' else 'per token'})")
        if self.router == "gumbel" and self.kv != "all":
            raise ConfigError("model.skip.kv: router gumbel (SkipLayer) needs kv=all: its soft path needs a skipped "
                              "token's block output, which is undefined when skipped tokens are invisible")
        return self

    def routed_layers(self, num_layers: int) -> list[int]:
        if not self.enabled:
            return []
        spec = self.layers
        if isinstance(spec, list):
            bad = [i for i in spec if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"model.skip.layers: {bad} out of range for {num_layers} layers")
            return sorted(set(spec))
        if spec == "all":
            return list(range(num_layers))
        if spec == "inner":
            return list(range(1, num_layers - 1))
        if spec.startswith("every:") and spec[6:].isdigit() and int(spec[6:]) > 0:
            k = int(spec[6:])
            return [i for i in range(num_layers) if i % k == k - 1]
        raise ConfigError(f"model.skip.layers: '{spec}' is not one of all, inner, every:K or a list of layer indices")


class SRUppConfig(Section):
    """SRU++ blocks ("When Attention Meets Fast Recurrence", Lei 2021), used when model.block = srupp."""

    attention_every: int = Field(
        1, ge=0, description="attention in every k-th layer (layers k-1, 2k-1, ...), a plain projection elsewhere; 0 = none")
    proj_size: int | None = Field(None, ge=1, description="attention / projection width d'; default hidden_size // 4")
    num_heads: int = Field(1, ge=1, description="attention heads inside the projection (the paper: 1)")
    highway_bias: float = Field(-2.0, description="initial reset-gate bias; negative: each layer starts near identity")

    def projection(self, hidden_size: int) -> int:
        return self.proj_size or max(hidden_size // 4, 1)

    def has_attention(self, layer: int) -> bool:
        k = self.attention_every
        return k > 0 and layer % k == k - 1


class RopeScaling(Section):
    """Llama-3 rotary frequency scaling (transformers' `rope_type: llama3`): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter than
    original_max_position_embeddings / high_freq_factor kept, the band between interpolated smoothly."""

    type: Literal["llama3"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"model.rope_scaling.high_freq_factor: {self.high_freq_factor} must be larger than "
                              f"low_freq_factor {self.low_freq_factor}")
        return self


class ModelConfig(Section):
    block: Literal["transformer", "srupp"] = "transformer"
    num_layers: int = Field(4, ge=1)
    hidden_size: int = Field(256, ge=8)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(
        None, ge=1, description="key/value heads (grouped-query attention); default num_heads, 1 = multi-query")
    ffn_hidden_size: int | None = Field(None, ge=1, description="default: 8/3 * hidden, rounded up to 64")
    seq_len: int = Field(256, ge=2)
    vocab_size: int | None = Field(None, ge=2, description="default: the prepared data's vocabulary")
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    tie_embeddings: bool = True
    embedding_rank: int | None = Field(
        None, ge=1, description="factorized token embedding codes (V x k) @ decoder (k -> d); None = a full V x d table")
    bias: bool = False
    qkv_bias: bool = Field(False, description="biases on the Q, K and V projections only (Qwen2); bias=true has them too")
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int | None = Field(
        None, ge=2, description="longest sequence the model is meant for (exports; rotary angles are computed for any "
                                "position); default seq_len")
    hf_architecture: Literal["llama", "mistral", "qwen2"] = Field(
        "llama", description="the Hugging Face class to-hf writes a plain dense model as (from-hf records the source's)")
    init_std: float = Field(0.02, gt=0)
    skip: SkipConfig = SkipConfig()
    srupp: SRUppConfig = SRUppConfig()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def max_positions(self) -> int:
        return max(self.max_position_embeddings or self.seq_len, self.seq_len)

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
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"model.num_kv_heads: {self.num_heads} query heads (model.num_heads) are not divisible "
                              f"into {self.kv_heads} key/value heads")
        if self.hf_architecture == "qwen2" and not (self.qkv_bias or self.bias):
            raise ConfigError("model.hf_architecture: 'qwen2' has Q, K and V biases; set model.qkv_bias=true")
        if self.head_dim % 2:
            raise ConfigError(f"model.hidden_size: head dim {self.head_dim} (hidden / heads) must be even for rotary")
        if self.embedding_rank is not None and self.embedding_rank > self.hidden_size:
            raise ConfigError(f"model.embedding_rank: {self.embedding_rank} is larger than model.hidden_size "
                              f"{self.hidden_size}; a factorized embedding needs 1 <= k <= hidden_size")
        if self.block == "srupp" and self.skip.enabled and self.skip.router == "gumbel":
            raise ConfigError("model.skip.router: gumbel needs a skipped token's block output for its soft path; a "
                              "routed SRU++ layer has none (its recurrence skips the token): use sigmoid or mod")
        if self.block == "srupp" and self.skip.enabled and self.skip.granularity != "layer":
            raise ConfigError(f"model.skip.granularity: '{self.skip.granularity}' routes a transformer's attention or "
                              f"MLP; an SRU++ block (model.block=srupp) is routed whole: use granularity=layer")
        if self.block == "srupp" and self.skip.enabled and self.skip.kv != "active":
            raise ConfigError("model.skip.kv: a routed SRU++ layer runs over the active tokens only (its recurrence "
                              "cannot take a skipped token's state without running on it); set model.skip.kv=active")
        if self.block == "srupp" and self.srupp.projection(self.hidden_size) % self.srupp.num_heads:
            raise ConfigError(f"model.srupp.num_heads: projection size {self.srupp.projection(self.hidden_size)} is "
                              f"not divisible by {self.srupp.num_heads} heads")
        if self.skip.enabled and not self.skip.routed_layers(self.num_layers):
            raise ConfigError(f"model.skip.layers: '{self.skip.layers}' routes none of the {self.num_layers} layers")
        return self


class ParallelConfig(Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    init_timeout_s: int = Field(600, ge=1)
    balance_tokens: bool = Field(True, description="even out routed tokens across data-parallel ranks")
    balance_min_tokens: int = Field(
        128, ge=0, description="exchange only when the most loaded DP rank would shed at least this many active tokens "
                               "(an exchange costs four collectives' latency per routed computation); threshold layers "
                               "whose last step shed less than half of it skip the count gather; 0: exact balance "
                               "at any unevenness")

    @property
    def token_balance(self) -> int | None:
        """The balancer's trigger (`balance_min_tokens`), None when balancing is off."""
        return self.balance_min_tokens if self.balance_tokens else None
    partition: Literal["uniform", "parameters"] = Field(
        "uniform", description="pipeline stages: uniform = equal numbers of blocks, parameters = balanced parameter "
                               "counts; the embedding is always on the first stage, the head on the last")
    activation_checkpointing: str = Field(
        "none", description="none | full (every block) | every:K (blocks K-1, 2K-1, ...): recompute in the backward")
    sequence_parallel: bool = Field(
        False, description="megatron-style sequence parallelism: outside the TP regions (norms, residual stream) "
                           "each TP rank holds seq_len / tp tokens; reduce-scatter / all-gather on NCCL, emulated "
                           "exactly on gloo (all-reduce / all-gather, more traffic). Dense transformer blocks, "
                           "parallel.pp=1, seq_len divisible by parallel.tp")

    def checkpointed_blocks(self, num_layers: int) -> set[int]:
        spec = self.activation_checkpointing
        if spec == "none":
            return set()
        if spec == "full":
            return set(range(num_layers))
        if spec.startswith("every:") and spec[6:].isdigit() and int(spec[6:]) > 0:
            k = int(spec[6:])
            return {i for i in range(num_layers) if i % k == k - 1}
        raise ConfigError(f"parallel.activation_checkpointing: '{spec}' is not one of none, full or every:K")


class ZeroConfig(Section):
    stage: int = Field(1, description="DeepSpeed ZeRO stage, 0-3; 1-2 over a single DP rank in fp32 without a "
                                      "pipeline run as stage 0, which steps the same numbers (engine.zero_stage)")
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, fp32 elsewhere; bf16 and fp16 (dynamic loss scaling) "
                            "also run on CPUs (DeepSpeed's CPU accelerator), which is how their code paths are tested")
    tf32: bool = Field(True, description="fp32 matmuls on TF32 tensor cores (Ampere and newer GPUs); no effect on CPUs")
    deterministic: bool = Field(
        False, description="deterministic kernels and collectives (torch.use_deterministic_algorithms, cuBLAS "
                           "workspace, cuDNN, NCCL ring/simple): bitwise-reproducible steps on GPUs, at some speed cost")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="stop (non-zero exit) after this many consecutive skipped steps: non-finite loss or "
                             "gradients, spikes, or DeepSpeed's own overflow skips")
    spike_factor: float | None = Field(
        None, gt=1, description="skip the update of a step whose loss exceeds this multiple of the mean loss of the "
                                "last train.spike_window accepted steps; None = no spike guard")
    spike_window: int = Field(100, ge=1, description="accepted steps in the spike guard's running mean")
    compile: bool = Field(
        False, description="torch.compile each block (of a routed block its router, norms and MLP; the embedding, "
                           "head, loss and optimizer stay eager); off by default: on CPU it has not measured faster "
                           "(docs/benchmarks.md, issue 15)")
    compile_backend: str = Field(
        "inductor", description="torch.compile backend for train.compile: inductor (generated kernels) or e.g. "
                                "aot_eager (the same captured graphs run by eager kernels: no code generation, fast to "
                                "build; for debugging and the tests)")
    loss_chunk_tokens: int = Field(
        1024, ge=1, description="the loss takes this many tokens at a time, the output layer and cross entropy fused: "
                                "the logits are never held whole (docs/benchmarks.md, issue 15: peak memory)")
    cpu_heap: Literal["reuse", "release"] = Field(
        "reuse", description="training on the CPU: reuse keeps freed host blocks in the process, so each step's "
                             "large buffers (DeepSpeed's gradient buckets, the logits) land on resident pages (about "
                             "1.25x faster steps here, peak RSS up to ~35% higher: docs/benchmarks.md); release "
                             "returns large blocks to the system as glibc does by default. No effect on GPUs")


class DataConfig(Section):
    path: str | None = Field(None, description="a prepared data directory (skiptron-data prepare / import-megatron)")
    blend: list | None = Field(
        None, description="instead of path: weighted prepared directories, [[0.7, dir], [0.3, dir]] or the "
                          "Megatron-style flat [0.7, dir, 0.3, dir]; same tokenizer required (docs/data.md)")
    num_workers: int = Field(1, ge=0)
    shuffle: bool = True

    @model_validator(mode="after")
    def _one_source_spec(self):
        if self.path and self.blend:
            raise ConfigError("data.blend: give data.path or data.blend, not both")
        if self.blend is not None:
            try:
                parse_blend(self.blend)
            except ValueError as exc:
                raise ConfigError(f"data.blend: {exc}") from None
        return self

    def sources(self) -> list[Source]:
        """The data sources of the run: the blend's, or data.path as one source of weight 1."""
        if self.blend is not None:
            return parse_blend(self.blend)
        return [Source(Path(self.path).name, 1.0, self.path)] if self.path else []


class EvalConfig(Section):
    interval: int = Field(100, ge=0, description="steps between validations, 0 = only at the end")
    batches: int = Field(8, ge=1, description="micro-batches per rank in one validation")


class RunConfig(Section):
    dir: str = "runs/default"


class LoggingConfig(Section):
    print_every: int = Field(10, ge=1)
    progress: Literal["auto", "plain"] = Field(
        "auto", description="auto: a live bar on a terminal, plain lines every print_every steps otherwise and "
                            "under mpirun/srun (whose ranks' terminals are the launcher's pipes); plain: always lines")
    tensorboard: bool = True
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU; default: known GPUs only")


class CheckpointConfig(Section):
    dir: str | None = Field(None, description="default: <run.dir>/checkpoints")
    interval: int = Field(0, ge=0, description="steps between saves, 0 = only at the end")
    save_at_end: bool = True
    keep: int = Field(3, ge=0, description="keep the newest K checkpoints, 0 = keep all")
    keep_every: int = Field(0, ge=0, description="also keep every checkpoint whose step is a multiple of M, 0 = none")
    check_finite: bool = Field(
        True, description="refuse to save (and, at resume, to load) non-finite weights or optimizer state")
    trust_pickle: bool = Field(
        False, description="load checkpoint files whose pickles reference code (not only tensors and the known "
                           "records); off: such a file is refused, since loading it could run anything")
    reshard_bucket_mb: int | None = Field(
        None, ge=0, description="resharding reads the next parameters' shards in a background thread while one is "
                                "applied, holding at most this much of them (plus the one applied); 0: one parameter "
                                "at a time, in the caller. Default: 256 where this rank has a CPU core its compute "
                                "threads leave free (counting the ranks on the host), else 0 (a reader thread "
                                "competing for busy cores made resharding slower)")
    async_save: bool = Field(
        False, description="the step pays only for a snapshot of this rank's state to host memory (pinned on a GPU; "
                           "one more copy of the rank's state while a save is in flight); writing, fsync, checksums "
                           "and the publish run in the background, at most one save at a time")


class LaunchConfig(Section):
    """How ranks meet and the pre-flight check before training (see docs/launch.md)."""

    rendezvous_timeout_s: int = Field(
        300, ge=1, description="wait for the master and all ranks this long, then fail naming the missing ranks")
    collective_timeout_s: int = Field(
        120, ge=1, description="a rank that died or made no progress for this long ends the job, naming it (the "
                               "watchdog, parallel/watchdog.py; separate from the start-up parallel.init_timeout_s)")
    watchdog: bool = Field(True, description="run the heartbeat watchdog (multi-process runs)")
    max_restarts: int = Field(
        3, ge=0, description="launch/slurm/submit.py: requeues of a job that failed (not counting time-limit "
                             "requeues); give torchrun --max-restarts yourself")
    health_check: bool = Field(True, description="time matmuls and collectives on every rank before training")
    health_outlier_ratio: float = Field(
        0.7, gt=0, le=1, description="a rank below this fraction of the median throughput is named as an outlier")
    slurm: dict[str, str | int] = Field(
        default_factory=dict, description="sbatch options for launch/slurm/submit.py: nodes, ntasks-per-node, time, ...")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.slurm.get("time"), int):  # YAML 1.1 reads 1:00:00 as 3600, which sbatch takes as minutes
            raise ConfigError(f"launch.slurm.time: {self.slurm['time']} is a number; quote it: '\"1:00:00\"'")
        return self


class FinetuneConfig(Section):
    """Adapting a pretrained checkpoint (see training/masking.py).

    `full` trains every weight (the default, as in pretraining); `mask` freezes the pretrained weights and learns a
    binary mask per selected matrix ("Masking as an Efficient Alternative to Finetuning", Zhao et al. 2020)."""

    method: Literal["full", "mask"] = "full"
    base: str | None = Field(None, description="checkpoint whose weights start the run (weights only, fresh optimizer)")
    keep: float = Field(0.95, gt=0, le=1, description="mask: fraction of weights the initial mask keeps")
    threshold: float = Field(0.0, description="mask: a weight is kept where its score >= threshold")
    init_scale: float = Field(0.01, gt=0, description="mask: initial scores spread over threshold + init_scale x [-keep, 1-keep]")
    layers: str | list[int] = Field("all", description="mask: blocks whose matrices are masked: all | [i, ...]")
    matrices: list[str] = Field(["qkv", "out", "gate_up", "down"],
                                description="mask: names of the masked linear layers inside each selected block "
                                            "(qkv, out, gate_up, down; q, kv of grouped-query attention; qkv means "
                                            "the attention input projection: fused qkv, or q and kv)")
    train_head: bool = Field(False, description="mask: also train the head (final norm; output matrix if untied)")
    seed: int = Field(0, description="mask: seed of the initial scores (layout-independent)")

    def masked_layers(self, num_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(num_layers))
        if isinstance(self.layers, list):
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"finetune.layers: {bad} out of range for {num_layers} layers")
            return sorted(set(self.layers))
        raise ConfigError(f"finetune.layers: '{self.layers}' is not 'all' or a list of layer indices")


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
    resume: str = Field("auto", description="auto (newest complete checkpoint in checkpoint.dir), none, or a path")
    launch: LaunchConfig = LaunchConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.model.block == "srupp" and self.model.hidden_size % self.parallel.tp:
            raise ConfigError(f"model.hidden_size: {self.model.hidden_size} SRU++ hidden units are not divisible by "
                              f"parallel.tp={self.parallel.tp}")
        if self.model.num_heads % self.parallel.tp:
            raise ConfigError(
                f"model.num_heads: {self.model.num_heads} attention heads are not divisible by parallel.tp={self.parallel.tp}")
        kv, tp = self.model.kv_heads, self.parallel.tp
        if kv % tp and tp % kv:
            raise ConfigError(f"model.num_kv_heads: {kv} key/value heads neither split over parallel.tp={tp} ranks nor "
                              f"replicate evenly on them (need num_kv_heads % tp == 0 or tp % num_kv_heads == 0)")
        if self.model.ffn_size % self.parallel.tp:
            raise ConfigError(f"model.ffn_hidden_size: {self.model.ffn_size} is not divisible by parallel.tp={self.parallel.tp}")
        if self.model.make_vocab_size_divisible_by % self.parallel.tp:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by: {self.model.make_vocab_size_divisible_by} must be a multiple of "
                f"parallel.tp={self.parallel.tp} so the padded vocabulary splits evenly")
        self.parallel.checkpointed_blocks(self.model.num_layers)
        if self.parallel.pp > self.model.num_layers:
            raise ConfigError(f"parallel.pp: {self.parallel.pp} pipeline stages for {self.model.num_layers} layers; "
                              f"every stage needs at least one block")
        if self.parallel.pp > 1 and self.model.embedding_rank is not None and self.model.tie_embeddings:
            raise ConfigError("model.embedding_rank: a factorized embedding tied to the output layer is not supported "
                              "with pipeline parallelism (parallel.pp > 1) yet; use parallel.pp=1 or "
                              "model.tie_embeddings=false")
        if self.parallel.pp > 1 and self.zero.stage >= 2:
            raise ConfigError(
                f"zero.stage: ZeRO-{self.zero.stage} cannot be combined with pipeline parallelism (parallel.pp="
                f"{self.parallel.pp}): DeepSpeed's pipeline engine supports ZeRO 0 and 1 only; use zero.stage=1")
        if self.parallel.sequence_parallel:
            self._check_sequence_parallel()
        return self

    def _check_sequence_parallel(self) -> None:
        """Sequence parallelism covers dense transformer blocks without pipeline stages."""
        m, p = self.model, self.parallel
        off = "or parallel.sequence_parallel=false"
        if m.seq_len % p.tp:
            raise ConfigError(f"model.seq_len: {m.seq_len} is not divisible by parallel.tp={p.tp}, which "
                              f"parallel.sequence_parallel=true needs (each TP rank holds seq_len / tp tokens)")
        if m.block != "transformer":
            raise ConfigError(f"model.block: '{m.block}' blocks are not supported with parallel.sequence_parallel="
                              f"true (their recurrence runs along the sequence); use model.block=transformer {off}")
        if m.skip.enabled:
            raise ConfigError("model.skip.enabled: skip routing is not supported with parallel.sequence_parallel="
                              "true (routers pick tokens across the whole sequence); use model.skip.enabled=false "
                              + off)
        if p.pp > 1:
            raise ConfigError(f"parallel.pp: pipeline parallelism (parallel.pp={p.pp}) is not supported with "
                              f"parallel.sequence_parallel=true; use parallel.pp=1 {off}")

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
            if not self.data.sources():
                raise ConfigError("data.path: no prepared data directory given (run `skiptron-data prepare --out DIR`)")
            key = "data.blend" if self.data.blend is not None else "data.path"
            for source in self.data.sources():
                manifest = Path(source.path) / "manifest.json"
                if not manifest.is_file():
                    raise ConfigError(f"{key}: {source.path} is not a prepared data directory ({manifest} missing)")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.dir) / "checkpoints")


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': not a YAML value ({_yaml_problem(err)}); quote it") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, without its multi-line context."""
    return " ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part) \
        or str(err).splitlines()[0]


def _read_yaml(file: Path):
    """A YAML file's tree; a syntax error becomes one ConfigError line `FILE:LINE:COLUMN: ...` (1-based)."""
    try:
        return yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(err)}") from None


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


# Keys earlier versions wrote into run directories' config.yaml, and what replaced them: a file that has one is
# upgraded on reading (`_upgrade_saved`), so its checkpoints still load; an override that names one is refused.
REPLACED_KEYS = {"parallel.balance_min_imbalance": "parallel.balance_min_tokens (the least tokens the most loaded DP "
                                                   "rank must shed for an exchange; 0 is the old 1.0)"}


def _upgrade_saved(tree: dict, file: Path) -> dict:
    """A saved config with a replaced key, in today's keys. `parallel.balance_min_imbalance` 1.0 (exchange at any
    imbalance) becomes `balance_min_tokens` 0; another ratio has no token equivalent and gives way to the default."""
    parallel = tree.get("parallel")
    if isinstance(parallel, dict) and "balance_min_imbalance" in parallel:
        old = parallel.pop("balance_min_imbalance")
        if old == 1.0:
            parallel.setdefault("balance_min_tokens", 0)
        else:
            warnings.warn(f"{file}: parallel.balance_min_imbalance={old} has no equivalent in "
                          f"{REPLACED_KEYS['parallel.balance_min_imbalance']}; using the default", stacklevel=3)
    return tree


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if key in REPLACED_KEYS:
            msg += f", replaced by {REPLACED_KEYS[key]}"
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
        tree = _read_yaml(file) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        tree = _upgrade_saved(tree, file)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    return build_config(tree)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
