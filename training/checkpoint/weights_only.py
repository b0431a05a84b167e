"""Weights-only checkpoints (made by `skiptron-convert from-hf`, `skiptron-compress --out`, `skiptron-finetune
merge`): whole fp32 weights and buffers in one file, no optimizer, loadable under any layout."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .files import FORMAT, FORMAT_VERSION, TMP_PREFIX, _checksums, _listing, _load, _torch_save, _write_manifest
from .meta import META, Progress

WEIGHTS_FILE = "model.pt"


def _load_weights_file(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    return _load(path / WEIGHTS_FILE, trust)


def write_weights_checkpoint(out: str | os.PathLike, cfg, weights: dict[str, torch.Tensor], vocab_size: int,
                             tokenizer: str | os.PathLike | None = None) -> Path:
    """A layout-independent checkpoint of whole fp32 weights (no optimizer): loads under any TP/PP/DP/ZeRO layout.
    `weights` may also hold persistent buffers (routing controllers) by name; loading restores them."""
    from ..config import save_config

    out = Path(out)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _torch_save({k: v.float().contiguous() for k, v in weights.items()}, tmp / WEIGHTS_FILE)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "weights", **asdict(Progress()),
            "time": time.time(), "vocab_size": vocab_size,
            "params": {k: {"shape": list(v.shape), "partition_dim": None, "stride": 1} for k, v in weights.items()}}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    save_config(cfg, tmp / "config.yaml")
    if tokenizer and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    _write_manifest(tmp, _checksums(tmp, _listing(tmp)), True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
