"""`skiptron-bench-data`: the data path at scale, measured in one process.

For the embedded corpus (a prepared directory, `--data`) and a synthetic corpus of `--synthetic-shards` random
token shards written by the same shard writer as `prepare`:
- time to the first batch when resuming at 0, 25, 50 and 90% of an epoch (loader built + first micro-batch, median
  of `--repeats`; files are in the page cache after the first repeat), and its ratio to position 0;
- bytes read per rank over one epoch for DP = 1, 2, 4, 8 (every rank simulated in turn; the readers' own byte
  counters, index files included), as a fraction of the split's bytes on disk;
- loader throughput (samples/s, one rank, no workers) against the samples/s a `tiny` train step consumes in this
  process (random tokens, the preset's micro-batch and accumulation).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from skiptron.tools.results import write_json
from skiptron.training import verbosity
from skiptron.training.loader import BlendedStream, TokenLoader, _RankBatches, as_sources, num_samples, read_manifest
from skiptron.training.shards import (FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, TOKENIZER_FILE, UNIGRAM_FILE,
                                      token_dtype, write_json_atomic)
from skiptron.training.tokenizer import build_tokenizer, eot_id

POSITIONS = (0.0, 0.25, 0.5, 0.9)


def synthetic_corpus(out: Path, shards: int, per_shard: int, seq_len: int, seed: int = 0) -> Path:
    """Random documents packed by `ShardWriter` (the writer `prepare` uses) into `shards` indexed train shards."""
    tok = build_tokenizer("bytes")
    vocab, eot = tok.get_vocab_size(), eot_id(tok)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", shards), ("val", 1)):
        writer = ShardWriter(out, split, seq_len + 1, per_shard, eot, token_dtype(vocab), vocab)
        need = count * per_shard * (seq_len + 1)
        written = 0
        while written < need + 2 * seq_len:
            doc = rng.integers(0, 256, int(rng.integers(50, 2000)))
            writer.add(doc)
            written += len(doc) + 1
        entries = writer.close()[:count]
        splits[split] = {"documents": None, "samples": sum(e["samples"] for e in entries),
                         "tokens": sum(e["tokens"] for e in entries), "shards": entries}
        if split == "train":
            np.save(out / UNIGRAM_FILE, writer.counts)
    tok.save(str(out / TOKENIZER_FILE))
    write_json_atomic(out / MANIFEST, {
        "format": FORMAT, "version": FORMAT_VERSION, "source": "synthetic", "seq_len": seq_len,
        "sample_len": seq_len + 1, "vocab_size": vocab, "eot_id": eot, "tokenizer": TOKENIZER_FILE,
        "tokenizer_kind": "bytes", "dtype": token_dtype(vocab).name, "seed": seed, "val_fraction": None,
        "documents": None, "invalid_utf8": 0, "unigram_entropy": None, "splits": splits})
    return out


def first_batch_times(data: Path, micro_batch: int, repeats: int) -> dict:
    n = num_samples(data, "train")
    out = {}
    for fraction in POSITIONS:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            next(iter(TokenLoader(data, "train", micro_batch, start_sample=int(fraction * n))))
            times.append(time.perf_counter() - start)
        out[fraction] = statistics.median(times)
    return out


def bytes_per_rank(data: Path, micro_batch: int, dp: int) -> list[int]:
    """Bytes each of `dp` ranks reads over one epoch of the train split."""
    n = num_samples(data, "train")
    steps = n // (micro_batch * dp)
    read = []
    for rank in range(dp):
        batches = _RankBatches(as_sources(data), "train", micro_batch, rank, dp, 1234, 0, True)
        stream = BlendedStream(*batches.args)
        positions = batches.positions(0, 1)
        for _ in range(steps * micro_batch):
            stream.sample(next(positions))
        read.append(stream.total_bytes_read)
        stream.close()
    return read


def split_bytes(data: Path) -> int:
    manifest = read_manifest(data)
    return sum(e["bytes"] + e.get("index_bytes", 0) for e in manifest["splits"]["train"]["shards"])


def loader_rate(data: Path, micro_batch: int, batches: int) -> float:
    it = iter(TokenLoader(data, "train", micro_batch, start_sample=0))
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * micro_batch / (time.perf_counter() - start)


def tiny_consumption(steps: int) -> dict:
    """Samples/s one `tiny` train step consumes here (random tokens; world of one process)."""
    import torch

    from skiptron.parallel import state
    from skiptron.training.config import load_config
    from skiptron.training.engine import build_engine
    from skiptron.training.model import GPT
    from skiptron.training.trainer import Trainer, seed_everything

    cfg = load_config("tiny", ["logging.tensorboard=false"])
    device, _ = state.init_world(cfg.parallel.backend)
    layout = state.init_model_parallel(1, 1, device)
    ga, mb, vocab = cfg.grad_accum_steps(1), cfg.train.micro_batch_size, 8192
    seed_everything(0)
    engine, precision = build_engine(cfg, GPT(cfg.model, vocab, 1), layout)
    trainer = Trainer(cfg, layout, engine, precision, vocab, manifest={})
    batches = [torch.randint(0, vocab, (mb, cfg.model.seq_len + 1)) for _ in range(ga)]
    trainer.train_step(iter(batches))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(iter(batches))
    step = (time.perf_counter() - start) / steps
    state.shutdown()
    return {"step_s": step, "samples_per_step": mb * ga, "samples_per_s": mb * ga / step}


def bench_corpus(name: str, data: Path, args) -> dict:
    manifest = read_manifest(data)
    n = num_samples(data, "train")
    print(f"\n{name}: {data} | {len(manifest['splits']['train']['shards'])} train shards, {n} samples of "
          f"{manifest['sample_len']} tokens, {split_bytes(data) / 2**20:.1f} MiB")
    ttfb = first_batch_times(data, args.micro_batch, args.repeats)
    for fraction, seconds in ttfb.items():
        print(f"  first batch at {fraction:4.0%} of the epoch: {seconds * 1e3:8.2f} ms  "
              f"({seconds / ttfb[0.0]:.2f} x position 0)")
    total = split_bytes(data)
    reads = {}
    for dp in (1, 2, 4, 8):
        per_rank = bytes_per_rank(data, args.micro_batch, dp)
        reads[dp] = per_rank
        print(f"  DP={dp}: bytes read per rank over an epoch: max {max(per_rank) / 2**20:.2f} MiB = "
              f"{max(per_rank) / total:.3f} of the data (1/DP = {1 / dp:.3f})")
    rate = loader_rate(data, args.micro_batch, args.loader_batches)
    print(f"  loader: {rate:.0f} samples/s (one rank, micro-batch {args.micro_batch}, no workers)")
    return {"data": str(data), "shards": len(manifest["splits"]["train"]["shards"]), "samples": n,
            "bytes": total, "first_batch_s": ttfb, "bytes_per_rank": reads, "loader_samples_per_s": rate}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-data", description=__doc__)
    p.add_argument("--data", default="data/stdlib", help="prepared directory (default: the quickstart's corpus)")
    p.add_argument("--synthetic-shards", type=int, default=256, help="shards of the synthetic corpus (default: %(default)s)")
    p.add_argument("--synthetic-samples-per-shard", type=int, default=256,
                   help="samples per synthetic shard (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per synthetic sample (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=8, help="the tiny preset's micro-batch")
    p.add_argument("--repeats", type=int, default=5, help="repeats of each time-to-first-batch (default: %(default)s)")
    p.add_argument("--loader-batches", type=int, default=200,
                   help="micro-batches read for the loader throughput (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=5, help="timed tiny train steps (default: %(default)s)")
    p.add_argument("--json", help="also write the results to this file")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    results = {}
    if Path(args.data, MANIFEST).is_file():
        results["embedded"] = bench_corpus("embedded corpus", Path(args.data), args)
    else:
        print(f"{args.data} is not a prepared directory: run `skiptron-data prepare --out {args.data} --seq-len "
              f"{args.seq_len}` to include the embedded corpus", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_corpus(Path(tmp), args.synthetic_shards, args.synthetic_samples_per_shard, args.seq_len)
        results["synthetic"] = bench_corpus("synthetic corpus", data, args)
    tiny = tiny_consumption(args.train_steps)
    results["tiny_step"] = tiny
    print(f"\ntiny train step: {tiny['step_s'] * 1e3:.0f} ms for {tiny['samples_per_step']} samples = "
          f"{tiny['samples_per_s']:.1f} samples/s consumed")
    for name, r in results.items():
        if name != "tiny_step":
            print(f"  {name} loader / tiny consumption: {r['loader_samples_per_s'] / tiny['samples_per_s']:.0f} x")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
