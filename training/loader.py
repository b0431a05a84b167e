"""Training/validation loader over prepared token shards: one exact, resumable global sample stream.

The global stream is defined by the data alone (never by dp_size or workers):
epoch e visits the shards in a permutation seeded by (seed, e) and, inside each
shard, the samples in a permutation seeded by (seed, e, shard index); then
epoch e + 1 follows. Global position p counts samples consumed so far.

A rank's k-th micro-batch holds global positions
    start_sample + k * dp_size * micro_batch_size + dp_rank * micro_batch_size + [0, micro_batch_size)
so DP=2 with micro-batch b sees what DP=1 sees over two accumulated
micro-batches of b, and a resumed run only needs the global sample count.

Each reader (rank, DataLoader worker) computes where its positions live from
the manifest's per-shard counts and reads only those samples through the shard
index (training/samples.py), so a rank reads ~1/dp_size of the data and a
resume at any position opens only the shards it reads next. Which shards are
unusable is decided by stat() alone, identically for every reader. A blend of
several directories maps global positions to (source, position in that
source's own stream) arithmetically (training/blend.py).
"""
from __future__ import annotations

import functools
import itertools
import json
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from skiptron.training.blend import Mixture, Source
from skiptron.training.samples import file_problem, open_shard, sha256_file
from skiptron.training.shards import FORMAT, FORMAT_VERSION, MANIFEST


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
        raise ValueError(f"{path} has format version {manifest.get('version')}, this code reads {FORMAT_VERSION} "
                         f"(sample indexes and shard checksums): prepare {data_dir} again")
    return manifest


def _split_entry(manifest: dict, split: str, data_dir: str | Path) -> dict:
    if split not in manifest["splits"]:
        raise ValueError(f"unknown split {split!r} in {Path(data_dir) / MANIFEST}; have {sorted(manifest['splits'])}")
    return manifest["splits"][split]


def num_samples(data_dir: str | Path, split: str) -> int:
    """Samples per epoch of `split`, as recorded in the manifest (corrupt shards not subtracted)."""
    return _split_entry(read_manifest(data_dir), split, data_dir)["samples"]


class SampleStream:
    """The global sample stream of one split of one prepared directory, read at random positions.

    `sample(p)` reads only global sample p: its epoch, shard and place in the shard follow from the manifest's
    per-shard counts (no earlier shard is opened), and the shard index gives its bytes. Shards that are missing
    or have the wrong size (training/samples.py `file_problem`, stat only) count as empty for every reader alike;
    they are listed in `corrupt` (name -> reason) from the start.
    """

    def __init__(self, data_dir: str | Path, split: str, seed: int, shuffle: bool, max_open: int = 8):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        self.shards = _split_entry(self.manifest, split, data_dir)["shards"]
        self.split, self.seed, self.shuffle = split, seed, shuffle
        self.sample_shape = (self.manifest["sample_len"],)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.corrupt: dict[str, str] = {}
        size_of = functools.lru_cache(maxsize=None)(lambda path: path.stat().st_size)
        for entry in self.shards:
            problem = file_problem(self.data_dir, entry, size_of)
            if problem:
                self.corrupt[entry["name"]] = problem
        self.sizes = np.array([0 if e["name"] in self.corrupt else e["samples"] for e in self.shards], dtype=np.int64)
        self.epoch_size = int(self.sizes.sum())
        if self.epoch_size == 0:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.corrupt.items())
            raise RuntimeError(f"all {len(self.shards)} {split} shards in {self.data_dir} are corrupt or missing: {reasons}")
        self.max_open = max_open
        self._open: dict[int, object] = {}  # shard -> reader, least recently used first
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None
        self._sample_orders: dict[tuple[int, int], np.ndarray] = {}
        self.bytes_read = 0  # of closed readers; see `total_bytes_read`

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        count = self.shards[shard]["samples"]
        if not self.shuffle:
            return np.arange(count)
        return np.random.default_rng([self.seed, epoch, shard]).permutation(count)

    def locate(self, p: int) -> tuple[int, int]:
        """(shard, sample in tar order) of global position p."""
        epoch, offset = divmod(p, self.epoch_size)
        if self._layout is None or self._layout[0] != epoch:
            order = self.shard_order(epoch)
            self._layout = (epoch, order, np.cumsum(self.sizes[order]))
        _, order, ends = self._layout
        slot = int(np.searchsorted(ends, offset, side="right"))
        shard = int(order[slot])
        within = offset - (int(ends[slot - 1]) if slot else 0)
        key = (epoch, shard)
        if key not in self._sample_orders:
            if len(self._sample_orders) >= self.max_open:
                self._sample_orders.pop(next(iter(self._sample_orders)))
            self._sample_orders[key] = self.sample_order(epoch, shard)
        return shard, int(self._sample_orders[key][within])

    def _reader(self, shard: int):
        reader = self._open.pop(shard, None)
        if reader is None:
            if len(self._open) >= self.max_open:
                oldest = self._open.pop(next(iter(self._open)))
                self.bytes_read += oldest.bytes_read
                oldest.close()
            reader = open_shard(self.data_dir, self.shards[shard], self.sample_shape, self.dtype)
        self._open[shard] = reader
        return reader

    def sample(self, p: int) -> np.ndarray:
        shard, index = self.locate(p)
        return self._reader(shard).read(index)

    def take(self, positions: Iterator[int]) -> Iterator[np.ndarray]:
        """Samples at `positions` (global positions, any order), lazily."""
        for p in positions:
            yield self.sample(p)

    @property
    def total_bytes_read(self) -> int:
        return self.bytes_read + sum(r.bytes_read for r in self._open.values())

    def close(self) -> None:
        for shard in list(self._open):
            reader = self._open.pop(shard)
            self.bytes_read += reader.bytes_read
            reader.close()


def check_sources(sources: Sequence[Source]) -> dict:
    """The manifests of a blend's sources must agree on tokenizer and sample layout; returns the first one."""
    manifests = [read_manifest(s.path) for s in sources]
    first, ref = manifests[0], sources[0]
    for source, manifest in zip(sources[1:], manifests[1:]):
        if tokenizer_digest(source.path, manifest) != tokenizer_digest(ref.path, first) or manifest["vocab_size"] != first["vocab_size"] \
                or manifest["eot_id"] != first["eot_id"]:
            raise ValueError(f"data sources {ref.path} and {source.path} were tokenized with different tokenizers "
                             f"(vocab {first['vocab_size']} vs {manifest['vocab_size']}); blend only data prepared "
                             f"with the same tokenizer.json")
        for key in ("seq_len",):
            if manifest[key] != first[key]:
                raise ValueError(f"data sources {ref.path} and {source.path} differ in {key}: "
                                 f"{first[key]} vs {manifest[key]}; prepare them with the same --seq-len")
    return first


class BlendedStream:
    """The global stream of a blend: global sample p is sample `locate(p)[1]` of source `locate(p)[0]`."""

    def __init__(self, sources: Sequence[Source], split: str, seed: int, shuffle: bool):
        check_sources(sources)
        self.sources = list(sources)
        self.mixture = Mixture([s.weight for s in sources])
        self.streams = [SampleStream(s.path, split, seed, shuffle) for s in sources]

    @property
    def corrupt(self) -> dict[str, str]:
        """Unusable shards of every source, by path relative to the source (`code/train-000003.tar`)."""
        return {f"{s.name}/{name}": why for s, st in zip(self.sources, self.streams) for name, why in st.corrupt.items()}

    def sample(self, p: int) -> np.ndarray:
        j, local = self.mixture.locate(p)
        return self.streams[j].sample(local)

    def take(self, positions: Iterator[int]) -> Iterator[np.ndarray]:
        for p in positions:
            yield self.sample(p)

    @property
    def total_bytes_read(self) -> int:
        return sum(s.total_bytes_read for s in self.streams)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


def as_sources(data: str | Path | Sequence[Source]) -> list[Source]:
    """A prepared directory is a blend of one source with weight 1 (the same stream as the directory alone)."""
    if isinstance(data, (str, Path)):
        return [Source(Path(data).name, 1.0, str(data))]
    return list(data)


def tokenizer_digest(data_dir: str | Path, manifest: dict) -> str:
    path = Path(data_dir) / manifest["tokenizer"]
    return sha256_file(path) if path.is_file() else f"missing {path}"


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _RankBatches(IterableDataset):
    """One rank's micro-batches; inside DataLoader worker w of W it makes those with k % W == w."""

    def __init__(self, sources, split, micro_batch_size, dp_rank, dp_size, seed, start_sample, shuffle):
        super().__init__()
        self.args = (sources, split, seed, shuffle)
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.start_sample = start_sample

    def positions(self, worker: int, num_workers: int) -> Iterator[int]:
        b = self.micro_batch_size
        for k in itertools.count(worker, num_workers):
            first = self.start_sample + k * self.dp_size * b + self.dp_rank * b
            yield from range(first, first + b)

    def __iter__(self) -> Iterator[torch.Tensor]:
        stream = BlendedStream(*self.args)
        samples = stream.take(self.positions(*_worker_identity()))
        try:
            while True:
                yield torch.from_numpy(np.stack([next(samples) for _ in range(self.micro_batch_size)]).astype(np.int64))
        finally:
            stream.close()


class TokenLoader:
    """Infinite iterator of `torch.LongTensor[micro_batch_size, seq_len + 1]` for one data-parallel rank.

    `data` is a prepared directory or a list of `Source`s (a blend). Use `batch[:, :-1]` as inputs and
    `batch[:, 1:]` as labels. With gradient accumulation ga, step s micro-step m is micro-batch k = s * ga + m;
    to resume after `consumed` global samples pass `start_sample=consumed` (it may be used with a different
    dp_size); `consumed_by_source(n)` says how many of the first n global samples came from each source.

    Shards that are missing or of the wrong size are skipped by every reader alike, warned about by name, and
    reported in `stats["corrupt_shards"]` (count) and `stats["corrupt"]` (name -> reason) as soon as the loader
    exists (the check is a stat() of each shard, so it needs no reading). Each `iter()` starts over at
    `start_sample` (with fresh workers).
    """

    def __init__(
        self,
        data: str | Path | Sequence[Source],
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
        self.sources = as_sources(data)
        probe = BlendedStream(self.sources, split, seed, shuffle)  # validates the sources and finds unusable shards
        self.mixture = probe.mixture
        self.manifest = read_manifest(self.sources[0].path)
        self.split = split
        self.seq_len = self.manifest["seq_len"]
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        self.dataset = _RankBatches(self.sources, split, micro_batch_size, dp_rank, dp_size, seed, start_sample, shuffle)
        corrupt = probe.corrupt if len(self.sources) > 1 else probe.streams[0].corrupt
        for name, reason in corrupt.items():
            warnings.warn(f"skipping corrupt {split} shard {name}: {reason}", stacklevel=2)
        self.stats: dict = {"corrupt_shards": len(corrupt), "corrupt": corrupt}

    def consumed_by_source(self, samples: int) -> dict[str, int]:
        """How many of the global samples [0, samples) each source contributed."""
        return {s.name: int(n) for s, n in zip(self.sources, self.mixture.consumed(samples))}

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers))
