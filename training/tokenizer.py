"""Byte-level tokenizers built on Hugging Face `tokenizers`.

Both kinds (`bytes` and `bpe`) are the same `tokenizers.Tokenizer` type: a
byte-level BPE (the `bytes` kind simply has no merges), so either one saves
as `tokenizer.json`, loads with `load_tokenizer`, and round-trips arbitrary
unicode text exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
KINDS = ("bytes", "bpe")


def _byte_level(model: models.Model) -> Tokenizer:
    """Wrap a BPE model with byte-level pre-tokenizer/decoder and the EOT special token."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOT])
    _treat_specials_as_text(tokenizer)
    return tokenizer


def _treat_specials_as_text(tokenizer: Tokenizer) -> None:
    """A literal "<|endoftext|>" inside a document must stay text, not become a separator."""
    tokenizer.encode_special_tokens = True


def _bytes_tokenizer() -> Tokenizer:
    """256 byte symbols (ids 0..255) + EOT (id 256); nothing to train."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    return _byte_level(models.BPE(vocab=vocab, merges=[]))


def _train_bpe(texts: Callable[[], Iterable[str]], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `texts()`; the byte alphabet is always included."""
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < minimum:
        raise ValueError(f"bpe vocab_size must be at least {minimum} (bytes + {EOT}), got {vocab_size}")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    return tokenizer


def build_tokenizer(kind: str, texts: Callable[[], Iterable[str]] | None = None, vocab_size: int = 8192) -> Tokenizer:
    """Make a tokenizer: kind is "bytes", "bpe" (trained on `texts()`), or a path to a tokenizer.json.

    `texts` is a factory (called once) rather than an iterator so callers can
    hand over a cheap generator over documents already in memory.
    """
    if kind == "bytes":
        return _bytes_tokenizer()
    if kind == "bpe":
        if texts is None:
            raise ValueError("tokenizer kind 'bpe' needs texts to train on")
        return _train_bpe(texts, vocab_size)
    if Path(kind).is_file():
        return load_tokenizer(kind)
    raise ValueError(f"tokenizer must be one of {KINDS} or an existing tokenizer.json file, got {kind!r}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a saved tokenizer.json; it must define the EOT special token."""
    path = Path(path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"cannot load tokenizer file {path}: {exc}") from exc
    if tokenizer.token_to_id(EOT) is None:
        raise ValueError(f"tokenizer file {path} has no {EOT} token")
    _treat_specials_as_text(tokenizer)
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    """Id of the end-of-text token that separates documents."""
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    return token_id


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Decode ids to text, keeping EOT visible (useful when inspecting packed samples)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
