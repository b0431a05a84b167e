"""Data pipeline tests: tokenizers, corpus gathering, prepare(), the TokenLoader contract, the CLI."""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from skiptron.tools.data import main
from skiptron.training.corpus import gather, stdlib_files, stdlib_root
from skiptron.training.loader import TokenLoader, num_samples, read_manifest
from skiptron.training.samples import DataIntegrityError, describe_error, read_shard
from skiptron.training.shards import SAMPLE_FIELD, prepare, unigram_entropy
from skiptron.training.tokenizer import EOT, build_tokenizer, decode, eot_id, load_tokenizer

WORDS = "alpha beta gamma delta épsilon zeta η theta 🙂 kappa lambda mu".split()
BAD_BYTES = b"caf\xe9 au lait \xff\xfe and more words here\n"


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words)) + "\n"


def make_corpus(root: Path, documents: int = 40, words: int = 30) -> Path:
    """A small corpus: .txt files in nested dirs, a .jsonl file, one invalid-UTF-8 file and one bad jsonl line."""
    rng = random.Random(0)
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(documents):
        folder = corpus / "sub" if i % 2 else corpus
        (folder / f"doc{i:03d}.txt").write_text(random_text(rng, words), encoding="utf-8")
    lines = [json.dumps({"text": random_text(rng, words)}).encode() for _ in range(5)]
    lines.append(b'{"text": "bad \xff byte"}')
    (corpus / "extra.jsonl").write_bytes(b"\n".join(lines))
    (corpus / "bad.txt").write_bytes(BAD_BYTES)
    (corpus / "empty.txt").write_text("   \n")
    return corpus


def shard_samples(path: Path) -> list[np.ndarray]:
    return [s[SAMPLE_FIELD] for s in read_shard(path)]


def split_samples(data_dir: Path, split: str) -> list[np.ndarray]:
    """All samples of a split in shard/tar order (the unshuffled stream)."""
    entries = read_manifest(data_dir)["splits"][split]["shards"]
    return [s for e in entries for s in shard_samples(data_dir / e["name"])]


def key(row) -> bytes:
    return np.asarray(row, dtype=np.int64).tobytes()


def take(loader: TokenLoader, batches: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(batches)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(out, [corpus_dir], tokenizer="bytes", seq_len=15, val_fraction=0.1, samples_per_shard=7, seed=7)
    return out


@pytest.fixture(scope="module")
def small_bpe(corpus_dir):
    texts = [d.text for d in gather([corpus_dir]).documents]
    return build_tokenizer("bpe", lambda: iter(texts), vocab_size=400)


# ---------------------------------------------------------------- tokenizer


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_bytes_tokenizer_round_trip(text):
    tok = build_tokenizer("bytes")
    assert tok.decode(tok.encode(text).ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_bpe_tokenizer_round_trip(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text).ids) == text


def test_tokenizer_save_load_and_eot(tmp_path, small_bpe):
    text = f"déjà vu 🙂 {EOT} stays text\x00"
    for tok in (build_tokenizer("bytes"), small_bpe):
        path = tmp_path / "tokenizer.json"
        tok.save(str(path))
        loaded = build_tokenizer(str(path))
        assert loaded.encode(text).ids == tok.encode(text).ids
        assert eot_id(loaded) not in loaded.encode(text).ids, "a literal EOT in a document must not become the separator"
        assert decode(loaded, loaded.encode(text).ids) == text
        assert decode(loaded, [eot_id(loaded)]) == EOT
    assert build_tokenizer("bytes").get_vocab_size() == 257
    assert small_bpe.get_vocab_size() == 400


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="nonsense"):
        build_tokenizer("nonsense")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)


# ---------------------------------------------------------------- corpus


def test_stdlib_listing():
    files = stdlib_files()
    rel = [f.relative_to(stdlib_root()).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel and len(rel) > 500
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)


def test_gather_user_inputs(corpus_dir):
    corpus = gather([corpus_dir])
    names = [d.name for d in corpus.documents]
    assert len(names) == 40 + 6 + 1  # txt docs + jsonl lines + bad.txt; empty.txt dropped
    assert "corpus/sub/doc001.txt" in names and "corpus/extra.jsonl:6" in names
    assert corpus.invalid_utf8 == 2
    assert "\ufffd" in next(d.text for d in corpus.documents if d.name == "corpus/bad.txt")
    assert gather([corpus_dir]).documents == corpus.documents


def test_gather_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        gather([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="missing"):
        gather([tmp_path / "missing"])
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1.*'text'"):
        gather([tmp_path / "x.jsonl"])
    assert gather([tmp_path / "x.jsonl"], text_field="body").documents[0].text == "hi"


# ---------------------------------------------------------------- prepare


def test_prepare_manifest_matches_shards(data_dir):
    m = read_manifest(data_dir)
    assert (m["seq_len"], m["sample_len"], m["dtype"], m["eot_id"], m["seed"]) == (15, 16, "uint16", 256, 7)
    assert m["documents"] == 47 and m["invalid_utf8"] == 2
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 47
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["samples"] > 0 and len(info["shards"]) >= 1
        for entry in info["shards"]:
            rows = shard_samples(data_dir / entry["name"])
            assert len(rows) == entry["samples"] and sum(r.size for r in rows) == entry["tokens"]
            assert all(r.shape == (16,) and r.dtype == np.uint16 for r in rows)
        assert info["samples"] == sum(e["samples"] for e in info["shards"]) == num_samples(data_dir, split)
        assert info["tokens"] == 16 * info["samples"]
    train = np.stack(split_samples(data_dir, "train"))
    assert m["unigram_entropy"] == pytest.approx(unigram_entropy(train, m["vocab_size"]))
    assert load_tokenizer(data_dir / m["tokenizer"]).get_vocab_size() == m["vocab_size"]


def test_prepare_packs_documents_with_eot(data_dir, corpus_dir):
    tok = load_tokenizer(data_dir / "tokenizer.json")
    eot = eot_id(tok)
    texts = {d.text for d in gather([corpus_dir]).documents}
    for split in ("train", "val"):
        stream = np.concatenate(split_samples(data_dir, split)).tolist()
        pieces, start = [], 0
        for i, t in enumerate(stream):
            if t == eot:
                pieces.append(stream[start:i])
                start = i + 1
        assert pieces, f"no EOT in the {split} stream"
        assert all(tok.decode(piece) in texts for piece in pieces), "every EOT must end a whole document"


def test_prepare_is_deterministic_and_split_depends_on_seed(tmp_path, corpus_dir, data_dir):
    args = dict(tokenizer="bytes", seq_len=15, val_fraction=0.1, samples_per_shard=7)
    prepare(tmp_path / "a", [corpus_dir], seed=7, **args)
    same = [key(r) for r in split_samples(tmp_path / "a", "val")]
    assert same == [key(r) for r in split_samples(data_dir, "val")]
    prepare(tmp_path / "b", [corpus_dir], seed=8, **args)
    assert [key(r) for r in split_samples(tmp_path / "b", "val")] != same


def test_prepare_errors(tmp_path, corpus_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        prepare(tmp_path / "out", [tmp_path / "empty"], tokenizer="bytes")
    with pytest.raises(ValueError, match="val split"):
        prepare(tmp_path / "out", [corpus_dir], tokenizer="bytes", seq_len=5000)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_bpe_small(tmp_path, corpus_dir):
    m = prepare(tmp_path, [corpus_dir], tokenizer="bpe", vocab_size=300, seq_len=8, val_fraction=0.1)
    assert m["vocab_size"] == 300 and m["splits"]["val"]["samples"] > 0
    assert 0 < m["unigram_entropy"] < np.log(300)


# ---------------------------------------------------------------- loader


def global_stream(data_dir: Path, samples: int, seed: int = 1234, b: int = 3) -> list[bytes]:
    """The global stream as seen by a single rank with no workers."""
    rows = torch.cat(take(TokenLoader(data_dir, "train", b, seed=seed), -(-samples // b)))
    return [key(r) for r in rows[:samples]]


def test_loader_dp2_workers2_epoch_exactly_once_and_matches_dp1(data_dir):
    n = num_samples(data_dir, "train")
    assert len({key(r) for r in split_samples(data_dir, "train")}) == n, "fixture samples must be distinct"
    b, ranks = 2, 2
    k = -(-n // (b * ranks)) + 2
    per_rank = [take(TokenLoader(data_dir, "train", b, dp_rank=r, dp_size=ranks, num_workers=2), k) for r in range(ranks)]
    assert all(batch.shape == (b, 16) and batch.dtype == torch.int64 for batch in per_rank[0])
    interleaved = [key(row) for i in range(k) for r in range(ranks) for row in per_rank[r][i]]
    assert sorted(interleaved[:n]) == sorted(key(r) for r in split_samples(data_dir, "train"))
    assert interleaved == global_stream(data_dir, len(interleaved), b=b)


def test_loader_resume_continues_stream(data_dir):
    n = num_samples(data_dir, "train")
    reference = global_stream(data_dir, 3 * n)
    for start, dp_size, workers in ((5, 1, 0), (n - 3, 2, 2), (2 * n + 1, 3, 0)):
        b = 2
        batches = take(TokenLoader(data_dir, "train", b, dp_rank=0, dp_size=dp_size, num_workers=workers, start_sample=start), 3)
        for k, batch in enumerate(batches):
            first = start + k * dp_size * b
            assert [key(r) for r in batch] == reference[first : first + b], (start, dp_size, k)


def test_loader_seed_determinism_and_epoch_order(data_dir):
    n = num_samples(data_dir, "train")
    stream = global_stream(data_dir, 2 * n, seed=1)
    assert stream == global_stream(data_dir, 2 * n, seed=1)
    assert stream[:n] != global_stream(data_dir, n, seed=2)
    assert sorted(stream[:n]) == sorted(stream[n:]) and stream[:n] != stream[n:]
    plain = take(TokenLoader(data_dir, "train", 1, shuffle=False), n)
    assert [key(b[0]) for b in plain] == [key(r) for r in split_samples(data_dir, "train")]


def damage_shard(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "missing":
        path.unlink()
    elif how == "garbage":  # same size, bytes in the middle overwritten
        path.write_bytes(raw[:1024] + b"\x07" * 4096 + raw[5120:])
    else:  # a readable tar of the same size whose first sample has the wrong dtype
        samples = list(read_shard(path))
        samples[0][SAMPLE_FIELD] = samples[0][SAMPLE_FIELD].astype(np.int64)
        with wds.TarWriter(str(path)) as writer:
            for sample in samples:
                writer.write(sample)


def skipped_identically(copy: Path, data_dir: Path, victim: dict, workers: bool = True) -> None:
    """Every reader (no workers, 2 workers, 2 DP ranks) skips `victim` and agrees on the rest of the stream."""
    survivors = {key(r) for r in split_samples(data_dir, "train")} - {key(r) for r in shard_samples(data_dir / victim["name"])}
    with pytest.warns(UserWarning, match=victim["name"]):
        loader = TokenLoader(copy, "train", 1)
    rows = [key(b[0]) for b in take(loader, len(survivors))]
    assert sorted(rows) == sorted(survivors)
    assert loader.stats["corrupt_shards"] == 1 and victim["name"] in loader.stats["corrupt"]
    assert loader.stats["corrupt"][victim["name"]]  # a reason, not an empty string
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if workers:
            with_workers = TokenLoader(copy, "train", 1, num_workers=2)
            assert [key(b[0]) for b in take(with_workers, len(survivors))] == rows
            assert with_workers.stats["corrupt_shards"] == 1
        ranks = [take(TokenLoader(copy, "train", 1, dp_rank=r, dp_size=2), len(survivors) // 2) for r in range(2)]
    assert [key(ranks[k % 2][k // 2][0]) for k in range(2 * (len(survivors) // 2))] == rows[: 2 * (len(survivors) // 2)]


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_loader_skips_corrupt_shard(tmp_path, data_dir, damage):
    """A shard of the wrong size or missing is known from stat() alone: every reader skips it, the stream agrees."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    victim = read_manifest(copy)["splits"]["train"]["shards"][1]
    damage_shard(copy / victim["name"], damage)
    skipped_identically(copy, data_dir, victim)


@pytest.mark.parametrize("damage", ["garbage", "bad-sample"])
def test_damaged_content_is_an_error_until_quarantined(tmp_path, data_dir, damage, capsys):
    """Same-size damage is seen only by the readers of those bytes, so it cannot be skipped consistently: reading
    it fails naming the shard; `skiptron-data verify --quarantine` then sets it aside and every reader skips it."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    victim = read_manifest(copy)["splits"]["train"]["shards"][1]
    size = (copy / victim["name"]).stat().st_size
    damage_shard(copy / victim["name"], damage)
    assert (copy / victim["name"]).stat().st_size == size
    with pytest.raises(DataIntegrityError, match=victim["name"]):
        take(TokenLoader(copy, "train", 1, shuffle=False), num_samples(copy, "train"))
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"train shard {victim['name']}: " in out and "1 damaged shard" in out
    assert main(["verify", str(copy), "--quarantine"]) == 0
    assert (copy / (victim["name"] + ".corrupt")).is_file()
    skipped_identically(copy, data_dir, victim, workers=False)
    assert main(["verify", str(data_dir)]) == 0 and "intact" in capsys.readouterr().out


def test_decoding_error_has_a_reason(tmp_path, data_dir):
    """webdataset's DecodingError keeps its reason outside args; the message must still say what failed."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    victim = read_manifest(copy)["splits"]["train"]["shards"][0]
    raw = bytearray((copy / victim["name"]).read_bytes())
    at = raw.index(b"\x93NUMPY")
    raw[at : at + 6] = b"XXXXXX"  # the first sample's .npy magic
    (copy / victim["name"]).write_bytes(bytes(raw))
    with pytest.raises(Exception) as info:
        list(read_shard(copy / victim["name"]))
    reason = describe_error(info.value)
    assert type(info.value).__name__ == "DecodingError" and "tokens.npy" in reason and "magic" in reason.lower(), reason


def test_loader_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        TokenLoader(tmp_path, "train", 1)
    with pytest.raises(ValueError, match="split"):
        TokenLoader(data_dir, "test", 1)
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shards = sorted(copy.glob("val-*.tar"))
    for shard in shards:
        shard.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"all \d+ val shards in .*data are corrupt") as info:
        TokenLoader(copy, "val", 1)
    for shard in shards:  # each shard named, with its reason
        assert f"{shard.name}: {shard} has 0 bytes" in str(info.value)


# ---------------------------------------------------------------- CLI


def test_cli_prepare_and_inspect(tmp_path, corpus_dir, capsys):
    out = tmp_path / "out"
    argv = ["prepare", "--out", str(out), "--input", str(corpus_dir), "--tokenizer", "bytes", "--seq-len", "31", "--val-fraction", "0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "documents       47 (2 with invalid UTF-8" in printed and "unigram entropy" in printed
    assert main(["inspect", str(out)]) == 0
    assert "first train sample (32 tokens)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "not a prepared data directory" in capsys.readouterr().err


# ---------------------------------------------------------------- random access, blending, merge, Megatron


def proc_bytes_read() -> int:
    """Bytes this process has read through read()/pread() syscalls (Linux /proc/self/io `rchar`)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, corpus_dir) -> Path:
    """Realistic sample size (256 tokens) and many shards, for IO accounting."""
    out = tmp_path_factory.mktemp("wide")
    prepare(out, [corpus_dir], tokenizer="bytes", seq_len=63, val_fraction=0.1, samples_per_shard=4, seed=3)
    return out


def data_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("train-*"))


def test_one_of_four_ranks_reads_a_quarter(wide_dir):
    """Over an epoch, each of 4 DP ranks reads (measured by the kernel's read counter) <= 0.35 of the train data,
    and the 4 ranks together read every sample once."""
    n = num_samples(wide_dir, "train")
    b, ranks = 2, 4
    k = n // (b * ranks)
    seen = []
    for rank in range(ranks):
        loader = TokenLoader(wide_dir, "train", b, dp_rank=rank, dp_size=ranks)
        before = proc_bytes_read()
        batches = take(loader, k)
        fraction = (proc_bytes_read() - before) / data_bytes(wide_dir)
        assert 0.05 < fraction <= 0.35, (rank, fraction)
        seen += [key(row) for batch in batches for row in batch]
    assert len(seen) == len(set(seen)) == k * b * ranks


def test_resume_at_90_percent_opens_no_earlier_shard(wide_dir):
    """Resume late in an epoch: the only files opened are the shards (and their indexes) that hold the samples
    read; no shard that comes earlier in this epoch's order is touched."""
    import sys

    from skiptron.training.loader import SampleStream

    n = num_samples(wide_dir, "train")
    start = int(0.9 * n)
    stream = SampleStream(wide_dir, "train", seed=1234, shuffle=True)
    order = stream.shard_order(0)
    ends = np.cumsum([stream.shards[i]["samples"] for i in order])
    earlier = {stream.shards[i]["name"][: -len(".tar")] for i, end in zip(order, ends) if end <= start}
    assert len(earlier) > 0.8 * len(order)
    opened: list[str] = []
    recording = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if recording[0] and event == "open" else None)
    try:
        loader = TokenLoader(wide_dir, "train", 2, start_sample=start)
        opened.clear()
        batches = take(loader, 3)
    finally:
        recording[0] = False
    touched = {Path(p).name.split(".")[0] for p in opened if Path(p).parent == wide_dir and Path(p).name.startswith("train-")}
    needed = {stream.shards[stream.locate(p)[0]]["name"][: -len(".tar")] for p in range(start, start + 6)}
    assert touched == needed and not touched & earlier, (touched, needed)
    assert [key(r) for batch in batches for r in batch] == global_stream(wide_dir, start + 6, b=2)[start:]


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    """A second source with the same (bytes) tokenizer and seq_len as data_dir, different text."""
    root = tmp_path_factory.mktemp("other")
    (root / "in").mkdir()
    rng = random.Random(5)
    for i in range(30):
        (root / "in" / f"o{i}.txt").write_text("OTHER " + random_text(rng, 40))
    prepare(root / "out", [root / "in"], tokenizer="bytes", seq_len=15, val_fraction=0.1, samples_per_shard=5, seed=2)
    return root / "out"


def test_blend_shares_and_resume_under_another_dp(data_dir, other_dir):
    from skiptron.training.blend import Source

    blend = [Source("a", 0.7, str(data_dir)), Source("b", 0.3, str(other_dir))]
    from_a = {key(r) for r in split_samples(data_dir, "train")}
    from_b = {key(r) for r in split_samples(other_dir, "train")}
    assert not from_a & from_b
    loader = TokenLoader(blend, "train", 4, seed=9)
    rows = [key(r) for batch in take(loader, 500) for r in batch]
    share_a = sum(r in from_a for r in rows) / len(rows)
    assert sum(r in from_b for r in rows) == len(rows) - sum(r in from_a for r in rows)
    assert abs(share_a - 0.7) < 0.01, share_a
    assert loader.consumed_by_source(2000) == {"a": 1400, "b": 600}
    # each source's samples come in that source's own stream order
    alone = [key(r) for batch in take(TokenLoader(data_dir, "train", 1, seed=9), 1400) for r in batch]
    assert [r for r in rows if r in from_a] == alone
    # resume at sample 1001 under DP=3 (2 workers): the same mixture stream continues
    start, b = 1001, 2
    ranks = [take(TokenLoader(blend, "train", b, dp_rank=r, dp_size=3, num_workers=2 if r == 0 else 0, seed=9,
                              start_sample=start), 20) for r in range(3)]
    resumed = [key(row) for k in range(20) for r in range(3) for row in ranks[r][k]]
    assert resumed == rows[start : start + len(resumed)]


def test_blend_refuses_another_tokenizer(tmp_path, data_dir, corpus_dir):
    from skiptron.training.blend import Source
    from skiptron.training.config import ConfigError, load_config
    from skiptron.training.trainer import data_vocab_and_seq

    bpe = tmp_path / "bpe"
    prepare(bpe, [corpus_dir], tokenizer="bpe", vocab_size=300, seq_len=15, val_fraction=0.1)
    with pytest.raises(ValueError, match=f"{data_dir}.*{bpe}.*different tokenizers"):
        TokenLoader([Source("a", 0.5, str(data_dir)), Source("bpe", 0.5, str(bpe))], "train", 1)
    cfg = load_config(None, [f"data.blend=[[0.5, {data_dir}], [0.5, {bpe}]]", "model.seq_len=15"])
    with pytest.raises(ConfigError, match=f"data.blend: .*{data_dir}.*{bpe}"):
        data_vocab_and_seq(cfg)
    flat = load_config(None, [f"data.blend=[2, {data_dir}, 1, {bpe}]"]).data.sources()
    assert [(s.name, round(s.weight, 4)) for s in flat] == [(data_dir.name, 0.6667), ("bpe", 0.3333)]
    for bad, msg in ((f"[[0.5, {data_dir}], [0.5, {data_dir}]]", "distinct"), ("[0.5]", "alternates"),
                     (f"[[-1, {data_dir}]]", "> 0")):
        with pytest.raises(ConfigError, match=f"data.blend: .*{msg}"):
            load_config(None, [f"data.blend={bad}"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, [f"data.blend=[[1, {data_dir}]]", f"data.path={data_dir}"])
    broken = tmp_path / "broken"  # every val shard unusable: refused before training starts, each shard named
    shutil.copytree(data_dir, broken)
    for shard in broken.glob("val-*.tar"):
        shard.unlink()
    with pytest.raises(ConfigError, match=rf"data.path: all \d+ val shards in {broken} .*val-000000.tar: missing file"):
        data_vocab_and_seq(load_config(None, [f"data.path={broken}", "model.seq_len=15"]))


def test_prepare_workers_and_merge(tmp_path, corpus_dir, data_dir):
    """Several processes over disjoint parts give one directory of the same documents; merge joins directories;
    both read back through the loader."""
    args = dict(tokenizer="bytes", seq_len=15, val_fraction=0.1, samples_per_shard=7, seed=7)
    calls = []
    m = prepare(tmp_path / "par", [corpus_dir], workers=2, progress=lambda *a: calls.append(a), **args)
    one = read_manifest(data_dir)
    assert m["splits"]["train"]["documents"] == one["splits"]["train"]["documents"]
    assert abs(m["splits"]["train"]["samples"] - one["splits"]["train"]["samples"]) <= 1  # one more ragged tail
    assert [e["name"] for e in m["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(len(m["splits"]["train"]["shards"]))]
    train_docs = one["splits"]["train"]["documents"]
    assert calls[0][:3] == ("val", 0, one["splits"]["val"]["documents"]) and calls[-1][:3] == ("train", train_docs, train_docs)
    merged = tmp_path / "merged"
    mm = main(["merge", "--out", str(merged), str(data_dir), str(tmp_path / "par")])
    assert mm == 0
    got = read_manifest(merged)
    assert got["splits"]["train"]["samples"] == one["splits"]["train"]["samples"] + m["splits"]["train"]["samples"]
    rows = [key(b[0]) for b in take(TokenLoader(merged, "train", 1, shuffle=False), got["splits"]["train"]["samples"])]
    assert rows == [key(r) for r in split_samples(data_dir, "train") + split_samples(tmp_path / "par", "train")]
    both = np.concatenate([np.stack(split_samples(d, "train")) for d in (data_dir, tmp_path / "par")])
    assert got["unigram_entropy"] == pytest.approx(unigram_entropy(both, got["vocab_size"]))


def write_megatron(prefix: Path, documents: list[list[int]], dtype=np.uint16) -> None:
    """A small writer of Megatron-LM's .bin/.idx (megatron-core indexed_dataset layout, see training/megatron_data.py)."""
    import struct

    codes = {np.uint8: 1, np.int32: 4, np.uint16: 8}
    lengths = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            f.write(np.asarray(doc, dtype=dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", codes[dtype]))
        f.write(struct.pack("<Q", len(documents)) + struct.pack("<Q", len(documents) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(documents) + 1, dtype=np.int64).tobytes())


def megatron_documents(corpus_dir: Path, eot: int) -> list[list[int]]:
    tok = build_tokenizer("bytes")
    return [tok.encode(d.text).ids + [eot] for d in gather([corpus_dir]).documents]


def test_megatron_import_reads_the_bin_rows(tmp_path, corpus_dir, data_dir):
    """Our writer follows the format (megatron-core's own reader agrees); the imported directory's stream is the
    .bin cut into rows of seq_len + 1, read at random, and blends with a prepared directory of the same tokenizer."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from skiptron.training.blend import Source

    docs = megatron_documents(corpus_dir, eot=256)
    write_megatron(tmp_path / "corpus_text_document", docs)
    megatron = IndexedDataset(str(tmp_path / "corpus_text_document"))
    assert len(megatron) == len(docs) and list(megatron[3]) == docs[3]
    out = tmp_path / "imported"
    assert main(["import-megatron", "--prefix", str(tmp_path / "corpus_text_document"), "--out", str(out),
                 "--tokenizer", str(data_dir / "tokenizer.json"), "--seq-len", "15", "--samples-per-shard", "9"]) == 0
    m = read_manifest(out)
    flat = np.concatenate([np.asarray(d) for d in docs])
    rows = flat[: len(flat) // 16 * 16].reshape(-1, 16)
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == len(rows)
    n = m["splits"]["train"]["samples"]
    plain = [key(b[0]) for b in take(TokenLoader(out, "train", 1, shuffle=False), n)]
    assert plain == [key(r) for r in rows[:n]]
    shuffled = [key(b[0]) for b in take(TokenLoader(out, "train", 1), n)]
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    mixed = TokenLoader([Source("mine", 0.5, str(data_dir)), Source("mega", 0.5, str(out))], "train", 2)
    assert take(mixed, 3)[0].shape == (2, 16)
    with pytest.raises(ValueError, match="not a Megatron .idx"):
        (tmp_path / "bad.idx").write_bytes(b"nonsense" * 8)
        (tmp_path / "bad.bin").write_bytes(b"")
        from skiptron.training.megatron_data import import_megatron

        import_megatron(tmp_path / "bad", tmp_path / "x", data_dir / "tokenizer.json", 15)
