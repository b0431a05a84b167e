"""Joining prepared directories (same tokenizer, same seq_len) into one, e.g. parts prepared on several machines.

Shards and their indexes are hard-linked (copied across filesystems) under the names of one sequence, in the
order of the inputs; an index holds offsets inside its own tar, so it stays valid under a new name. The
manifest is written last, as `prepare` does.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from skiptron.training.blend import Source
from skiptron.training.loader import check_sources, read_manifest
from skiptron.training.samples import INDEX_SUFFIX, shard_path
from skiptron.training.shards import (MANIFEST, SPLITS, TOKENIZER_FILE, UNIGRAM_FILE, clear_previous,
                                      entropy_of_counts, shard_name, write_json_atomic)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def merge(out_dir: str | Path, inputs: Sequence[str | Path]) -> dict:
    """Merge prepared directories `inputs` into `out_dir`; returns the new manifest."""
    started = time.perf_counter()
    if len(inputs) < 2:
        raise ValueError(f"merge needs at least 2 prepared directories, got {len(inputs)}")
    out_dir = Path(out_dir)
    if any(Path(d).resolve() == out_dir.resolve() for d in inputs):
        raise ValueError(f"merge output {out_dir} must not be one of its inputs")
    first = check_sources([Source(Path(d).name, 1.0, str(d)) for d in inputs])
    manifests = [read_manifest(d) for d in inputs]
    for d, m in zip(inputs, manifests):
        if any(e.get("kind") == "bin" for split in SPLITS for e in m["splits"][split]["shards"]):
            raise ValueError(f"{d} is an imported Megatron dataset; blend it (data.blend) instead of merging it")
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_previous(out_dir)
    shutil.copyfile(Path(inputs[0]) / first["tokenizer"], out_dir / TOKENIZER_FILE)
    splits = {}
    for split in SPLITS:
        shards = []
        for d, m in zip(inputs, manifests):
            for entry in m["splits"][split]["shards"]:
                name = shard_name(split, len(shards))
                index = name[: -len(".tar")] + INDEX_SUFFIX
                _link(shard_path(Path(d), entry), out_dir / name)
                _link(Path(d) / entry["index"], out_dir / index)
                shards.append({**entry, "name": name, "index": index})
        splits[split] = {
            "documents": sum(m["splits"][split]["documents"] for m in manifests),
            "samples": sum(e["samples"] for e in shards),
            "tokens": sum(e["tokens"] for e in shards),
            "shards": shards,
        }
    counts = sum(np.load(Path(d) / UNIGRAM_FILE) for d in inputs)
    np.save(out_dir / UNIGRAM_FILE, counts)
    manifest = {
        **first,
        "source": "merge of " + ", ".join(str(d) for d in inputs),
        "documents": sum(m["documents"] for m in manifests),
        "invalid_utf8": sum(m["invalid_utf8"] for m in manifests),
        "unigram_entropy": entropy_of_counts(counts),
        "splits": splits,
        "prepare_seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
