"""Sharded checkpoints: atomic saves, verified resume, and resharding to another parallel layout.

Modules, each importing only those above it:

    errors            CheckpointError, UntrustedCheckpointError
    collective        gather / agree / barrier, no-ops without a process group
    files             safe reads (pickle allowlist), atomic writes, manifest, verify, publish, `latest`, retention
    meta              trainer.json: Progress, parameter layouts, format and compatibility checks
    rng               per-rank RNG streams
    locate            which checkpoint: resume=auto's candidates, what a user names
    deepspeed_format  DeepSpeed's shard files and checkpoint-engine hooks (checked with deepspeed 0.19.8)
    weights_only      the weights-only format (from-hf, compress, finetune merge)
    reshard           whole tensors from any layout's shards, and into this rank's
    staging           host snapshots of state, for asynchronous saves
    background        the asynchronous save in flight: its thread and its process group
    store             save and load: the orchestration (the directory layout is described there)

Callers use the names re-exported here.
"""
from .background import BackgroundSaves
from .errors import CheckpointError, UntrustedCheckpointError
from .files import FORMAT_VERSION, apply_retention, list_checkpoints, load_file, verify
from .locate import find_resumable, resolve_checkpoint, resumable
from .meta import Progress, check_compatible, read_meta, step_tag
from .reshard import apply_full_state, read_full_state
from .store import load, nonfinite_state, resume_candidates, save
from .weights_only import WeightStream, write_weights_checkpoint

__all__ = [
    "BackgroundSaves", "CheckpointError", "UntrustedCheckpointError", "FORMAT_VERSION", "apply_retention",
    "list_checkpoints", "load_file", "verify", "find_resumable", "resolve_checkpoint", "resumable", "Progress",
    "check_compatible", "read_meta", "step_tag", "apply_full_state", "read_full_state", "load", "nonfinite_state",
    "resume_candidates", "save", "WeightStream", "write_weights_checkpoint",
]
