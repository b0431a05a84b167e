"""Weights-only checkpoints (made by `skiptron-convert from-hf`, `skiptron-compress --out`, `skiptron-finetune
merge`): whole fp32 weights and buffers, no optimizer, loadable under any layout.

They are a safetensors set (`model.safetensors`, or shards with an index past `MAX_SHARD_SIZE`), written one tensor
at a time and read lazily: `_load_weights_file` returns a mapping that reads a tensor from its file (`safe_open`)
only when asked for it, so loading, resharding or exporting one holds one whole tensor at a time, not the model.
Checkpoints written before (one pickled `model.pt`) still load, whole."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..safetensors_io import INDEX_FILE, SINGLE_FILE, TensorSpec, safetensors_files, write_set
from .files import FORMAT, FORMAT_VERSION, TMP_PREFIX, _checksums, _listing, _load, _write_manifest
from .meta import META, Progress

LEGACY_WEIGHTS_FILE = "model.pt"
MAX_SHARD_SIZE = "2GB"


class LazyWeights(Mapping):
    """Tensor name -> tensor of a safetensors set, each read from its file when looked up (and not kept); `pop`
    forgets a name, for a consumer that walks the set once."""

    def __init__(self, directory: Path):
        self.files = safetensors_files(directory)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(name)
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def pop(self, name: str) -> torch.Tensor:
        value = self[name]
        del self.files[name]
        return value


def _load_weights_file(path: Path, trust: bool = False) -> Mapping[str, torch.Tensor]:
    if (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file():
        return LazyWeights(path)
    return _load(path / LEGACY_WEIGHTS_FILE, trust)


@dataclass
class WeightStream:
    """Whole weights produced one at a time (e.g. converted from another format as they are read): every name's
    shape up front, then the `(name, tensor)` pairs in any order."""

    shapes: dict[str, tuple[int, ...]]
    tensors: Iterable[tuple[str, torch.Tensor]]


def write_weights_checkpoint(out: str | os.PathLike, cfg, weights: Mapping[str, torch.Tensor] | WeightStream,
                             vocab_size: int, tokenizer: str | os.PathLike | None = None) -> Path:
    """A layout-independent checkpoint of whole fp32 weights (no optimizer): loads under any TP/PP/DP/ZeRO layout.
    `weights` may also hold persistent buffers (routing controllers) by name; loading restores them. A
    `WeightStream` is written holding one tensor at a time."""
    from ..config import save_config

    out = Path(out)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if not isinstance(weights, WeightStream):
        weights = WeightStream({k: tuple(v.shape) for k, v in weights.items()}, weights.items())
    specs = [TensorSpec(k, shape, torch.float32) for k, shape in weights.shapes.items()]
    write_set(tmp, specs, ((k, v.float().contiguous()) for k, v in weights.tensors), MAX_SHARD_SIZE,
              metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "weights", **asdict(Progress()),
            "time": time.time(), "vocab_size": vocab_size,
            "params": {k: {"shape": list(shape), "partition_dim": None, "stride": 1}
                       for k, shape in weights.shapes.items()}}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    save_config(cfg, tmp / "config.yaml")
    if tokenizer and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    _write_manifest(tmp, _checksums(tmp, _listing(tmp)), True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
