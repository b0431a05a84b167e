"""Safetensors files written one tensor at a time, and sharded sets with the index transformers writes, so an export
never holds more than one tensor of the model.

The layout of every file (its JSON header: names, dtypes, shapes, byte offsets) follows from the tensors' specs
alone, so it is written first and each tensor is then written at its offset as it arrives, in any order. The set is
written into a temporary directory and only complete (every tensor written once, nothing else) is it moved into
place, so a failed export never leaves a directory that looks whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.24's save_pretrained default
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        """The spec of a real or meta tensor."""
        return cls(name, tuple(tensor.shape), tensor.dtype)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like transformers' `max_shard_size` ("5GB" = 5 x 10^9, "500MiB", "100KB")."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"max shard size {size!r}: expected a number of bytes or e.g. 5GB, 500MB, 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive specs grouped into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own),
    as transformers' `split_torch_state_dict_into_shards` does."""
    shards, size = [[]], 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


class _FileLayout:
    """One safetensors file: its header bytes and each tensor's absolute byte range."""

    def __init__(self, specs: list[TensorSpec], metadata: dict[str, str] | None):
        header, offset = {}, 0
        for spec in specs:
            if spec.dtype not in DTYPE_NAMES:
                raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.header = struct.pack("<Q", len(text)) + text
        self.data_bytes = offset
        self.ranges = {name: (len(self.header) + a, len(self.header) + b)
                       for name, (a, b) in ((n, e["data_offsets"]) for n, e in header.items() if n != "__metadata__")}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _write_files(tmp: Path, names: list[str], layouts: list[_FileLayout], where: dict, tensors, files: list) -> None:
    for name, layout in zip(names, layouts):
        f = open(tmp / name, "wb")
        files.append(f)
        f.write(layout.header)
        f.truncate(len(layout.header) + layout.data_bytes)
    written = set()
    for name, tensor in tensors:
        if name not in where:
            raise ValueError(f"{name}: not a tensor of this export")
        if name in written:
            raise ValueError(f"{name}: written twice")
        i, spec = where[name]
        if TensorSpec.of(name, tensor) != spec:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} {tensor.dtype}, expected {spec.shape} {spec.dtype}")
        files[i].seek(layouts[i].ranges[name][0])
        files[i].write(_tensor_bytes(tensor))
        written.add(name)
    missing = sorted(where.keys() - written)
    if missing:
        raise ValueError(f"{missing[0]}: never written ({len(missing)} tensors missing)")
    for f in files:
        f.flush()
        os.fsync(f.fileno())


def write_set(out: str | os.PathLike, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, metadata: dict[str, str] | None = None
              ) -> list[Path]:
    """Write `tensors` (name, tensor) pairs, in any order, as the files of `specs` in directory `out`: one
    `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when they
    exceed `max_shard_size`; safetensors files and an index already in `out` are replaced. Returns the written files. Raises ValueError naming the tensor if one is missing,
    repeated, unexpected or of another shape or dtype than its spec (nothing is then written to `out`)."""
    out = Path(out)
    shards = plan_shards(specs, parse_size(max_shard_size))
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tmp = out.parent / f".tmp-{out.name}-safetensors"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    layouts = [_FileLayout(shard, metadata) for shard in shards]
    where = {spec.name: (i, spec) for i, shard in enumerate(shards) for spec in shard}
    files = []
    try:
        _write_files(tmp, names, layouts, where, tensors, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for f in files:
            f.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {spec.name: names[i] for i, shard in enumerate(shards) for spec in shard}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.safetensors"), out / INDEX_FILE]:
        if old.exists():
            old.unlink()
    placed = []
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
        placed.append(out / path.name)
    tmp.rmdir()
    return [p for p in placed if p.suffix == ".safetensors"]


def safetensors_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the file of a safetensors set holding it (from its index, or the files' headers)."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: path for k in f.keys()})
    return out
