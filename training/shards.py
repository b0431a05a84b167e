"""`prepare()`: documents -> tokenized, packed webdataset tar shards + manifest.json.

Layout of a prepared directory:
    tokenizer.json
    train-000000.tar, train-000001.tar, ...   samples {"__key__", "tokens.npy"}
    val-000000.tar, ...
    manifest.json                             written last: its presence marks completion

Each sample is `seq_len + 1` tokens so inputs (`[:-1]`) and shifted labels
(`[1:]`) come from one sample. Documents are joined with the EOT token after
each one and the ragged tail is dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds

from skiptron.training.corpus import Document, gather
from skiptron.training.tokenizer import build_tokenizer, eot_id

FORMAT = "skiptron-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
SAMPLE_FIELD = "tokens.npy"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def split_documents(documents: Sequence[Document], val_fraction: float, seed: int) -> dict[str, list[Document]]:
    """Deterministic train/val split by a seeded hash of each document's name.

    Hashing the name (not the position) keeps a document on the same side when
    other documents are added or removed. At least one document goes to each
    side: if the hash picks none for val, the lowest-hash document is moved.
    """
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to make a train and a val split, got {len(documents)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    def score(doc: Document) -> float:
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


def pack(token_lists: Sequence[Sequence[int]], eot: int, sample_len: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate documents, each followed by EOT, into rows of `sample_len` (tail dropped)."""
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    stream = np.full(int(lengths.sum()), eot, dtype=dtype)
    ends = np.cumsum(lengths) - 1
    for tokens, end in zip(token_lists, ends):
        stream[end - len(tokens) : end] = tokens
    rows = len(stream) // sample_len
    return stream[: rows * sample_len].reshape(rows, sample_len)


def unigram_entropy(samples: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the token unigram distribution: the loss of a model that learned only frequencies."""
    counts = np.bincount(samples.ravel(), minlength=vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def write_shards(out_dir: Path, split: str, samples: np.ndarray, samples_per_shard: int) -> list[dict]:
    """Write `samples` as tar shards of at most `samples_per_shard` samples; returns their manifest entries."""
    shards = []
    for index, start in enumerate(range(0, len(samples), samples_per_shard)):
        chunk = samples[start : start + samples_per_shard]
        name = shard_name(split, index)
        with wds.TarWriter(str(out_dir / name)) as writer:
            for offset, row in enumerate(chunk):
                writer.write({"__key__": f"{split}-{start + offset:09d}", SAMPLE_FIELD: row})
        shards.append({"name": name, "samples": len(chunk), "tokens": int(chunk.size)})
    return shards


def _clear_previous(out_dir: Path) -> None:
    """Remove the old manifest first (so a crash leaves no 'complete' marker), then old shards."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out_dir.glob(f"{split}-*.tar"):
            old.unlink()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write via a temp file + rename so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class _SplitData:
    documents: list[Document]
    samples: np.ndarray


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
) -> dict:
    """Tokenize and shard `inputs` (default: the embedded stdlib corpus) into `out_dir`; returns the manifest.

    `tokenizer` is "bytes", "bpe" (trained on the train split only, so val stays
    unseen) or a tokenizer.json path (then `vocab_size` comes from that file).
    Train documents are packed in a seeded random order so that shards mix
    sources instead of holding one package each.
    """
    if seq_len < 1 or samples_per_shard < 1:
        raise ValueError(f"seq_len and samples_per_shard must be >= 1, got {seq_len} and {samples_per_shard}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    corpus = gather(inputs, text_field=text_field)
    docs = split_documents(corpus.documents, val_fraction, seed)
    order = np.random.default_rng(seed).permutation(len(docs["train"]))
    docs["train"] = [docs["train"][i] for i in order]

    tok = build_tokenizer(tokenizer, lambda: (d.text for d in docs["train"]), vocab_size)
    vocab = tok.get_vocab_size()
    eot, dtype, sample_len = eot_id(tok), token_dtype(vocab), seq_len + 1
    data = {}
    for split in SPLITS:
        encodings = tok.encode_batch_fast([d.text for d in docs[split]], add_special_tokens=False)
        samples = pack([e.ids for e in encodings], eot, sample_len, dtype)
        if len(samples) == 0:
            raise ValueError(
                f"{split} split of {corpus.source} has fewer than seq_len+1={sample_len} tokens "
                f"({len(docs[split])} documents); use more input, a smaller --seq-len or a larger --val-fraction"
            )
        data[split] = _SplitData(docs[split], samples)

    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)
    tok.save(str(out_dir / TOKENIZER_FILE))
    splits = {}
    for split, d in data.items():
        shards = write_shards(out_dir, split, d.samples, samples_per_shard)
        splits[split] = {
            "documents": len(d.documents),
            "samples": len(d.samples),
            "tokens": int(d.samples.size),
            "shards": shards,
        }
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
        "documents": len(corpus.documents),
        "invalid_utf8": corpus.invalid_utf8,
        "unigram_entropy": unigram_entropy(data["train"].samples, vocab),
        "splits": splits,
        "prepare_seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
