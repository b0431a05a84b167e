"""Megatron-LM `.bin/.idx` token datasets as a data source, read through the same random-access path.

The `.idx` layout (megatron-core 0.16 `indexed_dataset._IndexWriter`, little-endian): the magic
`MMIDIDX\\x00\\x00` (9 bytes), version u64 (= 1), dtype code u8 (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
6 float64, 7 float32, 8 uint16), sequence count u64, document count u64, then int32 sequence lengths (tokens),
int64 sequence byte pointers into the `.bin`, int64 document indices (optionally int8 modes, multimodal only).
The `.bin` holds the sequences' tokens back to back.

`import_megatron` writes a prepared directory that points at the `.bin` in place (no copy): the token stream is
cut into rows of `seq_len + 1` (ragged tail dropped, as `prepare` does; Megatron's preprocessing already put the
EOD token after each document if it was run with `--append-eod`), the last `val_fraction` of the rows become
the `val` split, and the rows are grouped into virtual shards of `samples_per_shard` rows so shuffling and
resume work exactly as for tar shards.
"""
from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import numpy as np

from skiptron.training.samples import sha256_file
from skiptron.training.shards import (FORMAT, FORMAT_VERSION, MANIFEST, TOKENIZER_FILE, UNIGRAM_FILE,
                                      entropy_of_counts, write_json_atomic)
from skiptron.training.tokenizer import eot_id, load_tokenizer

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_index(idx_path: Path) -> dict:
    """Header and arrays of a Megatron `.idx`; ValueError naming the file if it is not one."""
    raw = idx_path.read_bytes()
    head = 9 + 8 + 1 + 8 + 8
    if len(raw) < head or raw[:9] != INDEX_HEADER:
        raise ValueError(f"{idx_path} is not a Megatron .idx file (no {INDEX_HEADER!r} header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[9:head])
    if version != 1:
        raise ValueError(f"{idx_path}: index version {version}, this code reads 1")
    if code not in DTYPES or not np.issubdtype(DTYPES[code], np.integer):
        raise ValueError(f"{idx_path}: dtype code {code} is not an integer token type")
    need = head + sequences * (4 + 8) + documents * 8
    if len(raw) < need:
        raise ValueError(f"{idx_path}: {len(raw)} bytes, the header promises at least {need}")
    lengths = np.frombuffer(raw, np.int32, sequences, head)
    pointers = np.frombuffer(raw, np.int64, sequences, head + lengths.nbytes)
    doc_index = np.frombuffer(raw, np.int64, documents, head + lengths.nbytes + pointers.nbytes)
    return {"dtype": np.dtype(DTYPES[code]), "lengths": lengths, "pointers": pointers, "documents": doc_index}


def import_megatron(prefix: str | Path, out_dir: str | Path, tokenizer: str | Path, seq_len: int,
                    val_fraction: float = 0.01, samples_per_shard: int = 1024) -> dict:
    """Describe `<prefix>.bin/.idx` as a prepared directory `out_dir` (see the module docstring)."""
    started = time.perf_counter()
    prefix, out_dir = Path(prefix), Path(out_dir)
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: give the Megatron dataset prefix (without .bin/.idx)")
    if not 0.0 < val_fraction < 1.0 or seq_len < 1 or samples_per_shard < 1:
        raise ValueError("need 0 < val_fraction < 1, seq_len >= 1, samples_per_shard >= 1")
    index = read_index(idx_path)
    dtype, lengths, pointers = index["dtype"], index["lengths"].astype(np.int64), index["pointers"]
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize
    if not np.array_equal(pointers, expected):
        raise ValueError(f"{idx_path}: sequences are not stored back to back in {bin_path}; cannot read rows")
    tokens = int(lengths.sum())
    if bin_path.stat().st_size != tokens * dtype.itemsize:
        raise ValueError(f"{bin_path} has {bin_path.stat().st_size} bytes, {idx_path} describes "
                         f"{tokens * dtype.itemsize}")
    tok = load_tokenizer(tokenizer)
    vocab = tok.get_vocab_size()
    sample_len = seq_len + 1
    rows = tokens // sample_len
    val_rows = max(1, round(rows * val_fraction))
    if rows - val_rows < 1:
        raise ValueError(f"{bin_path}: {tokens} tokens make only {rows} rows of seq_len+1={sample_len}")
    data = np.memmap(bin_path, dtype=dtype, mode="r", shape=(rows, sample_len))
    counts = np.zeros(vocab, dtype=np.int64)
    for start in range(0, rows - val_rows, 65536):
        chunk = np.asarray(data[start : min(start + 65536, rows - val_rows)])
        if chunk.min() < 0 or chunk.max() >= vocab:
            raise ValueError(f"{bin_path}: token ids outside the tokenizer's vocabulary of {vocab} (wrong --tokenizer?)")
        counts += np.bincount(chunk.ravel().astype(np.int64), minlength=vocab)
    del data

    def ranges(split: str, first: int, count: int) -> list[dict]:
        return [{"name": f"{prefix.name}.bin#{split}-{i:06d}", "kind": "bin", "file": str(bin_path.resolve()),
                 "first_sample": first + start, "samples": min(samples_per_shard, count - start),
                 "tokens": min(samples_per_shard, count - start) * sample_len, "bytes": bin_path.stat().st_size}
                for i, start in enumerate(range(0, count, samples_per_shard))]

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    shutil.copyfile(tokenizer, out_dir / TOKENIZER_FILE)
    np.save(out_dir / UNIGRAM_FILE, counts)
    documents = max(len(index["documents"]) - 1, 0)
    train_rows = rows - val_rows
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "source": f"megatron:{prefix}",
        "seq_len": seq_len, "sample_len": sample_len, "vocab_size": vocab, "eot_id": eot_id(tok),
        "tokenizer": TOKENIZER_FILE, "tokenizer_kind": "file", "dtype": dtype.name, "seed": None,
        "val_fraction": val_fraction, "documents": documents, "invalid_utf8": 0,
        "unigram_entropy": entropy_of_counts(counts),
        "megatron": {"bin": str(bin_path.resolve()), "idx": str(idx_path.resolve()), "idx_sha256": sha256_file(idx_path),
                     "sequences": len(lengths), "tokens": tokens},
        "splits": {
            "train": {"documents": None, "samples": train_rows, "tokens": train_rows * sample_len,
                      "shards": ranges("train", 0, train_rows)},
            "val": {"documents": None, "samples": val_rows, "tokens": val_rows * sample_len,
                    "shards": ranges("val", train_rows, val_rows)},
        },
        "prepare_seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
