"""`prepare()`: documents -> tokenized, packed webdataset tar shards + their indexes + manifest.json.

Layout of a prepared directory:
    tokenizer.json
    train-000000.tar, train-000001.tar, ...   samples {"__key__", "tokens.npy"}
    train-000000.idx.npy, ...                 per-sample byte offsets + crc32 (training/samples.py)
    val-000000.tar, val-000000.idx.npy, ...
    unigram_counts.npy                        train token counts (for the entropy of merged directories)
    manifest.json                             written last: its presence marks completion

Each sample is `seq_len + 1` tokens so inputs (`[:-1]`) and shifted labels
(`[1:]`) come from one sample. Documents are joined with the EOT token after
each one and the ragged tail is dropped. Documents are streamed: the input is
scanned once for references (training/corpus.py), then read, tokenized and
written a batch at a time; `workers > 1` packs disjoint contiguous runs of the
document order in parallel processes (each drops its own ragged tail).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds

from skiptron.training.corpus import DocRef, read_text, scan
from skiptron.training.samples import INDEX_SUFFIX, write_index
from skiptron.training.tokenizer import build_tokenizer, eot_id, load_tokenizer

FORMAT = "skiptron-tokens"
FORMAT_VERSION = 2  # 2: per-shard index, sizes and checksums
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
SAMPLE_FIELD = "tokens.npy"
UNIGRAM_FILE = "unigram_counts.npy"
ENCODE_BATCH = 256  # documents tokenized per call


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def split_documents(documents: Sequence[DocRef], val_fraction: float, seed: int) -> dict[str, list[DocRef]]:
    """Deterministic train/val split by a seeded hash of each document's name.

    Hashing the name (not the position) keeps a document on the same side when
    other documents are added or removed. At least one document goes to each
    side: if the hash picks none for val, the lowest-hash document is moved.
    """
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to make a train and a val split, got {len(documents)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    def score(doc: DocRef) -> float:
        digest = hashlib.blake2b(f"{seed}\0{doc.name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    scores = [score(d) for d in documents]
    ranked = sorted(range(len(documents)), key=lambda i: (scores[i], i))
    wanted = sum(s < val_fraction for s in scores)
    val_ids = set(ranked[: min(max(wanted, 1), len(documents) - 1)])
    return {
        "train": [d for i, d in enumerate(documents) if i not in val_ids],
        "val": [d for i, d in enumerate(documents) if i in val_ids],
    }


def unigram_entropy(samples: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the token unigram distribution: the loss of a model that learned only frequencies."""
    return entropy_of_counts(np.bincount(samples.ravel(), minlength=vocab_size))


def entropy_of_counts(counts: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


class ShardWriter:
    """Packs a stream of documents' tokens into `sample_len` rows and writes them as indexed tar shards.

    `add(tokens)` appends one document (plus EOT); full shards are written as they fill, so memory holds at
    most one shard. `close()` writes the last partial shard (the ragged tail of tokens is dropped) and returns
    the shards' manifest entries.
    """

    def __init__(self, out_dir: Path, split: str, sample_len: int, samples_per_shard: int, eot: int,
                 dtype: np.dtype, vocab_size: int, name: Callable[[int], str] | None = None):
        self.out_dir, self.split, self.sample_len, self.per_shard = out_dir, split, sample_len, samples_per_shard
        self.eot, self.dtype = eot, dtype
        self.name = name or (lambda i: shard_name(split, i))
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.samples = 0
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def add(self, tokens: Sequence[int]) -> None:
        self.pending.append(np.asarray(tokens, dtype=self.dtype))
        self.pending.append(np.array([self.eot], dtype=self.dtype))
        self.pending_tokens += len(tokens) + 1
        if self.pending_tokens >= self.per_shard * self.sample_len:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        rows = len(stream) // self.sample_len
        full = rows if final else rows - rows % self.per_shard
        for start in range(0, full, self.per_shard):
            self._write(stream[start * self.sample_len : min(start + self.per_shard, full) * self.sample_len])
        rest = stream[full * self.sample_len :]
        self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)

    def _write(self, flat: np.ndarray) -> None:
        chunk = flat.reshape(-1, self.sample_len)
        name = self.name(len(self.shards))
        path = self.out_dir / name
        with wds.TarWriter(str(path)) as writer:
            for offset, row in enumerate(chunk):
                writer.write({"__key__": f"{self.split}-{self.samples + offset:09d}", SAMPLE_FIELD: row})
        self.shards.append({"name": name, "samples": len(chunk), "tokens": int(chunk.size),
                            **write_index(path, SAMPLE_FIELD)})
        self.samples += len(chunk)
        self.counts += np.bincount(chunk.ravel(), minlength=len(self.counts))[: len(self.counts)]

    def close(self) -> list[dict]:
        self._flush(final=True)
        return self.shards


def clear_previous(out_dir: Path) -> None:
    """Remove the old manifest first (so a crash leaves no 'complete' marker), then old shards and indexes."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for old in [*out_dir.glob(f"{split}-*.tar"), *out_dir.glob(f"{split}-*{INDEX_SUFFIX}")]:
            old.unlink()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write via a temp file + rename so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _batches(refs: Sequence[DocRef], size: int) -> Iterator[Sequence[DocRef]]:
    for start in range(0, len(refs), size):
        yield refs[start : start + size]


Progress = Callable[[str, int, int, int], None]  # (split, documents done, documents in the split, tokens done)


def _pack_split(out_dir: Path, split: str, refs: Sequence[DocRef], tokenizer_file: Path, text_field: str,
                sample_len: int, samples_per_shard: int, part: int | None = None,
                progress: Progress | None = None, total: int | None = None) -> tuple[list[dict], np.ndarray]:
    """Tokenize `refs` in order and write their shards; returns the shard entries and the unigram counts.
    With `part`, shard names carry it so parallel parts do not collide (`_rename_parts` renumbers them)."""
    tok = load_tokenizer(tokenizer_file)
    vocab = tok.get_vocab_size()
    name = None if part is None else (lambda i: f"{split}-p{part:04d}-{i:06d}.tar")
    writer = ShardWriter(out_dir, split, sample_len, samples_per_shard, eot_id(tok), token_dtype(vocab), vocab, name)
    done = tokens = 0
    for batch in _batches(refs, ENCODE_BATCH):
        for encoding in tok.encode_batch_fast([read_text(r, text_field) for r in batch], add_special_tokens=False):
            writer.add(encoding.ids)
            tokens += len(encoding.ids) + 1
        done += len(batch)
        if progress:
            progress(split, done, total or len(refs), tokens)
    return writer.close(), writer.counts


def _pack_part(args: tuple) -> tuple[list[dict], np.ndarray, int, int]:
    """One parallel part (runs in a worker process); also returns its document and token counts."""
    shards, counts = _pack_split(*args)
    refs = args[2]
    return shards, counts, len(refs), int(sum(e["tokens"] for e in shards))


def _rename_parts(out_dir: Path, split: str, shards: list[dict]) -> list[dict]:
    """Give the shards of all parts the names of one sequence (`train-000000.tar`, ...), in order."""
    renamed = []
    for index, entry in enumerate(shards):
        new = shard_name(split, index)
        os.replace(out_dir / entry["name"], out_dir / new)
        new_index = new[: -len(".tar")] + INDEX_SUFFIX
        os.replace(out_dir / entry["index"], out_dir / new_index)
        renamed.append({**entry, "name": new, "index": new_index})
    return renamed


def _write_split(out_dir: Path, split: str, refs: Sequence[DocRef], tokenizer_file: Path, text_field: str,
                 sample_len: int, samples_per_shard: int, workers: int, progress: Progress | None):
    if progress:
        progress(split, 0, len(refs), 0)
    if workers <= 1 or len(refs) < 2 * workers:
        return _pack_split(out_dir, split, refs, tokenizer_file, text_field, sample_len, samples_per_shard,
                           progress=progress)
    bounds = np.linspace(0, len(refs), workers + 1).astype(int)
    jobs = [(out_dir, split, refs[bounds[k] : bounds[k + 1]], tokenizer_file, text_field, sample_len,
             samples_per_shard, k) for k in range(workers)]
    shards, counts, docs, tokens = [], None, 0, 0
    with ProcessPoolExecutor(workers) as pool:
        for part_shards, part_counts, part_docs, part_tokens in pool.map(_pack_part, jobs):
            shards += part_shards
            counts = part_counts if counts is None else counts + part_counts
            docs, tokens = docs + part_docs, tokens + part_tokens
            if progress:
                progress(split, docs, len(refs), tokens)
    return _rename_parts(out_dir, split, shards), counts


def prepare(
    out_dir: str | Path,
    inputs: Sequence[str | Path] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    seq_len: int = 256,
    val_fraction: float = 0.01,
    samples_per_shard: int = 1024,
    seed: int = 1234,
    text_field: str = "text",
    workers: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Tokenize and shard `inputs` (default: the embedded stdlib corpus) into `out_dir`; returns the manifest.

    `tokenizer` is "bytes", "bpe" (trained on the train split only, so val stays
    unseen) or a tokenizer.json path (then `vocab_size` comes from that file).
    Train documents are packed in a seeded random order so that shards mix
    sources instead of holding one package each. `progress(split, documents done,
    documents in the split, tokens done)` is called as documents are written.
    """
    if seq_len < 1 or samples_per_shard < 1 or workers < 1:
        raise ValueError(f"seq_len, samples_per_shard and workers must be >= 1, got {seq_len}, {samples_per_shard}, {workers}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    corpus = scan(inputs, text_field=text_field)
    docs = split_documents(corpus.refs, val_fraction, seed)
    order = np.random.default_rng(seed).permutation(len(docs["train"]))
    docs["train"] = [docs["train"][i] for i in order]

    def train_texts() -> Iterable[str]:
        return (read_text(ref, text_field) for ref in docs["train"])

    tok = build_tokenizer(tokenizer, train_texts, vocab_size)
    vocab = tok.get_vocab_size()
    eot, dtype, sample_len = eot_id(tok), token_dtype(vocab), seq_len + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_previous(out_dir)
    tok.save(str(out_dir / TOKENIZER_FILE))
    splits = {}
    for split in ("val", "train"):  # val first: its size check fails fast
        shards, counts = _write_split(out_dir, split, docs[split], out_dir / TOKENIZER_FILE, text_field, sample_len,
                                      samples_per_shard, workers, progress)
        if not shards:
            raise ValueError(
                f"{split} split of {corpus.source} has fewer than seq_len+1={sample_len} tokens "
                f"({len(docs[split])} documents); use more input, a smaller --seq-len or a larger --val-fraction"
            )
        samples = sum(e["samples"] for e in shards)
        splits[split] = {"documents": len(docs[split]), "samples": samples, "tokens": samples * sample_len,
                         "shards": shards}
        if split == "train":
            np.save(out_dir / UNIGRAM_FILE, counts)
            entropy = entropy_of_counts(counts)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": corpus.source,
        "seq_len": seq_len,
        "sample_len": sample_len,
        "vocab_size": vocab,
        "eot_id": eot,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_kind": tokenizer if tokenizer in ("bytes", "bpe") else "file",
        "dtype": dtype.name,
        "seed": seed,
        "val_fraction": val_fraction,
        "documents": len(corpus.refs),
        "invalid_utf8": corpus.invalid_utf8,
        "unigram_entropy": entropy,
        "splits": {split: splits[split] for split in SPLITS},
        "prepare_seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
