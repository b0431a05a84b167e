"""Random access to single samples: the index written beside each tar shard, and readers for shards and .bin files.

A prepared shard `train-000000.tar` (webdataset: one `<key>.tokens.npy` member per sample) has its index
`train-000000.idx.npy` beside it: a uint64 array [samples, 3] of (payload offset in the tar, payload bytes,
crc32 of the payload), in tar order. A reader seeks straight to sample i and reads only its bytes.

Integrity is checked in two tiers so every reader of the global stream agrees on what is skipped:
- `file_problem()` (stat only, no file opened): a missing file or a size different from the manifest's. Every
  reader sees the same answer without reading a byte, so such shards are skipped alike by all ranks and workers.
- When a shard is first opened its index must match the manifest's sha256, and every sample read must match its
  crc32, dtype and shape. Damage found this way is visible only to the readers that touch those bytes, so it
  cannot be skipped consistently: it raises `DataIntegrityError` naming the file and sample.
  `skiptron-data verify DIR --quarantine` checks every shard whole and renames damaged ones to `*.corrupt`,
  which turns them into the first tier.

A Megatron-LM `.bin` (imported with `skiptron-data import-megatron`) is one flat token array; its "shards" are
ranges of `sample_len` token rows in it, read at `row * sample_len * itemsize`.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

INDEX_SUFFIX = ".idx.npy"
INDEX_COLUMNS = 3  # payload offset, payload bytes, crc32


class DataIntegrityError(RuntimeError):
    """Shard content differs from what `prepare` wrote, found while reading it (see the module docstring)."""


def index_name(shard_name: str) -> str:
    return shard_name[: -len(".tar")] + INDEX_SUFFIX if shard_name.endswith(".tar") else shard_name + INDEX_SUFFIX


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # Python >= 3.11


def write_index(tar_path: Path, field: str) -> dict:
    """Index the `field` members of a written tar shard; returns the manifest keys that describe shard and index."""
    rows = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("." + field):
                payload = tar.extractfile(member).read()
                rows.append((member.offset_data, member.size, zlib.crc32(payload)))
    path = tar_path.with_name(index_name(tar_path.name))
    np.save(path, np.asarray(rows, dtype=np.uint64).reshape(-1, INDEX_COLUMNS))
    return {"bytes": tar_path.stat().st_size, "index": path.name, "index_bytes": path.stat().st_size,
            "index_sha256": sha256_file(path)}


def shard_path(data_dir: Path, entry: dict) -> Path:
    """The file holding a shard's samples: the tar in the data dir, or an imported .bin (absolute or relative)."""
    return data_dir / entry.get("file", entry["name"])


def file_problem(data_dir: Path, entry: dict, size_of: Callable[[Path], int] | None = None) -> str | None:
    """Why a shard is unusable judging by stat() alone (same answer for every reader), or None. `size_of`
    (default: stat each time) lets a caller stat a file shared by many shards (a Megatron .bin) once."""
    checks = [(shard_path(data_dir, entry), entry.get("bytes"))]
    if "index" in entry:
        checks.append((data_dir / entry["index"], entry.get("index_bytes")))
    for path, size in checks:
        try:
            actual = size_of(path) if size_of else path.stat().st_size
        except FileNotFoundError:
            return f"missing file {path}"
        except OSError as exc:
            return f"cannot stat {path}: {exc}"
        if size is not None and actual != size:
            return f"{path} has {actual} bytes, manifest says {size} (truncated or rewritten)"
    return None


class _Reader:
    """Opens a file on first use and reads byte ranges with pread; counts the bytes it read."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.bytes_read = 0

    def pread(self, length: int, offset: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, length, offset)
        self.bytes_read += len(data)
        if len(data) != length:
            raise DataIntegrityError(f"{self.path}: short read at byte {offset} ({len(data)} of {length} bytes)")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TarShard:
    """Samples of one indexed tar shard by position in tar order."""

    def __init__(self, data_dir: Path, entry: dict, sample_shape: tuple[int, ...], dtype: np.dtype):
        self.path = shard_path(data_dir, entry)
        self.index_path = data_dir / entry["index"]
        self.entry, self.sample_shape, self.dtype = entry, sample_shape, dtype
        self._index: np.ndarray | None = None
        self._reader = _Reader(self.path)
        self.index_bytes_read = 0

    def _load_index(self) -> np.ndarray:
        raw = self.index_path.read_bytes()
        self.index_bytes_read += len(raw)
        if hashlib.sha256(raw).hexdigest() != self.entry["index_sha256"]:
            raise DataIntegrityError(f"{self.index_path}: checksum differs from the manifest (the index was changed)")
        index = np.load(io.BytesIO(raw), allow_pickle=False)
        if index.shape != (self.entry["samples"], INDEX_COLUMNS):
            raise DataIntegrityError(f"{self.index_path}: shape {index.shape}, manifest says {self.entry['samples']} samples")
        return index

    def read(self, i: int) -> np.ndarray:
        if self._index is None:
            self._index = self._load_index()
        offset, length, crc = (int(v) for v in self._index[i])
        payload = self._reader.pread(length, offset)
        if zlib.crc32(payload) != crc:
            raise DataIntegrityError(
                f"{self.path}: sample {i} fails its crc32 (damaged after prepare); run `skiptron-data verify "
                f"{self.path.parent} --quarantine` to set damaged shards aside")
        try:
            tokens = np.load(io.BytesIO(payload), allow_pickle=False)
        except ValueError as exc:
            raise DataIntegrityError(f"{self.path}: sample {i} is not a .npy array: {exc}") from exc
        if tokens.shape != self.sample_shape or tokens.dtype != self.dtype:
            raise DataIntegrityError(f"{self.path}: sample {i} is {tokens.dtype}{list(tokens.shape)}, "
                                     f"expected {self.dtype}{list(self.sample_shape)}")
        return tokens

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read + self.index_bytes_read

    def close(self) -> None:
        self._reader.close()


class BinRange:
    """Rows `first_sample + i` of a flat token file (a Megatron .bin): nothing to index, rows are fixed-size."""

    def __init__(self, data_dir: Path, entry: dict, sample_shape: tuple[int, ...], dtype: np.dtype):
        self.path = shard_path(data_dir, entry)
        self.first, self.dtype, self.sample_len = entry["first_sample"], dtype, sample_shape[0]
        self._reader = _Reader(self.path)

    def read(self, i: int) -> np.ndarray:
        row_bytes = self.sample_len * self.dtype.itemsize
        return np.frombuffer(self._reader.pread(row_bytes, (self.first + i) * row_bytes), dtype=self.dtype)

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    def close(self) -> None:
        self._reader.close()


def read_shard(path: str | Path) -> Iterator[dict]:
    """Decoded samples of one tar shard with webdataset, in tar order (sequential, every byte)."""
    import webdataset as wds

    with open(path, "rb") as stream:
        files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
        yield from wds.decode()(wds.tariterators.group_by_keys(files))


def open_shard(data_dir: Path, entry: dict, sample_shape: tuple[int, ...], dtype: np.dtype) -> TarShard | BinRange:
    kind = BinRange if entry.get("kind") == "bin" else TarShard
    return kind(data_dir, entry, sample_shape, dtype)


def describe_error(exc: BaseException) -> str:
    """A readable reason; webdataset's DecodingError carries its reason in fields and __cause__, not in args."""
    from webdataset.autodecode import DecodingError

    if isinstance(exc, DecodingError):
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else "no detail"
        return f"cannot decode {exc.k!r} of sample {exc.key!r}: {detail}"
    reason = exc.args[0] if exc.args else ""  # webdataset appends the file object and url to args
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def verify_shard(data_dir: Path, entry: dict, sample_shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Read a whole shard and check everything (stat, index, every sample; the tar decodes with webdataset).

    Returns the reason it is unusable, or None. Reads every byte: for `skiptron-data verify`, not for training.
    """
    problem = file_problem(data_dir, entry)
    if problem:
        return problem
    shard = open_shard(data_dir, entry, sample_shape, dtype)
    try:
        for i in range(entry["samples"]):
            shard.read(i)
        if entry.get("kind") != "bin":
            decoded = sum(1 for _ in read_shard(shard.path))
            if decoded != entry["samples"]:
                return f"{shard.path}: webdataset decodes {decoded} samples, manifest says {entry['samples']}"
    except DataIntegrityError as exc:
        return str(exc)
    except Exception as exc:
        return f"{shard.path}: {describe_error(exc)}"
    finally:
        shard.close()
    return None
