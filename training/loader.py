"""Training/validation loader over prepared token shards: one exact, resumable global sample stream.

The global stream is defined by the data alone (never by dp_size or workers):
epoch e visits the shards in a permutation seeded by (seed, e) and, inside each
shard, the samples in a permutation seeded by (seed, e, shard index); then
epoch e + 1 follows. Global position p counts samples consumed so far.

A rank's k-th micro-batch holds global positions
    start_sample + k * dp_size * micro_batch_size + dp_rank * micro_batch_size + [0, micro_batch_size)
so DP=2 with micro-batch b sees what DP=1 sees over two accumulated
micro-batches of b, and a resumed run only needs the global sample count.

Trade-off: every rank and every DataLoader worker reads every shard and keeps
only its own positions. That is simple and exact (all readers agree on the
stream, including which shards are corrupt), at the cost of IO multiplied by
dp_size * num_workers, which for token data is small next to compute.
"""
from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from skiptron.training.shards import FORMAT, FORMAT_VERSION, MANIFEST, SAMPLE_FIELD


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory; a clear error if the directory is not one."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared data directory (run `skiptron-data prepare --out {data_dir}`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {manifest.get('version')}, this code reads {FORMAT_VERSION}")
    return manifest


def _split_entry(manifest: dict, split: str, data_dir: str | Path) -> dict:
    if split not in manifest["splits"]:
        raise ValueError(f"unknown split {split!r} in {Path(data_dir) / MANIFEST}; have {sorted(manifest['splits'])}")
    return manifest["splits"][split]


def num_samples(data_dir: str | Path, split: str) -> int:
    """Samples per epoch of `split`, as recorded in the manifest (corrupt shards not subtracted)."""
    return _split_entry(read_manifest(data_dir), split, data_dir)["samples"]


def read_shard(path: str | Path) -> Iterator[dict]:
    """Decoded samples of one tar shard, in tar order; the file is closed when iteration ends."""
    with open(path, "rb") as stream:
        files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
        yield from wds.decode()(wds.tariterators.group_by_keys(files))


class CorruptShard(Exception):
    """A shard that cannot be used; the message says why."""


class SampleStream:
    """The global sample stream of one split, read by one rank/worker.

    `take(positions)` yields the samples at increasing global positions.
    Corrupt shards count as empty; shards wholly before the next wanted
    position are not decoded once their validity is known, and whole epochs
    are skipped arithmetically once every shard's validity is known.
    """

    def __init__(self, data_dir: str | Path, split: str, seed: int, shuffle: bool):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        self.shards = _split_entry(self.manifest, split, data_dir)["shards"]
        self.split, self.seed, self.shuffle = split, seed, shuffle
        self.sample_shape = (self.manifest["sample_len"],)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.corrupt: dict[str, str] = {}
        self._valid: dict[int, bool] = {}

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        count = self.shards[shard]["samples"]
        if not self.shuffle:
            return np.arange(count)
        return np.random.default_rng([self.seed, epoch, shard]).permutation(count)

    def _read(self, index: int) -> list[np.ndarray]:
        """All samples of shard `index` in tar order; raises CorruptShard if anything is off."""
        entry = self.shards[index]
        path = self.data_dir / entry["name"]
        if not path.is_file():
            raise CorruptShard(f"missing file {path}")
        try:
            decoded = list(read_shard(path))
        except Exception as exc:
            reason = exc.args[0] if exc.args else exc  # webdataset appends the file object and url to args
            raise CorruptShard(f"read error: {type(exc).__name__}: {reason}") from exc
        samples = [sample.get(SAMPLE_FIELD) for sample in decoded]
        for sample, tokens in zip(decoded, samples):
            if not isinstance(tokens, np.ndarray) or tokens.shape != self.sample_shape or tokens.dtype != self.dtype:
                raise CorruptShard(f"sample {sample['__key__']!r} has no {self.dtype} {SAMPLE_FIELD} of shape {self.sample_shape}")
        if len(samples) != entry["samples"]:
            raise CorruptShard(f"has {len(samples)} samples, manifest says {entry['samples']}")
        return samples

    def _load(self, index: int) -> list[np.ndarray] | None:
        """Samples of a shard, or None (recorded in `corrupt`) if it is unusable."""
        try:
            samples = self._read(index)
        except CorruptShard as exc:
            self.corrupt[self.shards[index]["name"]] = str(exc)
            samples = None
        self._valid[index] = samples is not None
        return samples

    def _size(self, index: int) -> int:
        return self.shards[index]["samples"] if self._valid[index] else 0

    def _epoch_size(self) -> int | None:
        """Samples per epoch once every shard's validity is known, else None."""
        if len(self._valid) < len(self.shards):
            return None
        size = sum(self._size(i) for i in range(len(self.shards)))
        if size == 0:
            raise RuntimeError(
                f"all {len(self.shards)} {self.split} shards in {self.data_dir} are corrupt or missing: {sorted(self.corrupt)}"
            )
        return size

    def take(self, positions: Iterator[int]) -> Iterator[np.ndarray]:
        """Samples at `positions` (strictly increasing global positions), lazily and forever."""
        target = next(positions)
        start = 0
        for epoch in itertools.count():
            epoch_size = self._epoch_size()
            if epoch_size is not None and start + epoch_size <= target:
                start += epoch_size
                continue
            for shard in self.shard_order(epoch):
                if shard in self._valid and start + self._size(shard) <= target:
                    start += self._size(shard)
                    continue
                samples = self._load(shard)
                if samples is None:
                    continue
                order = self.sample_order(epoch, shard)
                while target < start + len(samples):
                    yield samples[order[target - start]]
                    target = next(positions)
                start += len(samples)


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _RankBatches(IterableDataset):
    """One rank's micro-batches; inside DataLoader worker w of W it makes those with k % W == w.

    Yields (batch, corrupt shards seen so far) so the main process can warn and count.
    """

    def __init__(self, data_dir, split, micro_batch_size, dp_rank, dp_size, seed, start_sample, shuffle):
        super().__init__()
        self.args = (data_dir, split, seed, shuffle)
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.start_sample = start_sample

    def positions(self, worker: int, num_workers: int) -> Iterator[int]:
        b = self.micro_batch_size
        for k in itertools.count(worker, num_workers):
            first = self.start_sample + k * self.dp_size * b + self.dp_rank * b
            yield from range(first, first + b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, str]]]:
        stream = SampleStream(*self.args)
        samples = stream.take(self.positions(*_worker_identity()))
        while True:
            batch = np.stack([next(samples) for _ in range(self.micro_batch_size)]).astype(np.int64)
            yield torch.from_numpy(batch), dict(stream.corrupt)


class TokenLoader:
    """Infinite iterator of `torch.LongTensor[micro_batch_size, seq_len + 1]` for one data-parallel rank.

    Use `batch[:, :-1]` as inputs and `batch[:, 1:]` as labels. With gradient
    accumulation ga, step s micro-step m is micro-batch k = s * ga + m; to
    resume after `consumed` global samples pass `start_sample=consumed` (it
    may be used with a different dp_size).

    Corrupt or missing shards are skipped whole (every reader skips the same
    ones, so the stream stays consistent), warned about by name, and reported
    in `stats["corrupt_shards"]` (count) and `stats["corrupt"]` (name -> reason),
    for num_workers=0 and for worker processes alike: workers send their
    findings along with each batch and the main process records them here.
    Each `iter()` starts over at `start_sample` (with fresh workers).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        seed: int = 1234,
        start_sample: int = 0,
        shuffle: bool = True,
    ):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got {micro_batch_size}, {dp_rank}, {dp_size}")
        if num_workers < 0 or start_sample < 0:
            raise ValueError(f"num_workers and start_sample must be >= 0, got {num_workers}, {start_sample}")
        self.manifest = read_manifest(data_dir)
        _split_entry(self.manifest, split, data_dir)
        self.data_dir, self.split = Path(data_dir), split
        self.seq_len = self.manifest["seq_len"]
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        self.dataset = _RankBatches(data_dir, split, micro_batch_size, dp_rank, dp_size, seed, start_sample, shuffle)
        self.stats: dict = {"corrupt_shards": 0, "corrupt": {}}

    def _batches(self) -> Iterator[tuple[torch.Tensor, dict[str, str]]]:
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch, corrupt in self._batches():
            for name in corrupt.keys() - self.stats["corrupt"].keys():
                warnings.warn(f"skipping corrupt {self.split} shard {self.data_dir / name}: {corrupt[name]}", stacklevel=2)
                self.stats["corrupt"][name] = corrupt[name]
            self.stats["corrupt_shards"] = len(self.stats["corrupt"])
            yield batch

