"""PaLM's lossless SentencePiece vocabulary (Chowdhery et al. 2022, section 2).

The paper's vocabulary is lossless: it keeps whitespace (vital for code), splits Unicode
characters outside the vocabulary into UTF-8 bytes, and splits numbers into one token per
digit. Here that means:
identity normalisation with no whitespace collapsing and no dummy prefix, whitespace-only
pieces (so indentation gets its own tokens), `byte_fallback` (no unknown token is ever
produced) and `split_digits`. The result is that `decode(encode(s)) == s` for every string.

Reserved ids, fixed for every model trained here:
    pad = 0, eos = 1 (joins documents in the token stream), bos = 2, unk = 3 (unused at
    encode time thanks to byte fallback), then 256 byte pieces <0x00>..<0xFF>, then merges.

Input policy, shared with `palm.data`: a path that does not exist or a glob that matches
nothing is an error naming it; a file that is not UTF-8 (or cannot be read) is skipped with
a warning naming it, because one stray binary or Latin-1 file in a large corpus should not
stop a run, while a typo in a path should.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

# SentencePiece's whitespace meta symbol. The encoder turns spaces into it and the decoder
# turns it back into a space, so a literal U+2581 in the input would come back as " ";
# `Tokenizer.encode` spells it with byte pieces instead.
_META = "\u2581"

# Training documents are cut into chunks at line ends; whole source files are longer than
# SentencePiece's per-sentence limit (4192 bytes by default, longer ones are dropped).
# Cutting inside a document rather than per line keeps "\n" in the training text, so the
# vocabulary learns pieces such as ":\n" (the trainer strips a line's own trailing newline).
_CHUNK_CHARS = 8192
# Four UTF-8 bytes per character at most.
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS

Source = str | os.PathLike | Iterable[str | os.PathLike]


def resolve_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expands file paths and glob patterns into a list of files, in the given order.

    Each glob's matches are sorted, so the result is deterministic.

    Args:
        source: one path or glob pattern, or a list/tuple of them.

    Returns:
        The files, without duplicates, in order of first appearance.

    Raises:
        ValueError: no paths were given.
        FileNotFoundError: a path does not exist, is not a file, or a glob matches no file.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("no source paths given (an empty list)")
    paths: list[Path] = []
    for item in items:
        pattern = os.fspath(item)
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))
                       if os.path.isfile(p)]
            if not matches:
                raise FileNotFoundError(f"glob pattern {pattern!r} matches no file")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(Path(pattern))
        else:
            # A list of in-memory documents lands here too; say how to pass those.
            raise FileNotFoundError(
                f"no such file: {pattern[:200]!r} (to train on in-memory text, pass an "
                "iterator of documents, e.g. iter(docs), not a list or tuple)")
    return list(dict.fromkeys(paths))


def read_text(path: str | os.PathLike) -> str | None:
    """Reads a UTF-8 file, or warns naming it and returns None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            # newline="" keeps "\r\n" as written: the tokenizer is lossless, so is reading.
            return f.read()
    except UnicodeDecodeError as e:
        warnings.warn(f"skipping {os.fspath(path)!r}: not UTF-8 ({e.reason} at byte {e.start})",
                      stacklevel=2)
    except OSError as e:
        warnings.warn(f"skipping {os.fspath(path)!r}: cannot read it ({e.strerror})",
                      stacklevel=2)
    return None


def _documents(source: Source) -> Iterator[str]:
    """Yields documents: file contents for paths/globs, else the iterable's strings."""
    if isinstance(source, (str, os.PathLike, list, tuple)):
        for path in resolve_paths(source):
            text = read_text(path)
            if text is not None:
                yield text
    else:
        for doc in source:
            if not isinstance(doc, str):
                raise TypeError(f"documents must be str, got {type(doc).__name__}")
            yield doc


def _chunks(doc: str) -> Iterator[str]:
    """Cuts a document into pieces of at most _CHUNK_CHARS, at line ends where possible."""
    start = 0
    while start < len(doc):
        stop = start + _CHUNK_CHARS
        if stop < len(doc):
            cut = doc.rfind("\n", start, stop)
            # A line longer than a chunk (minified text) is cut mid-line.
            stop = cut + 1 if cut >= start else stop
        yield doc[start:stop]
        start = stop


def train(source: Source, vocab_size: int, path: str | os.PathLike, *,
          max_sentences: int = 100_000) -> Tokenizer:
    """Trains a lossless BPE vocabulary and writes it atomically to `path`.

    BPE rather than unigram: both keep the lossless properties (byte fallback, split
    digits, whitespace pieces), but BPE's greedy merges train in about a second on 200
    standard-library files at 4k pieces and give deterministic segmentations.

    Args:
        source: a path or glob pattern, a list/tuple of them, or any other iterable
            (e.g. an iterator or generator) of documents as strings.
        vocab_size: number of pieces, including the 4 reserved ids and 256 byte pieces.
        path: where to write the `.model` file; its directory must exist.
        max_sentences: the trainer samples at most this many chunks (of at most 8192
            characters, cut at line ends) from the corpus, which bounds its memory.

    Returns:
        The trained tokenizer.

    Raises:
        FileNotFoundError: a path is missing or a glob matches nothing.
        VocabSizeError: vocab_size outside what the corpus supports (a ValueError).
        ValueError: no paths or no text at all.
    """
    if max_sentences < 1:
        # SentencePiece reads 0 as "no limit"; a caller asking for 0 means something else.
        raise ValueError(f"{max_sentences=} must be >= 1")
    counts = {"documents": 0}

    def sentences() -> Iterator[str]:
        for doc in _documents(source):
            counts["documents"] += 1
            yield from _chunks(doc)

    # Resolve paths before training, so a missing path fails here and not inside the
    # trainer's C++ iterator (which would turn it into an opaque RuntimeError).
    if isinstance(source, (str, os.PathLike, list, tuple)):
        source = resolve_paths(source)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e)
        if "sentences_.empty()" in message:
            # Files are counted as given: an unreadable one yields no document at all.
            n, what = ((len(source), "file") if isinstance(source, list)
                       else (counts["documents"], "document"))
            raise ValueError(f"no text to train on in {_describe(source)} ({n} {what}"
                             f"{'' if n == 1 else 's'}, all empty or skipped)") from e
        too_high = re.search(r"Vocabulary size too high \(\d+\).*<= (\d+)", message)
        if too_high:
            raise VocabSizeError(f"vocab_size={vocab_size} is larger than this corpus supports: "
                                 f"the trainer can make at most {too_high[1]} pieces from it "
                                 "(use a smaller vocab_size or more text)", int(too_high[1])) from e
        too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
        if too_low:
            raise VocabSizeError(f"vocab_size={vocab_size} is too small for this corpus: it "
                                 f"needs at least {too_low[1]} (4 reserved ids, 256 byte pieces "
                                 "and one piece per frequent character)", int(too_low[1])) from e
        raise
    write_atomically(path, model.getvalue())
    return Tokenizer(model.getvalue())


class VocabSizeError(ValueError):
    """vocab_size is outside what the corpus supports; `workable` is the nearest size that is
    inside (the trainer's largest, or its smallest), for callers that may pick it instead."""

    def __init__(self, message: str, workable: int):
        super().__init__(message)
        self.workable = workable


def _describe(source: Source) -> str:
    if isinstance(source, list):
        shown = ", ".join(repr(os.fspath(p)) for p in source[:3])
        return f"[{shown}{', ...' if len(source) > 3 else ''}]"
    return "the given documents"


def _check_unicode(text: str) -> None:
    """Raises ValueError for lone surrogates (valid in a Python str, not in UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: lone surrogate {text[e.start]!r} at "
                         f"index {e.start}") from None


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Writes via a temporary file in the same directory, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); models and shards are shared across users.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Tokenizer:
    """A SentencePiece model with exact round trips: `decode(encode(s)) == s`."""

    def __init__(self, model_proto: bytes):
        """Wraps a serialised SentencePiece model (use `load` or `train` to make one)."""
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = model_proto
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
        if UNK_ID in self._meta_ids:
            raise ValueError("model has no byte-fallback pieces; train it with palm.tokenizer")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a `.model` file.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not a SentencePiece model.
        """
        try:
            proto = Path(path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer model not found: {os.fspath(path)!r}") from None
        try:
            return cls(proto)
        except RuntimeError as e:
            raise ValueError(f"{os.fspath(path)!r} is not a SentencePiece model: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def sha256(self) -> str:
        """Hex digest of the serialised model; token caches are keyed by it."""
        return hashlib.sha256(self._proto).hexdigest()

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of one id (bytes show as "<0xNN>", spaces as U+2581)."""
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        """Encodes text into ids, with no BOS/EOS added.

        Raises:
            ValueError: the text holds a lone surrogate, which UTF-8 cannot represent.
        """
        _check_unicode(text)
        if _META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_META)):
            if i:
                ids.extend(self._meta_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids; control ids (pad, eos, bos) decode to nothing.

        Raises:
            ValueError: an id is outside [0, vocab_size).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts at once (SentencePiece spreads them over threads)."""
        texts = list(texts)
        for text in texts:
            _check_unicode(text)
        plain = [i for i, t in enumerate(texts) if _META not in t]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain])):
            out[i] = ids
        for i, t in enumerate(texts):
            if _META in t:
                out[i] = self.encode(t)
        return out

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """Decodes many id lists."""
        return [self.decode(ids) for ids in batch]
