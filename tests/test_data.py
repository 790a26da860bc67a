"""Tests for palm.data: shards and their cache, packing, mixture sampling, resumable
loading, multi-host slices and the train/validation split."""

import json
import os
import random
import string
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from palm import data, tokenizer


def _text(seed: int, letters: str, n_words: int = 120) -> str:
    """Random words over `letters`, a newline every few words: unique, cheap documents."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(n_words)]
    return "".join(w + ("\n" if i % 9 == 8 else " ") for i, w in enumerate(words))


def _write(directory: Path, docs: list[str], prefix: str = "doc") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = directory / f"{prefix}{i:03d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [_text(i, string.ascii_lowercase + string.ascii_uppercase + "0123456789")
            for i in range(30)]
    return tokenizer.train(iter(docs), 400, tmp_path_factory.mktemp("tok") / "t.model")


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Source "lower" holds only lowercase words, "upper" only uppercase ones, so a row's
    tokens tell which source it came from."""
    root = tmp_path_factory.mktemp("two")
    lower = _write(root / "lower", [_text(i, string.ascii_lowercase) for i in range(12)])
    upper = _write(root / "upper", [_text(100 + i, string.ascii_uppercase) for i in range(12)])
    return {"lower": lower, "upper": upper}


@pytest.fixture(scope="module")
def corpus(tok, two_sources, tmp_path_factory):
    mixture = data.Mixture(two_sources, weights={"lower": 0.25, "upper": 0.75}, val_fraction=0.1)
    return data.build_corpus(mixture, tok, tmp_path_factory.mktemp("cache"))


def _row_source(tok, row) -> str:
    # EOS joins documents in both sources (and its piece "</s>" has letters).
    pieces = {tok.id_to_piece(int(t)) for t in row if t != tok.eos_id}
    has_lower = any(c.islower() for p in pieces for c in p if c.isascii())
    has_upper = any(c.isupper() for p in pieces for c in p if c.isascii())
    assert has_lower != has_upper, "a row mixes sources"
    return "lower" if has_lower else "upper"


def _windows(stream, seq_len, indices):
    n = seq_len + 1
    return [tuple(stream.read(w * n, (w + 1) * n)) for w in indices]


def test_stdlib_corpus():
    paths = data.stdlib_corpus()
    assert len(paths) > 200
    assert paths == sorted(paths) == data.stdlib_corpus()
    assert all(p.endswith(".py") and os.path.isfile(p) for p in paths)
    parts = {part for p in paths for part in Path(p).parts}
    assert not parts & {"test", "tests", "site-packages", "__pycache__"}
    assert data.stdlib_corpus(limit=5) == paths[:5]


@given(docs=st.lists(st.text(alphabet="ab cXY\n\t1😀", max_size=40), min_size=1, max_size=6),
       seq_len=st.integers(1, 12))
def test_packing_puts_every_token_in_one_window_in_order(tok, docs, seq_len):
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(Path(tmp) / "src", docs)
        expected = [t for d in docs if d for t in tok.encode(d) + [tok.eos_id]]
        if not expected:
            with pytest.raises(ValueError, match="no text"):
                data.tokenize_source(paths, tok, Path(tmp) / "cache")
            return
        stream = data.tokenize_source(paths, tok, Path(tmp) / "cache")
        assert list(stream.read(0, len(stream))) == expected
        n_train, n_val = data.split_windows(len(stream), seq_len, 0.2)
        windows = _windows(stream, seq_len, range(n_train + n_val))
        packed = [t for w in windows for t in w]
        # Consecutive windows reproduce the stream; only a tail shorter than a window is left.
        assert packed == expected[:len(packed)]
        assert len(expected) - len(packed) < seq_len + 1


def test_epochs_visit_each_train_window_once(tok, corpus):
    seq_len = 16
    loader = data.Loader(data.Corpus({"lower": corpus.streams["lower"]}, {"lower": 1.0}, 0.1),
                         seq_len=seq_len, batch_size=4, prefetch=0)
    stream = corpus.streams["lower"]
    n_train, _ = data.split_windows(len(stream), seq_len, 0.1)
    rows = [tuple(r) for _ in range(-(-2 * n_train // 4)) for r in next(loader)]
    train = sorted(_windows(stream, seq_len, range(n_train)))
    assert sorted(rows[:n_train]) == train
    assert sorted(rows[n_train:2 * n_train]) == train
    # Each epoch is reshuffled.
    assert rows[:n_train] != rows[n_train:2 * n_train]


def test_shards_are_reused_and_rebuilt(tok, tmp_path, monkeypatch):
    paths = _write(tmp_path / "src", [_text(i, "abc") for i in range(4)])
    encoded = []

    def counting(texts):
        encoded.extend(texts)
        return tokenizer.Tokenizer.encode_batch(tok, texts)

    monkeypatch.setattr(tok, "encode_batch", counting)
    cache = tmp_path / "cache"
    first = data.tokenize_source(paths, tok, cache)
    assert len(encoded) == 4
    assert [Path(s).name for s in data.tokenize_source(paths, tok, cache).shards] == \
           [Path(s).name for s in first.shards]
    assert len(encoded) == 4, "unchanged sources were re-tokenised"

    paths[2].write_text("changed text, longer than before " * 9)
    second = data.tokenize_source(paths, tok, cache)
    assert encoded[4:] == [paths[2].read_text()]
    assert second.shards[:2] == first.shards[:2] and second.shards[2] != first.shards[2]
    assert tok.decode(second.read(0, len(second))) == "".join(p.read_text() for p in paths)

    # A damaged shard is noticed and rebuilt, not read.
    Path(second.shards[0]).write_bytes(b"")
    data.tokenize_source(paths, tok, cache)
    assert encoded[5:] == [paths[0].read_text()]

    index = json.loads((cache / tok.sha256[:16] / "index.json").read_text())
    assert index["tokenizer_sha256"] == tok.sha256
    assert sorted(index["files"]) == sorted(str(p.resolve()) for p in paths)
    # Atomic writes leave no temporary files, and replaced shards are removed.
    assert sorted(p.name for p in (cache / tok.sha256[:16]).iterdir()) == sorted(
        [Path(s).name for s in second.shards] + ["index.json"])


def test_non_utf8_files_are_skipped_with_warning(tok, tmp_path):
    good = _write(tmp_path / "src", [_text(0, "abc")])
    bad = tmp_path / "src" / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.txt"):
        stream = data.tokenize_source(good + [bad], tok, tmp_path / "cache")
    assert len(stream) == len(tok.encode(good[0].read_text())) + 1
    with pytest.warns(UserWarning, match="latin1.txt"), \
            pytest.raises(ValueError, match=r"no text in source \[.*latin1.txt"):
        data.tokenize_source([bad], tok, tmp_path / "cache")


def test_tokenising_shows_progress_only_for_new_files(tok, tmp_path, capsys):
    files = _write(tmp_path / "src", [_text(i, "abc") for i in range(3)])
    data.tokenize_source(files, tok, tmp_path / "cache", progress="mine")
    assert "tokenising mine" in capsys.readouterr().err
    data.tokenize_source(files, tok, tmp_path / "cache", progress="mine")  # all cached
    assert "tokenising" not in capsys.readouterr().err


def test_mixture_weights_hold(tok, corpus):
    loader = data.Loader(corpus, seq_len=8, batch_size=32, seed=3, prefetch=0)
    counts = {"lower": 0, "upper": 0}
    for step in range(40):
        expected = loader.sources(step)
        got = [_row_source(tok, row) for row in next(loader)]
        assert got == expected
        for name in got:
            counts[name] += 1
    n = sum(counts.values())
    # Binomial(n, 0.25): five standard deviations.
    assert abs(counts["lower"] - 0.25 * n) < 5 * np.sqrt(n * 0.25 * 0.75)


@given(before=st.integers(0, 5), skip=st.integers(0, 30), prefetch=st.sampled_from([0, 1, 3]))
def test_restore_and_skip_reproduce_the_stream(corpus, before, skip, prefetch):
    kwargs = dict(seq_len=8, batch_size=6, seed=11)
    reference = data.Loader(corpus, prefetch=0, **kwargs)
    expected = [next(reference) for _ in range(before + skip + 3)]

    with data.Loader(corpus, prefetch=prefetch, **kwargs) as loader:
        got = [next(loader) for _ in range(before)]
        state = json.loads(json.dumps(loader.state()))
        assert state["step"] == before
        loader.skip(skip)
        got += [next(loader) for _ in range(3)]
    np.testing.assert_array_equal(np.stack(got), np.stack(expected[:before] + expected[-3:]))

    with data.Loader(corpus, prefetch=prefetch, **kwargs) as restored:
        restored.restore(state)
        np.testing.assert_array_equal(next(restored), expected[before])


def test_prefetch_thread_shuts_down(corpus):
    # Compared with the threads before, in case another test left a loader to the collector.
    before = set(threading.enumerate())

    def prefetchers():
        return [t for t in set(threading.enumerate()) - before if t.name == "palm-data-prefetch"]

    with data.Loader(corpus, seq_len=8, batch_size=4, prefetch=2) as loader:
        next(loader)
        assert [t.daemon for t in prefetchers()] == [True]
        loader.skip(2)  # restarts lazily, from the new position
        assert not prefetchers()
        next(loader)
    assert not prefetchers()

    # A loader dropped without close() stops its thread when collected.
    loader = data.Loader(corpus, seq_len=8, batch_size=4, prefetch=2)
    next(loader)
    thread, = prefetchers()
    del loader
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_process_slices_assemble_the_global_batch(corpus):
    kwargs = dict(seq_len=8, batch_size=8, seed=5, prefetch=0)
    single = data.Loader(corpus, **kwargs)
    hosts = [data.Loader(corpus, process_index=i, process_count=4, **kwargs) for i in range(4)]
    for _ in range(3):
        parts = [next(h) for h in hosts]
        assert all(p.shape == (2, 9) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), next(single))
    assert {json.dumps(h.state()) for h in hosts} == {json.dumps(single.state())}

    val = list(data.validation_batches(corpus, seq_len=8, batch_size=4))
    val_parts = [list(data.validation_batches(corpus, seq_len=8, batch_size=4, process_index=i,
                                              process_count=2)) for i in range(2)]
    for b, batch in enumerate(val):
        np.testing.assert_array_equal(np.concatenate([p[b] for p in val_parts]), batch)


def test_train_and_validation_are_disjoint(corpus):
    seq_len = 8
    val = [tuple(r) for b in data.validation_batches(corpus, seq_len=seq_len, batch_size=2)
           for r in b]
    assert val == [tuple(r) for b in data.validation_batches(corpus, seq_len=seq_len,
                                                              batch_size=2) for r in b]
    train, held_out = set(), set()
    for stream in corpus.streams.values():
        n_train, n_val = data.split_windows(len(stream), seq_len, corpus.val_fraction)
        assert n_val >= 1
        train |= set(_windows(stream, seq_len, range(n_train)))
        held_out |= set(_windows(stream, seq_len, range(n_train, n_train + n_val)))
    assert set(val) <= held_out and not train & held_out
    loader = data.Loader(corpus, seq_len=seq_len, batch_size=16, prefetch=0)
    assert {tuple(r) for _ in range(30) for r in next(loader)} <= train
    assert len(list(data.validation_batches(corpus, seq_len=seq_len, batch_size=2,
                                            max_batches=3))) == 3


def test_bad_loader_arguments(corpus):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        data.Loader(corpus, seq_len=8, batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="seq_len=0"):
        data.Loader(corpus, seq_len=0, batch_size=8)
    with pytest.raises(ValueError, match="seed=-1"):
        data.Loader(corpus, seq_len=8, batch_size=8, seed=-1)
    with pytest.raises(ValueError, match="process_index=2"):
        data.Loader(corpus, seq_len=8, batch_size=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="source 'lower' has .* fewer than one training window"):
        data.Loader(corpus, seq_len=100_000, batch_size=8)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.validation_batches(corpus, seq_len=8, batch_size=10_000)
    loader = data.Loader(corpus, seq_len=8, batch_size=8, prefetch=0)
    other = data.Loader(corpus, seq_len=8, batch_size=8, seed=1, prefetch=0).state()
    with pytest.raises(ValueError, match="does not match this loader"):
        loader.restore(other)


def test_bad_mixtures(tok, two_sources, tmp_path):
    with pytest.raises(ValueError, match=r"unknown sources \['web'\]"):
        data.Mixture(two_sources, weights={"lower": 1.0, "upper": 1.0, "web": 1.0})
    with pytest.raises(ValueError, match=r"no weight for sources \['upper'\]"):
        data.Mixture(two_sources, weights={"lower": 1.0})
    with pytest.raises(ValueError, match="sum to a positive"):
        data.Mixture(two_sources, weights={"lower": 0.0, "upper": 0.0})
    with pytest.raises(ValueError, match="sum to a positive"):
        data.Mixture(two_sources, weights={"lower": -1.0, "upper": 2.0})
    with pytest.raises(ValueError, match="at least one source"):
        data.Mixture({})
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.build_corpus(data.Mixture({"a": [tmp_path / "missing.txt"]}), tok, tmp_path)


def test_palm_mixture_is_table_2():
    assert sum(data.PALM_MIXTURE.values()) == pytest.approx(1.0)
    assert data.PALM_MIXTURE["social_media_conversations"] == 0.50
    assert data.Mixture(dict.fromkeys(data.PALM_MIXTURE, "*.txt"),
                        weights=data.PALM_MIXTURE).probabilities() == pytest.approx(
        data.PALM_MIXTURE)
