"""Gathering input documents: the embedded stdlib corpus or user .txt/.jsonl files.

Everything is returned in a deterministic order (sorted relative paths, then
line order) so a given input always yields the same documents, which the
seeded train/val split and packing rely on.
"""
from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One document; `name` is its stable identity (used for the seeded split)."""

    name: str
    text: str


@dataclass
class Corpus:
    """Documents plus how many of them had invalid UTF-8 (replaced by U+FFFD)."""

    source: str
    documents: list[Document] = field(default_factory=list)
    invalid_utf8: int = 0

    def decode(self, raw: bytes) -> str:
        """Decode UTF-8 leniently (U+FFFD for bad bytes), counting inputs that were invalid."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.invalid_utf8 += 1
            return raw.decode("utf-8", errors="replace")

    def add(self, name: str, raw: bytes) -> None:
        """Add one document from raw bytes; empty (whitespace-only) documents are dropped."""
        text = self.decode(raw)
        if text.strip():
            self.documents.append(Document(name, text))


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """All stdlib .py files outside site-packages/dist-packages, sorted by relative path."""
    root = stdlib_root() if root is None else root
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus() -> Corpus:
    """The embedded default corpus: stdlib sources plus the pydoc topic prose."""
    from pydoc_data.topics import topics

    root = stdlib_root()
    corpus = Corpus(source=f"stdlib:{root}")
    for path in stdlib_files(root):
        corpus.add(path.relative_to(root).as_posix(), path.read_bytes())
    prose = "\n\n".join(topics[key] for key in sorted(topics))
    corpus.add("pydoc_data/topics", prose.encode("utf-8"))
    return corpus


def _add_jsonl(corpus: Corpus, path: Path, name: str, text_field: str) -> None:
    """One document per non-blank line, taken from field `text_field`."""
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(corpus.decode(raw))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON: {exc}") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{where}: no field {text_field!r} in record")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        # JSON escapes can encode lone surrogates ("\ud800"); surrogatepass turns them into
        # invalid UTF-8 so they are replaced and counted like any other bad input.
        corpus.add(f"{name}:{lineno}", text.encode("utf-8", errors="surrogatepass"))


def _add_file(corpus: Corpus, path: Path, name: str, text_field: str) -> None:
    """Dispatch on suffix; other suffixes are an error so typos are not silently ignored."""
    if path.suffix == ".txt":
        corpus.add(name, path.read_bytes())
    elif path.suffix == ".jsonl":
        _add_jsonl(corpus, path, name, text_field)
    else:
        raise ValueError(f"unsupported input file {path}: expected one of {SUFFIXES}")


def gather(inputs: Sequence[str | Path] | None = None, text_field: str = "text") -> Corpus:
    """Documents from `inputs` (files or directories), or the stdlib corpus when None/empty.

    Raises ValueError naming the inputs if nothing non-empty was found.
    """
    if not inputs:
        corpus = stdlib_corpus()
    else:
        corpus = Corpus(source=", ".join(str(p) for p in inputs))
        for entry in map(Path, inputs):
            for path, name in _expand(entry):
                _add_file(corpus, path, name, text_field)
    if not corpus.documents:
        raise ValueError(f"no non-empty documents found in input: {corpus.source}")
    return corpus


def _expand(entry: Path) -> Iterable[tuple[Path, str]]:
    """(file, document name) pairs for a file or a directory (recursive, sorted)."""
    if entry.is_file():
        return [(entry, entry.name)]
    if entry.is_dir():
        files = [p for p in entry.rglob("*") if p.is_file() and p.suffix in SUFFIXES]
        files.sort(key=lambda p: p.relative_to(entry).as_posix())
        return [(p, f"{entry.name}/{p.relative_to(entry).as_posix()}") for p in files]
    raise FileNotFoundError(f"input not found: {entry}")
