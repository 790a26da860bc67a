"""Tests for palm.tokenizer: lossless round trips, digit splitting, reserved ids, errors."""

import glob
import os
import re
import sysconfig

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palm import tokenizer

VOCAB = 512
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


@pytest.fixture(scope="module")
def stdlib_files():
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:6]


@pytest.fixture(scope="module")
def tok_and_path(tmp_path_factory, stdlib_files):
    path = tmp_path_factory.mktemp("tok") / "small.model"
    return tokenizer.train(stdlib_files, VOCAB, path), path


@pytest.fixture(scope="module")
def tok(tok_and_path):
    return tok_and_path[0]


# Characters that stress a lossless vocabulary: whitespace runs, control characters, the
# SentencePiece meta symbol itself, combining marks, CJK, emoji (incl. ZWJ sequences), digits.
_TRICKY = st.sampled_from(
    [" ", "  ", "\t", "\n", "\r\n", "\x00", "\x0b", "\u2581", "\u2028", "e\u0301", "\u0308",
     "中文", "日本", "😀", "👩\u200d💻", "\ufeff", "7", "42", "٣", "a", "def ", "<s>", "</s>"])
_TEXT = st.one_of(st.text(), st.lists(_TRICKY).map("".join))


@given(_TEXT)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


@given(_TEXT)
def test_never_produces_unknown(tok, text):
    assert tok.unk_id not in tok.encode(text)


def _surface(tok, token_id):
    """The text one id stands for (a byte piece stands for its byte)."""
    piece = tok.id_to_piece(token_id)
    if _BYTE_PIECE.fullmatch(piece):
        return chr(int(piece[3:5], 16)) if int(piece[3:5], 16) < 0x80 else ""
    return tok.decode([token_id])


@given(st.one_of(_TEXT, st.integers().map(str), st.floats().map(repr)))
def test_digits_are_single_tokens(tok, text):
    for token_id in tok.encode(text):
        surface = _surface(tok, token_id)
        if any(c in "0123456789" for c in surface):
            assert len(surface) == 1, (text, tok.id_to_piece(token_id))


@given(st.lists(_TEXT, max_size=6))
def test_batch_agrees_with_single(tok, texts):
    ids = tok.encode_batch(texts)
    assert ids == [tok.encode(t) for t in texts]
    assert tok.decode_batch(ids) == texts


def test_reserved_ids_and_size(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == VOCAB
    # Control ids decode to nothing, so a packed stream decodes to its documents joined.
    assert tok.decode([tok.eos_id, tok.bos_id, tok.pad_id]) == ""


def test_vocabulary_keeps_whitespace(tok):
    # Newlines survive training (pieces such as ":\n") and indentation runs are pieces.
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert any("\n" in p and len(p) > 1 for p in pieces)
    assert "\u2581" * 4 in pieces
    assert len(tok.encode("\n        return x\n")) < len("\n        return x\n")


def test_saved_model_loads_identically(tok_and_path):
    tok, path = tok_and_path
    loaded = tokenizer.Tokenizer.load(path)
    text = "def f(x):\n\treturn x + 1  # ünïcode 😀\n"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.sha256 == tok.sha256
    # The atomic write leaves no temporary file beside the model.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_trains_from_documents(tmp_path):
    docs = ["alpha beta gamma 123\n\tdelta\n"] * 20
    tok = tokenizer.train(iter(docs), 300, tmp_path / "docs.model")
    assert tok.decode(tok.encode(docs[0])) == docs[0]


def test_non_utf8_file_is_skipped_with_warning(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    good = tmp_path / "good.txt"
    good.write_text("alpha beta gamma 123\n\tdelta\n" * 20)
    with pytest.warns(UserWarning, match="latin1.txt"):
        tok = tokenizer.train([bad, good], 300, tmp_path / "t.model")
    assert tok.vocab_size == 300
    with pytest.warns(UserWarning, match="latin1.txt"), pytest.raises(ValueError, match="no text"):
        tokenizer.train([bad], 300, tmp_path / "u.model")


def test_no_text_counts_the_files_given(tmp_path):
    # An unreadable file yields no document, but it was given: the message counts files.
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.txt"), \
            pytest.raises(ValueError, match=r"\(2 files, all empty or skipped\)"):
        tokenizer.train([tmp_path / "empty.txt", tmp_path / "latin1.txt"], 300, tmp_path / "t.model")
    with pytest.raises(ValueError, match=r"\(1 file, all empty or skipped\)"):
        tokenizer.train([tmp_path / "empty.txt"], 300, tmp_path / "t.model")
    with pytest.raises(ValueError, match=r"\(1 document, all empty or skipped\)"):
        tokenizer.train(iter([""]), 300, tmp_path / "t.model")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        tokenizer.train([tmp_path / "nope.py"], 300, tmp_path / "t.model")
    with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
        tokenizer.train(str(tmp_path / "*.nothing"), 300, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_empty_path_list(tmp_path):
    with pytest.raises(ValueError, match="no source paths"):
        tokenizer.train([], 300, tmp_path / "t.model")


def test_vocab_too_large_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=100000 is larger .* at most \d+"):
        tokenizer.train(iter(["tiny corpus\n"] * 3), 100_000, tmp_path / "t.model")
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small .* at least \d+"):
        tokenizer.train(iter(["tiny corpus\n"] * 3), 100, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.model"):
        tokenizer.Tokenizer.load(tmp_path / "absent.model")


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "junk.model"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        tokenizer.Tokenizer.load(path)


def test_encode_rejects_lone_surrogates(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("ok \ud800")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode_batch(["fine", "\udfff"])


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
