"""`skiptron-data`: prepare token shards (default: the embedded stdlib corpus), inspect, verify, merge them, and
import Megatron-LM .bin/.idx datasets."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from skiptron.training import verbosity
from skiptron.training.loader import SampleStream, read_manifest
from skiptron.training.megatron_data import import_megatron
from skiptron.training.merge import merge
from skiptron.training.samples import shard_path, verify_shard
from skiptron.training.shards import SPLITS, prepare
from skiptron.training.tokenizer import decode, load_tokenizer


def _print_summary(manifest: dict, data_dir: Path) -> None:
    print(f"data dir        {data_dir}")
    print(f"source          {manifest['source']}")
    print(
        f"tokenizer       {manifest['tokenizer']} ({manifest['tokenizer_kind']}, vocab {manifest['vocab_size']}, "
        f"eot {manifest['eot_id']}, {manifest['dtype']})"
    )
    print(f"seq_len         {manifest['seq_len']} (+1 for the shifted labels)")
    print(f"documents       {manifest['documents']} ({manifest['invalid_utf8']} with invalid UTF-8, replaced)")
    for split in SPLITS:
        info = manifest["splits"][split]
        print(
            f"{split:<15} {info['documents'] if info['documents'] is not None else 'unknown'} documents, {info['samples']} samples, "
            f"{info['tokens']} tokens, {len(info['shards'])} shards"
        )
    print(f"unigram entropy {manifest['unigram_entropy']:.4f} nats/token (train)")


class _PrepareProgress:
    """Documents and tokens per second while `prepare` tokenizes a split: a rich progress bar on a terminal,
    otherwise a line on stderr every `every` seconds (rates over the split so far)."""

    def __init__(self, every: float = 2.0):
        self.every, self.split, self.bar = every, None, None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("documents | {task.fields[rates]}"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)

    def __call__(self, split: str, documents: int, total: int, tokens: int) -> None:
        now = time.perf_counter()
        if split != self.split:
            self.split, self.started, self.last = split, now, now
            if self.bar:
                self.bar.start()
                self.task = self.bar.add_task(split, total=total, rates="")
            return
        elapsed = max(now - self.started, 1e-9)
        rates = f"{documents / elapsed:.0f} documents/s, {tokens / elapsed / 1e6:.2f}M tokens/s"
        if self.bar:
            self.bar.update(self.task, completed=documents, rates=rates)
            if documents == total:
                self.bar.stop()
        elif now - self.last >= self.every or documents == total:
            self.last = now
            print(f"  {split}: {documents}/{total} documents, {tokens / 1e6:.2f}M tokens | {rates}",
                  file=sys.stderr, flush=True)


def _prepare(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    manifest = prepare(
        args.out,
        inputs=args.input,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        text_field=args.text_field,
        workers=args.workers,
        progress=_PrepareProgress(),
    )
    _print_summary(manifest, Path(args.out))
    print(f"time            {time.perf_counter() - started:.1f} s")


def _inspect(args: argparse.Namespace) -> None:
    data_dir = Path(args.dir)
    manifest = read_manifest(data_dir)
    _print_summary(manifest, data_dir)
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"])
    stream = SampleStream(data_dir, args.split, seed=0, shuffle=False)
    first = stream.sample(0)
    print(f"\nfirst {args.split} sample ({len(first)} tokens), decoded:")
    print(decode(tokenizer, first))


def _verify(args: argparse.Namespace) -> None:
    """Read every shard whole; with --quarantine rename damaged ones so every reader skips them alike."""
    data_dir = Path(args.dir)
    manifest = read_manifest(data_dir)
    shape, dtype = (manifest["sample_len"],), np.dtype(manifest["dtype"])
    bad = 0
    for split in SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            problem = verify_shard(data_dir, entry, shape, dtype)
            if problem is None:
                continue
            bad += 1
            print(f"{split} shard {entry['name']}: {problem}")
            path = shard_path(data_dir, entry)
            if args.quarantine and path.is_file() and entry.get("kind") != "bin":
                path.rename(path.with_name(path.name + ".corrupt"))
                print(f"  moved to {path.name}.corrupt: training skips it from now on")
    print(f"{bad} damaged shard(s) in {data_dir}" if bad else f"all shards of {data_dir} are intact")
    if bad and not args.quarantine:
        raise RuntimeError(f"{bad} damaged shard(s); rerun with --quarantine to set them aside")


def _merge(args: argparse.Namespace) -> None:
    manifest = merge(args.out, args.dirs)
    _print_summary(manifest, Path(args.out))


def _import_megatron(args: argparse.Namespace) -> None:
    manifest = import_megatron(args.prefix, args.out, args.tokenizer, args.seq_len, val_fraction=args.val_fraction,
                               samples_per_shard=args.samples_per_shard)
    _print_summary(manifest, Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skiptron-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize documents into webdataset shards + manifest.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input", action="append", help=".txt/.jsonl file or directory (repeatable); default: the Python stdlib")
    p.add_argument("--tokenizer", default="bpe", help="bytes, bpe, or a path to a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192, help="bpe vocabulary size")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (+1 for the labels; default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=1024, help="samples per tar shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/val split and the packing order (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    p.add_argument("--workers", type=int, default=1, help="processes that tokenize disjoint parts of the input")
    p.set_defaults(func=_prepare)
    verbosity.add_argument(p)

    p = sub.add_parser("merge", help="join prepared directories of the same tokenizer and seq_len into one")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("dirs", nargs="+", help="prepared directories, in order")
    p.set_defaults(func=_merge)
    verbosity.add_argument(p)

    p = sub.add_parser("import-megatron", help="use a Megatron-LM .bin/.idx token dataset in place as a data dir")
    p.add_argument("--prefix", required=True, help="dataset path without .bin/.idx")
    p.add_argument("--out", required=True, help="directory for manifest.json and tokenizer.json")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json the dataset was tokenized with")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sample the rows are cut into (+1 for the labels)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="the last rows of the token stream")
    p.add_argument("--samples-per-shard", type=int, default=1024, help="rows per virtual shard (shuffle unit)")
    p.set_defaults(func=_import_megatron)
    verbosity.add_argument(p)

    p = sub.add_parser("verify", help="read every shard whole and report damage")
    p.add_argument("dir", help="a prepared data directory")
    p.add_argument("--quarantine", action="store_true", help="rename damaged shards to *.corrupt")
    p.set_defaults(func=_verify)
    verbosity.add_argument(p)

    p = sub.add_parser("inspect", help="print a prepared directory's manifest summary and first sample")
    p.add_argument("dir", help="a prepared data directory")
    p.add_argument("--split", default="train", choices=SPLITS, help="split whose first sample is shown")
    p.set_defaults(func=_inspect)
    verbosity.add_argument(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"skiptron-data: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
