"""Training data: cached token shards, a weighted mixture of sources, packed windows, and a
resumable, prefetching, multi-host batch loader.

The pipeline, one stage per section below:

1. `tokenize_source`: each source file is one document, tokenised once into its own
   uint32 `.npy` shard (the document's ids followed by EOS) under
   `cache_dir/<tokenizer hash>/`, with an `index.json` of path, size, mtime and token count.
   Unchanged files reuse their shard; changed ones are re-tokenised. Every file is written
   through a temporary file and `os.replace`, so an interrupted run never leaves a
   half-written shard under a valid name.
2. `TokenStream`: a source's shards read back, lazily and memory-mapped, as one token
   sequence: doc_0 EOS doc_1 EOS ... As in PaLM (section 5, sequence length), examples are
   concatenated with an end-of-document token between them and split into fixed-length
   sequences, so there is no padding but a document may straddle two sequences.
3. Packing: the stream is cut into consecutive, non-overlapping windows of seq_len + 1
   tokens (inputs are window[:-1], targets window[1:]), so every token lands in exactly one
   window, in order. The ragged tail (fewer than seq_len + 1 tokens) is dropped. The last
   `val_fraction` of each source's windows are the validation split, the rest train.
4. `Loader`: each batch draws, per row, a source with the mixture weights from a
   counter-based RNG `default_rng([seed, step])`, then that source's next window in a
   per-epoch shuffled order. Its state is just (step, windows consumed per source). The
   shuffle materialises one permutation of each source's windows (8 bytes per window).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import numbers
import os
import queue
import sysconfig
import threading
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from palm import tokenizer as tokenizer_lib

# PaLM's pre-training mixture (Chowdhery et al. 2022, Table 2), as sampling proportions.
# Example usage, given file lists for each corpus:
#   Mixture({name: paths[name] for name in PALM_MIXTURE}, weights=PALM_MIXTURE)
PALM_MIXTURE = {
    "social_media_conversations": 0.50,
    "filtered_webpages": 0.27,
    "books": 0.13,
    "github": 0.05,
    "wikipedia": 0.04,
    "news": 0.01,
}

# Directories of the standard library that hold tests or third-party code rather than the
# library itself (tests also carry deliberately broken encodings).
_NOT_STDLIB = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages",
                         "dist-packages"})

_INDEX_VERSION = 1
_STATE_VERSION = 1
# Seed-sequence prefixes that keep the row-source draws and the epoch shuffles independent.
_SAMPLE_STREAM = 0
_SHUFFLE_STREAM = 1
# Files handed to the tokenizer at once: enough for its threads, small enough to bound memory.
_ENCODE_CHUNK = 64


def stdlib_corpus(limit: int | None = None) -> list[str]:
    """Paths of the Python standard library's own `.py` files: a corpus on every machine.

    Args:
        limit: keep only the first `limit` paths (in sorted order).

    Returns:
        Sorted absolute paths, without test directories, caches and site-packages.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"{limit=} must be >= 0")
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _NOT_STDLIB]
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(paths)[:limit]


# --- 1. Token shards ------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _open_shard(path: str) -> np.ndarray:
    # Bounded, because each memory map keeps a file descriptor open and a source may have
    # more files than the process may open. Shard names are unique per file version, so a
    # cached map is never stale.
    return np.load(path, mmap_mode="r")


def _shard_is_valid(path: Path, n_tokens: int) -> bool:
    try:
        shard = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return shard.dtype == np.uint32 and shard.shape == (n_tokens,)


def _read_index(root: Path, tokenizer_sha256: str) -> dict:
    fresh = {"version": _INDEX_VERSION, "tokenizer_sha256": tokenizer_sha256, "files": {}}
    try:
        index = json.loads((root / "index.json").read_text())
    except FileNotFoundError:
        return fresh
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable shard index {root / 'index.json'}: {e}", stacklevel=3)
        return fresh
    if (index.get("version") != _INDEX_VERSION
            or index.get("tokenizer_sha256") != tokenizer_sha256):
        return fresh
    return index


def tokenize_source(source: str | os.PathLike | Sequence[str | os.PathLike],
                    tokenizer: tokenizer_lib.Tokenizer,
                    cache_dir: str | os.PathLike, *, progress: str | None = None) -> TokenStream:
    """Tokenises a source's files into cached shards and returns its token stream.

    Each file is one document. A file whose size and mtime match the index (and whose shard
    is intact) is not read again. Empty files contribute nothing; unreadable or non-UTF-8
    files are skipped with a warning naming them (the policy of `palm.tokenizer`). Two
    processes sharing a cache directory never corrupt it, though one may redo the other's
    work (the last index written wins).

    Args:
        source: a path or glob pattern, or a list/tuple of them.
        tokenizer: the vocabulary; shards live under a directory named by its hash.
        cache_dir: where shards are kept (created if missing).
        progress: a name to show a progress bar under while files are tokenised (None: quiet).

    Returns:
        The stream: every document's ids, each followed by EOS, in file order.

    Raises:
        FileNotFoundError: a path is missing or a glob matches nothing.
        ValueError: no file of the source holds any text.
    """
    paths = [p.resolve() for p in tokenizer_lib.resolve_paths(source)]
    root = Path(cache_dir) / tokenizer.sha256[:16]
    root.mkdir(parents=True, exist_ok=True)
    index = _read_index(root, tokenizer.sha256)
    files = index["files"]

    stale = []
    for path in paths:
        stat = path.stat()
        entry = files.get(str(path))
        if not (entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns
                and _shard_is_valid(root / entry["shard"], entry["n_tokens"])):
            stale.append((path, stat))

    bar = tqdm(total=len(stale), desc=f"tokenising {progress}", unit="file",
               disable=progress is None or not stale, leave=False, dynamic_ncols=True)
    for start in range(0, len(stale), _ENCODE_CHUNK):
        chunk = stale[start:start + _ENCODE_CHUNK]
        bar.update(len(chunk))
        # The stat is taken before reading: a file edited meanwhile gets a newer mtime and
        # is re-tokenised on the next run rather than cached under the old one.
        texts = [tokenizer_lib.read_text(path) for path, _ in chunk]
        kept = [(path, stat, text) for (path, stat), text in zip(chunk, texts) if text]
        for path, _ in chunk:
            old = files.pop(str(path), None)
            if old:
                # A reader may still map the old shard; on POSIX unlinking leaves that intact.
                (root / old["shard"]).unlink(missing_ok=True)
        encoded = tokenizer.encode_batch([text for _, _, text in kept])
        for (path, stat, _), ids in zip(kept, encoded):
            tokens = np.asarray(ids + [tokenizer.eos_id], dtype=np.uint32)
            key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
            shard = hashlib.sha256(key).hexdigest()[:32] + ".npy"
            buffer = io.BytesIO()
            np.save(buffer, tokens)
            tokenizer_lib.write_atomically(root / shard, buffer.getvalue())
            files[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                "shard": shard, "n_tokens": len(tokens)}
    bar.close()
    if stale:
        tokenizer_lib.write_atomically(root / "index.json",
                                       json.dumps(index, indent=1).encode())

    entries = [files[str(p)] for p in paths if str(p) in files]
    if not entries:
        shown = ", ".join(repr(str(p)) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise ValueError(f"no text in source [{shown}]: every file is empty or was skipped")
    return TokenStream(shards=tuple(str(root / e["shard"]) for e in entries),
                       offsets=np.cumsum([0] + [e["n_tokens"] for e in entries]))


# --- 2. Token streams -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TokenStream:
    """A source's documents as one token sequence, read lazily from its shard files.

    Attributes:
        shards: `.npy` files of uint32 ids, in order.
        offsets: [len(shards) + 1] start of each shard in the stream, then its length.
    """

    shards: tuple[str, ...]
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Returns tokens [start, stop) of the stream as a uint32 array."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"range [{start}, {stop}) outside the stream [0, {len(self)})")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            end = min(stop, int(self.offsets[i + 1]))
            base = int(self.offsets[i])
            parts.append(_open_shard(self.shards[i])[start - base:end - base])
            start, i = end, i + 1
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)


# --- 3. Mixture, packing and splits ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Named sources of files and their sampling weights.

    Attributes:
        sources: name -> a path, glob, or list of them (see `tokenize_source`).
        weights: name -> non-negative weight, normalised to sum 1; every source must be
            named. None weighs the sources equally. See `PALM_MIXTURE`.
        val_fraction: the last this fraction of each source's windows (at least one window
            when positive) is held out for validation.
    """

    sources: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]
    weights: Mapping[str, float] | None = None
    val_fraction: float = 0.01

    def __post_init__(self):
        if not self.sources:
            raise ValueError("a Mixture needs at least one source")
        if self.weights is not None:
            unknown = sorted(set(self.weights) - set(self.sources))
            missing = sorted(set(self.sources) - set(self.weights))
            if unknown:
                raise ValueError(f"weights name unknown sources {unknown}; "
                                 f"sources are {sorted(self.sources)}")
            if missing:
                raise ValueError(f"weights give no weight for sources {missing}")
            values = list(self.weights.values())
            if not all(math.isfinite(w) and w >= 0 for w in values) or not sum(values) > 0:
                raise ValueError(f"weights must be finite, >= 0 and sum to a positive "
                                 f"number, got {dict(self.weights)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")

    def probabilities(self) -> dict[str, float]:
        """Normalised weights, in source order."""
        raw = self.weights or dict.fromkeys(self.sources, 1.0)
        total = sum(raw.values())
        return {name: raw[name] / total for name in self.sources}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenised mixture: one token stream per source, with its sampling probabilities."""

    streams: Mapping[str, TokenStream]
    probabilities: Mapping[str, float]
    val_fraction: float


def build_corpus(mixture: Mixture, tokenizer: tokenizer_lib.Tokenizer,
                 cache_dir: str | os.PathLike, *, progress: bool = False) -> Corpus:
    """Tokenises (or reuses the cached shards of) every source of the mixture; `progress`
    shows a bar per source while files are tokenised."""
    streams = {name: tokenize_source(source, tokenizer, cache_dir,
                                     progress=name if progress else None)
               for name, source in mixture.sources.items()}
    return Corpus(streams, mixture.probabilities(), mixture.val_fraction)


def split_windows(n_tokens: int, seq_len: int, val_fraction: float) -> tuple[int, int]:
    """Numbers of (train, validation) windows of seq_len + 1 tokens in a stream.

    Windows 0 .. n_train - 1 are for training and the next n_val for validation.
    """
    n_windows = n_tokens // (seq_len + 1)
    n_val = max(1, round(n_windows * val_fraction)) if val_fraction > 0 else 0
    return max(0, n_windows - n_val), min(n_val, n_windows)


def _check_batching(seq_len, batch_size, process_index, process_count):
    if not (isinstance(seq_len, numbers.Integral) and seq_len >= 1):
        raise ValueError(f"{seq_len=} must be an integer >= 1")
    if not (isinstance(batch_size, numbers.Integral) and batch_size >= 1):
        raise ValueError(f"{batch_size=} must be an integer >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"{process_index=} must be in [0, {process_count=})")
    if batch_size % process_count:
        raise ValueError(f"the global {batch_size=} is not divisible by {process_count=}")


def _window(stream: TokenStream, window: int, seq_len: int) -> np.ndarray:
    """[seq_len + 1] int32 tokens of one window of a stream."""
    n = seq_len + 1
    return stream.read(window * n, (window + 1) * n).astype(np.int32)


# --- 4. Batches -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _permutation(seed: int, source_key: int, epoch: int, n: int) -> np.ndarray:
    # Keyed by a hash of the source name, not its position, so adding a source to the
    # mixture does not reshuffle the others.
    return np.random.default_rng([_SHUFFLE_STREAM, seed, source_key, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True, eq=False)
class _Sampler:
    """The loader's fixed configuration; batch `step` is a pure function of it and a cursor.

    A cursor is (step, windows consumed per source). Kept apart from `Loader` so that the
    prefetch thread holds no reference to the loader, which can then be garbage collected.
    """

    names: tuple[str, ...]
    streams: tuple[TokenStream, ...]
    probabilities: np.ndarray
    n_train: tuple[int, ...]
    seq_len: int
    batch_size: int
    seed: int
    rows: slice

    def sources(self, step: int) -> np.ndarray:
        """[batch_size] the source index of each row of global batch `step`."""
        rng = np.random.default_rng([_SAMPLE_STREAM, self.seed, step])
        return rng.choice(len(self.names), size=self.batch_size, p=self.probabilities)

    def advance(self, cursor: tuple[int, tuple[int, ...]]) -> tuple[int, tuple[int, ...]]:
        """The cursor after one batch, without reading any data."""
        step, consumed = cursor
        counts = np.bincount(self.sources(step), minlength=len(self.names))
        return step + 1, tuple(int(c + k) for c, k in zip(consumed, counts))

    def batch(self, cursor: tuple[int, tuple[int, ...]]) -> np.ndarray:
        """[batch_size // process_count, seq_len + 1] this process's rows of batch `step`."""
        step, consumed = cursor
        sources = self.sources(step)
        # The k-th row drawn from source s in this batch takes that source's window number
        # consumed[s] + k in the shuffled order; every process computes the whole plan and
        # reads only its own rows.
        rank = np.zeros(self.batch_size, np.int64)
        for s in range(len(self.names)):
            mask = sources == s
            rank[mask] = consumed[s] + np.arange(mask.sum())
        out = np.empty((self.rows.stop - self.rows.start, self.seq_len + 1), np.int32)
        for row in range(self.rows.start, self.rows.stop):
            s = int(sources[row])
            epoch, position = divmod(int(rank[row]), self.n_train[s])
            key = zlib.crc32(self.names[s].encode())
            window = _permutation(self.seed, key, epoch, self.n_train[s])[position]
            out[row - self.rows.start] = _window(self.streams[s], int(window), self.seq_len)
        return out


def _produce(sampler: _Sampler, cursor, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: puts (batch, cursor after it) until stopped; errors are forwarded."""

    def put(item) -> bool:
        # Time out now and then to notice `stop`, since the consumer may never drain the queue.
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        while True:
            following = sampler.advance(cursor)
            if not put((sampler.batch(cursor), following)):
                return
            cursor = following
    except Exception as e:  # noqa: BLE001 - re-raised by the consumer
        put((e, None))


class Loader:
    """Endless, deterministic, resumable training batches from a corpus.

    Yields int32 arrays [batch_size // process_count, seq_len + 1]: this process's
    contiguous slice of the global batch (process i gets rows i * b .. (i + 1) * b - 1), so
    the slices of all processes stacked in order equal the single-process batch. Each
    source's train windows are visited in a shuffled order that is redrawn every epoch of
    that source (from seed, source and epoch).

    The state is (step, windows consumed per source), JSON-serialisable and the same on
    every process; `restore` makes the loader yield exactly the batches that would have come
    next. Prefetched batches are not part of the state. The state does not depend on
    process_count, so a run may resume on a different number of hosts.

    Args:
        corpus: the tokenised mixture.
        seq_len: tokens per training example; rows hold seq_len + 1 (inputs and targets).
        batch_size: the global batch size, divisible by process_count.
        seed: drives the source draws and the shuffles.
        process_index: this host's index (jax.process_index()).
        process_count: number of hosts (jax.process_count()).
        prefetch: batches prepared ahead by a background thread; 0 reads synchronously.

    Raises:
        ValueError: bad sizes, or a source with fewer than one training window.
    """

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2):
        _check_batching(seq_len, batch_size, process_index, process_count)
        if not (isinstance(seed, numbers.Integral) and seed >= 0):
            # NumPy seed sequences take non-negative integers only.
            raise ValueError(f"{seed=} must be an integer >= 0")
        names = tuple(corpus.streams)
        n_train = []
        for name in names:
            n_tokens = len(corpus.streams[name])
            n, _ = split_windows(n_tokens, seq_len, corpus.val_fraction)
            if n < 1:
                raise ValueError(
                    f"source {name!r} has {n_tokens} tokens: fewer than one training window "
                    f"of seq_len + 1 = {seq_len + 1} tokens (val_fraction="
                    f"{corpus.val_fraction} holds out windows first)")
            n_train.append(n)
        rows = batch_size // process_count
        self._sampler = _Sampler(
            names=names,
            streams=tuple(corpus.streams[n] for n in names),
            probabilities=np.array([corpus.probabilities[n] for n in names], np.float64),
            n_train=tuple(n_train),
            seq_len=int(seq_len),
            batch_size=int(batch_size),
            seed=int(seed),
            rows=slice(process_index * rows, (process_index + 1) * rows),
        )
        self._cursor = (0, (0,) * len(names))
        self._prefetch = prefetch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop_event: threading.Event | None = None

    @property
    def step(self) -> int:
        """Number of batches handed out (or skipped) so far."""
        return self._cursor[0]

    def sources(self, step: int) -> list[str]:
        """[batch_size] the source name of each row of global batch `step`."""
        return [self._sampler.names[s] for s in self._sampler.sources(step)]

    def state(self) -> dict:
        """A JSON-serialisable snapshot of the batches handed out so far."""
        step, consumed = self._cursor
        s = self._sampler
        return {"version": _STATE_VERSION, "step": step,
                "consumed": dict(zip(s.names, consumed)),
                "seed": s.seed, "seq_len": s.seq_len, "batch_size": s.batch_size}

    def restore(self, state: Mapping) -> None:
        """Continues from a `state()`, taken from a loader with the same configuration.

        Raises:
            ValueError: the state comes from a loader with another seed, seq_len,
                batch_size or set of sources (it would name different batches).
        """
        s = self._sampler
        mine = {"version": _STATE_VERSION, "seed": s.seed, "seq_len": s.seq_len,
                "batch_size": s.batch_size}
        theirs = {k: state.get(k) for k in mine}
        consumed = state.get("consumed", {})
        if theirs != mine or sorted(consumed) != sorted(s.names):
            raise ValueError(f"state {theirs} with sources {sorted(consumed)} does not match "
                             f"this loader: {mine} with sources {sorted(s.names)}")
        self._stop()
        self._cursor = (int(state["step"]), tuple(int(consumed[n]) for n in s.names))

    def skip(self, n_batches: int) -> None:
        """Moves past the next n_batches without reading them (e.g. after a loss spike)."""
        if n_batches < 0:
            raise ValueError(f"{n_batches=} must be >= 0")
        self._stop()
        for _ in range(n_batches):
            self._cursor = self._sampler.advance(self._cursor)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> np.ndarray:
        if not self._prefetch:
            batch = self._sampler.batch(self._cursor)
            self._cursor = self._sampler.advance(self._cursor)
            return batch
        if self._thread is None:
            self._start()
        while True:
            try:
                batch, cursor = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread died") from None
        if isinstance(batch, Exception):
            self._stop()
            raise batch
        self._cursor = cursor
        return batch

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._stop_event = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(self._sampler, self._cursor, self._queue, self._stop_event),
            name="palm-data-prefetch", daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = self._queue = self._stop_event = None

    def close(self) -> None:
        """Stops the prefetch thread; iterating again restarts it from the current state."""
        self._stop()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # getattr: __init__ may have raised before the thread attributes existed.
        if getattr(self, "_thread", None) is not None:
            self._stop()


def validation_batches(corpus: Corpus, *, seq_len: int, batch_size: int,
                       max_batches: int | None = None, process_index: int = 0,
                       process_count: int = 1) -> Iterator[np.ndarray]:
    """The validation split as a fixed, finite sequence of batches.

    Sources are interleaved in proportion to their validation sizes, so the first
    `max_batches` batches sample every source; a partial final batch is dropped. Calling
    again yields the same batches.

    Args:
        corpus: the tokenised mixture (its val_fraction defines the split).
        seq_len, batch_size, process_index, process_count: as for `Loader`.
        max_batches: yield at most this many batches.

    Yields:
        int32 arrays [batch_size // process_count, seq_len + 1], this process's rows.

    Raises:
        ValueError: bad sizes, or fewer validation windows than one batch.
    """
    _check_batching(seq_len, batch_size, process_index, process_count)
    windows = []  # (position within the source's split in [0, 1), source name, window)
    for name, stream in corpus.streams.items():
        n_train, n_val = split_windows(len(stream), seq_len, corpus.val_fraction)
        windows.extend(((i + 0.5) / n_val, name, n_train + i) for i in range(n_val))
    windows.sort(key=lambda t: t[:2])
    n_batches = len(windows) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches < 1:
        raise ValueError(f"the validation split has {len(windows)} windows of {seq_len + 1} "
                         f"tokens, fewer than one batch of {batch_size} "
                         f"(val_fraction={corpus.val_fraction})")
    return _validation_iter(corpus, windows, n_batches, seq_len, batch_size,
                            batch_size // process_count * process_index, batch_size // process_count)


def _validation_iter(corpus, windows, n_batches, seq_len, batch_size, first, rows):
    # A separate generator so that validation_batches checks its arguments when called.
    for b in range(n_batches):
        chosen = windows[b * batch_size + first:b * batch_size + first + rows]
        yield np.stack([_window(corpus.streams[name], w, seq_len) for _, name, w in chosen])
