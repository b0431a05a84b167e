"""`skiptron-data`: prepare token shards (default: the embedded stdlib corpus) and inspect them."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from skiptron.training import verbosity
from skiptron.training.loader import SampleStream, read_manifest
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
            f"{split:<15} {info['documents']} documents, {info['samples']} samples, "
            f"{info['tokens']} tokens, {len(info['shards'])} shards"
        )
    print(f"unigram entropy {manifest['unigram_entropy']:.4f} nats/token (train)")


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
    )
    _print_summary(manifest, Path(args.out))
    print(f"time            {time.perf_counter() - started:.1f} s")


def _inspect(args: argparse.Namespace) -> None:
    data_dir = Path(args.dir)
    manifest = read_manifest(data_dir)
    _print_summary(manifest, data_dir)
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"])
    stream = SampleStream(data_dir, args.split, seed=manifest["seed"], shuffle=False)
    first = next(stream.take(iter([0])))
    print(f"\nfirst {args.split} sample ({len(first)} tokens), decoded:")
    print(decode(tokenizer, first))


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
    p.set_defaults(func=_prepare)
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
