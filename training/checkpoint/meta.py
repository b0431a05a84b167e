"""trainer.json: the progress, the layout a checkpoint was saved with and every parameter's parallel layout, and the
checks that decide whether (and how) a checkpoint loads into the current model and layout."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skiptron.parallel.tensor_parallel import tp_layout

from .collective import _gather
from .errors import CheckpointError
from .files import FORMAT, FORMAT_VERSION

META = "trainer.json"
# Model keys that may change across a resume without changing any weight.
RESHAPE_FREE_MODEL_KEYS = {"seq_len", "init_std", "max_position_embeddings", "hf_architecture"}


@dataclass
class Progress:
    """Where training stands: what a resume needs besides weights and optimizer."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    consumed_by_source: dict[str, int] = field(default_factory=dict)  # data source name -> samples taken from it

    def advance(self, samples: int, tokens: int) -> None:
        self.step += 1
        self.consumed_samples += samples
        self.consumed_tokens += tokens


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def read_meta(path: str | os.PathLike) -> dict:
    """trainer.json of a checkpoint, with its format and version checked."""
    f = Path(path) / META
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: {path} is not a skiptron checkpoint")
    try:
        meta = json.loads(f.read_text())
    except ValueError as err:
        raise CheckpointError(f"{f} is unreadable: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a {FORMAT} file")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{f} has checkpoint format version {meta['version']}, newer than this code reads ({FORMAT_VERSION}); "
            f"update skiptron")
    return meta


def param_layouts(module: torch.nn.Module, tp: int, vocab_size: int) -> dict[str, dict]:
    """Each parameter's parallel layout, written at save time so resharding never guesses."""
    out = {}
    for name, p in module.named_parameters():
        shape = list(getattr(p, "ds_shape", p.shape))
        layout = tp_layout(p)
        dim, stride = layout if layout else (None, 1)
        if dim is not None:
            shape[dim] *= tp
        entry = {"shape": shape, "partition_dim": dim, "stride": stride}
        if getattr(p, "partition_dim", None) == 0 and name.endswith(("tokens.weight", "output.weight", "embedding.codes")):
            entry["vocab_padding"] = shape[0] - vocab_size
        out[name] = entry
    return out


def optimizer_group_names(engine) -> list[list[str]]:
    """The optimizer's parameter groups by parameter name (stage-0 optimizer state is keyed by this order)."""
    from ..engine import param_groups

    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(engine.module, 0.0)]


def model_meta(engine, tp: int, vocab_size: int) -> dict:
    """trainer.json's `params` (every parameter's layout) and optimizer groups. A pipeline's are gathered from
    all stages (collective) and `params` is keyed by GPT's names, as for a GPT checkpoint; `pipeline` holds what
    finds each name in DeepSpeed's per-stage files: GPT's name of every layer index, the stage boundaries, and each
    stage's optimizer groups by the stage's own parameter names."""
    from deepspeed.pipe import PipelineModule

    module = engine.module
    params, groups = param_layouts(module, tp, vocab_size), optimizer_group_names(engine)
    if not isinstance(module, PipelineModule):
        return {"params": params, "optimizer_groups": groups}
    from megatron.core import parallel_state as ps

    from ..pipeline import gpt_name

    layers = module.layer_names()
    stages = _gather((params, groups), group=ps.get_pipeline_model_parallel_group())
    merged = {gpt_name(n, layers): entry for stage_params, _ in stages for n, entry in stage_params.items()}
    return {"params": dict(sorted(merged.items())),
            "pipeline": {"layers": layers, "parts": [int(i) for i in module.parts],
                         "optimizer_groups": [stage_groups for _, stage_groups in stages]}}


def check_compatible(path: Path, meta: dict, cfg, vocab_size: int) -> None:
    """Refuse a checkpoint of a different model, naming every differing key."""
    from ..config import load_config

    saved_model = load_config(path / "config.yaml").model
    saved = {**saved_model.model_dump(mode="json"), "ffn_hidden_size": saved_model.ffn_size,
             "num_kv_heads": saved_model.kv_heads}
    current = {**cfg.model.model_dump(mode="json"), "ffn_hidden_size": cfg.model.ffn_size,
               "num_kv_heads": cfg.model.kv_heads}
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current))
             if k not in RESHAPE_FREE_MODEL_KEYS and k != "vocab_size" and saved.get(k) != current.get(k)]
    if meta.get("vocab_size") != vocab_size:
        diffs.append(f"model.vocab_size: checkpoint {meta.get('vocab_size')!r}, config/data {vocab_size!r}")
    if diffs:
        raise CheckpointError(f"{path} was saved from a different model; differing keys: {'; '.join(diffs)}")


def same_layout(meta: dict, layout, engine) -> bool:
    """Whether DeepSpeed can load the checkpoint's own shards: the same TP/PP/DP sizes, the ZeRO stage the engine
    runs (`engine.zero_optimization_stage()`, which is 0 where `zero.stage` partitions nothing: engine.zero_stage)
    and precision."""
    saved = meta["layout"]
    return (saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"], saved["precision"]) == (
        layout.tp, layout.pp, layout.dp, engine.zero_optimization_stage(), _precision(engine))


def _precision(engine) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"
