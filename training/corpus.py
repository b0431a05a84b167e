"""Gathering input documents: the embedded stdlib corpus or user .txt/.jsonl files.

`scan` reads the input once and keeps only references (file, byte range) to the
non-empty documents, so `prepare` can split, shuffle and re-read them without
holding the corpus in memory.

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


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """All stdlib .py files outside site-packages/dist-packages, sorted by relative path."""
    root = stdlib_root() if root is None else root
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass(frozen=True)
class DocRef:
    """Where one document lives, so a corpus can be scanned once and read again in any order without holding it.

    `path` and the byte range [offset, offset + length) locate it (a whole .txt file or one .jsonl line); the
    stdlib corpus's generated prose is held in `inline`.
    """

    name: str
    path: Path | None = None
    offset: int = 0
    length: int = 0
    jsonl: bool = False
    inline: str | None = None


@dataclass
class Scan:
    """The non-empty documents of an input, as references, plus how many had invalid UTF-8."""

    source: str
    refs: list[DocRef] = field(default_factory=list)
    invalid_utf8: int = 0


def read_text(ref: DocRef, text_field: str = "text") -> str:
    """The text of a scanned document (decoded leniently, as when it was scanned)."""
    if ref.inline is not None:
        return ref.inline
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        raw = f.read(ref.length)
    text = raw.decode("utf-8", errors="replace")
    if not ref.jsonl:
        return text
    # JSON escapes can encode lone surrogates ("\ud800"); surrogatepass + replace turns them into U+FFFD
    return json.loads(text)[text_field].encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def _jsonl_refs(corpus: Corpus, path: Path, name: str, text_field: str) -> Iterable[DocRef]:
    """One document per non-blank line, taken from field `text_field`; errors name file and line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            raw = line.rstrip(b"\r\n")
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
            encoded = text.encode("utf-8", errors="surrogatepass")
            if corpus.decode(encoded).strip():
                yield DocRef(f"{name}:{lineno}", path, start, len(raw), jsonl=True)


def _text_ref(corpus: Corpus, path: Path, name: str) -> Iterable[DocRef]:
    """A whole file as one document (unless it is blank)."""
    raw = path.read_bytes()
    if corpus.decode(raw).strip():
        yield DocRef(name, path, 0, len(raw))


def _file_refs(corpus: Corpus, path: Path, name: str, text_field: str) -> Iterable[DocRef]:
    """Dispatch on suffix; other suffixes are an error so typos are not silently ignored."""
    if path.suffix == ".txt":
        yield from _text_ref(corpus, path, name)
    elif path.suffix == ".jsonl":
        yield from _jsonl_refs(corpus, path, name, text_field)
    else:
        raise ValueError(f"unsupported input file {path}: expected one of {SUFFIXES}")


def scan(inputs: Sequence[str | Path] | None = None, text_field: str = "text") -> Scan:
    """References to the documents of `inputs` (files or directories), or of the stdlib corpus when None/empty.

    Reads each input once, one file at a time (nothing is kept but the references). Raises ValueError naming
    the inputs if nothing non-empty was found.
    """
    counter = Corpus(source="")
    if not inputs:
        root = stdlib_root()
        found = Scan(source=f"stdlib:{root}")
        for path in stdlib_files(root):
            found.refs.extend(_text_ref(counter, path, path.relative_to(root).as_posix()))
        found.refs.append(DocRef("pydoc_data/topics", inline=_pydoc_prose()))
    else:
        found = Scan(source=", ".join(str(p) for p in inputs))
        for entry in map(Path, inputs):
            for path, name in _expand(entry):
                found.refs.extend(_file_refs(counter, path, name, text_field))
    found.invalid_utf8 = counter.invalid_utf8
    if not found.refs:
        raise ValueError(f"no non-empty documents found in input: {found.source}")
    return found


def _pydoc_prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def gather(inputs: Sequence[str | Path] | None = None, text_field: str = "text") -> Corpus:
    """All documents of `inputs` in memory (small inputs, tests); `scan` + `read_text` stream them instead."""
    found = scan(inputs, text_field)
    corpus = Corpus(found.source, invalid_utf8=found.invalid_utf8)
    corpus.documents = [Document(ref.name, read_text(ref, text_field)) for ref in found.refs]
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
