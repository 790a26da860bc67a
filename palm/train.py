"""PaLM's training recipe on one machine: data, Adafactor, z-loss, checkpoints, resumption.

`python -m palm train` (see `add_arguments`) and `train(...)` for scripts. A run directory is
self-contained: `config.json` (the model, training and data settings, readable), its own copy
of `tokenizer.model`, `metrics.jsonl`, `checkpoints/` and, unless another is named, the token
cache. Resuming restores parameters, optimizer state, step, RNG key and the data iterator, so a
run continues exactly as if never stopped (bitwise on the same machine; see
tests/test_train.py). SIGINT or SIGTERM ends a run cleanly: the step in hand finishes and a
checkpoint is written; a second signal aborts at once.

`TrainConfig.mesh` (`--mesh data=D,model=M`) shards the run over a device mesh: the state is
created and kept sharded (`state_shardings`), the loss runs under `shard_map`
(`palm.model.loss(mesh=)`), batches split over "data". Checkpoints hold the sharded arrays
and do not depend on the mesh: a restore places every leaf as the resuming run's mesh wants
(`abstract_state`), so `--resume --mesh data=4,model=2` continues a run trained on 2x4 (the
data order is the global batch's, whatever the mesh), and `palm.decoding.load_run` loads it
onto one device.

Several processes (one per host; `--coordinator`, `--num-processes`, `--process-id`, see
`initialize_processes`) train one mesh over all their devices: each reads only its block of
every global batch (`batch_rows`), process 0 alone writes the run's files (config.json,
metrics, tokenizer, token cache) and prints, and every process takes part in each checkpoint
(orbax writes each process's shards), so the run directory must be one they all see.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

import kernels
from palm import data as data_lib
from palm import sharding
from palm import tokenizer as tokenizer_lib
from palm.checkpoint import CheckpointError, CheckpointMismatch, Checkpointer, abstract
from palm.config import Config, preset
from palm.flops import flops_per_token, mfu
from palm.decoding import greedy
from palm.model import check_mesh, init, loss
from palm.optim import learning_rate_schedule, make_optimizer
from palm.settings import OptimizerConfig, TrainConfig, TrainError, parse_mesh


# --- The step functions. ---

def _fresh_state(config: Config, train_config: TrainConfig) -> dict:
    key = jax.random.PRNGKey(train_config.seed)
    key, init_key = jax.random.split(key)
    params = init(config, init_key)
    return {"params": params, "opt_state": make_optimizer(train_config.optimizer).init(params),
            "step": jnp.zeros((), jnp.int32), "rng": key}


def state_shardings(config: Config, train_config: TrainConfig, mesh: Mesh) -> dict:
    """NamedShardings of the train state on `mesh`: params by `param_specs`, the optimizer
    state following them (`optimizer_specs`), step and key replicated."""
    shapes = jax.eval_shape(lambda: _fresh_state(config, train_config))
    specs = {"params": sharding.param_specs(config),
             "opt_state": sharding.optimizer_specs(config, shapes["opt_state"]),
             "step": P(), "rng": P()}
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token windows [B, T + 1]: rows split over "data", whole over "model"."""
    return NamedSharding(mesh, P(sharding.DATA, None))


def init_state(config: Config, train_config: TrainConfig, mesh: Mesh | None = None) -> dict:
    """Parameters, optimizer state, step counter and the run's PRNG key.

    PaLM pre-trains without dropout, so nothing in the step consumes the key; it is part of
    the state so that stochastic extensions (dropout, sampled evaluation) resume exactly.

    With a mesh, every leaf is created in place as `state_shardings` says (jit with
    out_shardings: no device ever holds a whole weight), with the same values as on one
    device (JAX's partitionable threefry draws the same numbers however they are split).
    """
    if mesh is None:
        return _fresh_state(config, train_config)
    sharding.check_specs(config, mesh)
    return jax.jit(lambda: _fresh_state(config, train_config),
                   out_shardings=state_shardings(config, train_config, mesh))()


def abstract_state(config: Config, train_config: TrainConfig, mesh: Mesh | None = None) -> dict:
    """The train state's shapes, dtypes and placements, nothing allocated: what a checkpoint
    is restored into. Leaves go where this run keeps them (`state_shardings` on `mesh`, or this
    process's first device without one), whichever mesh wrote the checkpoint: a run may
    resume on another mesh, and `palm.decoding.load_run` loads a sharded run onto one device.
    """
    shapes = jax.eval_shape(lambda: _fresh_state(config, train_config))
    if mesh is None:
        return abstract(shapes, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return abstract(shapes, state_shardings(config, train_config, mesh))


def make_train_step(config: Config, train_config: TrainConfig, mesh: Mesh | None = None):
    """jit(state, batch int32 [B, T + 1]) -> (state, metrics); the old state is donated.

    With a mesh the loss runs under `shard_map` (`palm.model.loss(mesh=)`: FSDP all-gathers,
    gradients reduce-scattered to the params' sharding by the all-gathers' transpose); the
    state comes in and goes out as `state_shardings` places it, so the optimizer updates each
    device's shards where they lie, and the batch is split over "data" (`batch_sharding`).
    """
    tx = make_optimizer(train_config.optimizer)
    schedule = learning_rate_schedule(train_config.optimizer)
    impl = kernels.resolve_impl(train_config.impl)

    def step(state, batch):
        grad_fn = jax.value_and_grad(lambda p: loss(p, batch, config, impl=impl, mesh=mesh,
                                                    collective_matmul=train_config.collective_matmul),
                                     has_aux=True)
        (_, metrics), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state["step"]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": jax.random.fold_in(state["rng"], state["step"])}
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    shardings = state_shardings(config, train_config, mesh)
    return jax.jit(step, donate_argnums=0, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, NamedSharding(mesh, P())))


def make_eval_step(config: Config, train_config: TrainConfig, mesh: Mesh | None = None):
    """jit(params, batch int32 [B, T + 1]) -> metrics; with a mesh, placed as in the train step."""
    impl = kernels.resolve_impl(train_config.impl)
    fn = lambda params, batch: loss(params, batch, config, impl=impl, mesh=mesh,  # noqa: E731
                                    collective_matmul=train_config.collective_matmul)[1]
    if mesh is None:
        return jax.jit(fn)
    params = state_shardings(config, train_config, mesh)["params"]
    return jax.jit(fn, in_shardings=(params, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))


def place_batch(batch: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host batch as the step wants it: on the default device, or split over "data" (each
    process passes its own rows, `batch_rows`' block, as palm.data.Loader gives them)."""
    if mesh is None:
        return jnp.asarray(batch)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)


def batch_rows(mesh: Mesh | None, batch_size: int) -> tuple[int, int]:
    """(index, count): this process's devices hold block `index` of `count` equal blocks of
    rows of the global batch, as `batch_sharding` places it; palm.data.Loader's process_index
    and process_count. Processes whose devices hold the same rows (replicas over "model")
    read the same block; one process reads the whole batch.

    Raises:
      TrainError: the process's devices hold rows that are not one block.
    """
    if mesh is None:
        return 0, 1
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1)).values()
    rows = sorted({index[0].indices(batch_size)[:2] for index in indices})
    start, stop = rows[0][0], rows[-1][1]
    size = stop - start
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or batch_size % size or start % size:
        raise TrainError(f"--mesh data={mesh.shape[sharding.DATA]},model={mesh.shape[sharding.MODEL]}: "
                         f"process {jax.process_index()}'s devices hold rows {rows} of the batch of "
                         f"{batch_size}, not one block of an equal split (the loader reads one)")
    return start // size, batch_size // size


# --- Data. ---

RUN_CONFIG = "config.json"
RUN_TOKENIZER = "tokenizer.model"


def build_data(sources: dict[str, Any], weights: dict[str, float] | None, config: Config,
               run_dir: Path, tokenizer_path: str | None, cache_dir: str | None,
               val_fraction: float, *, fit_vocab: bool = False, progress: bool = False,
               ) -> tuple[tokenizer_lib.Tokenizer, data_lib.Corpus, Config]:
    """Loads or trains the tokenizer, keeps a copy in the run directory, then tokenises (or
    reuses) every source. Returns the config with the model's vocabulary set to the
    tokenizer's (the embedding has one row per piece).

    The run's own copy wins when it exists (a resumed run keeps its vocabulary); `tokenizer_path`
    names a model to reuse, or where to train one (e.g. shared by several runs). With
    `fit_vocab`, a corpus too small (or too varied) for `config.vocab_size` pieces gets the
    nearest size it supports, with a note, instead of an error.
    """
    mixture = data_lib.Mixture(sources, weights=weights, val_fraction=val_fraction)
    own = run_dir / RUN_TOKENIZER
    path = own if own.exists() else Path(tokenizer_path) if tokenizer_path else own
    if path.exists():
        tokenizer = tokenizer_lib.Tokenizer.load(path)
        if tokenizer_path and path == own and Path(tokenizer_path).exists():
            other = tokenizer_lib.Tokenizer.load(tokenizer_path)
            if other.sha256 != tokenizer.sha256:
                raise TrainError(f"--tokenizer {tokenizer_path} differs from the run's own "
                                 f"{own}; a run keeps one vocabulary")
    else:
        tokenizer = _train_tokenizer(sources, config.vocab_size, path, fit_vocab)
    if path != own:
        tokenizer_lib.write_atomically(own, path.read_bytes())
    if tokenizer.vocab_size != config.vocab_size:
        config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    corpus = data_lib.build_corpus(mixture, tokenizer, cache_dir or run_dir / "cache",
                                   progress=progress)
    return tokenizer, corpus, config


def _train_tokenizer(sources, vocab_size: int, path: Path, fit_vocab: bool):
    tqdm.write(f"training a {vocab_size}-piece tokenizer -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    every_file = [p for source in sources.values() for p in tokenizer_lib.resolve_paths(source)]
    try:
        return tokenizer_lib.train(every_file, vocab_size, path)
    except tokenizer_lib.VocabSizeError as e:
        if not fit_vocab:
            raise TrainError(f"{e}; try --vocab-size {e.workable}") from e
        tqdm.write(f"note: this corpus supports {e.workable} pieces, not {vocab_size}; training "
                   f"{e.workable} (--vocab-size sets another size)")
        return tokenizer_lib.train(every_file, e.workable, path)


def unigram_entropy(corpus: data_lib.Corpus, vocab_size: int) -> float:
    """Entropy in nats/token of the corpus's unigram distribution: the loss of a model that
    knows token frequencies but no context; learning must go well below it."""
    counts = np.zeros(vocab_size, np.int64)
    for stream in corpus.streams.values():
        counts += np.bincount(stream.read(0, len(stream)), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _jsonable(value: Any) -> Any:
    """Sources as config.json records them: paths and globs as strings, anything else by repr."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_run_config(run_dir: Path, config: Config, tc: TrainConfig, sources: dict[str, Any],
                     weights: dict[str, float] | None, val_fraction: float,
                     command: dict | None = None) -> None:
    """config.json: everything that defines the run, readable; `command` holds the flags of
    `python -m palm train` that made it, which `--resume` reuses."""
    record = {"model": config.to_dict(), "train": dataclasses.asdict(tc),
              "data": {"sources": _jsonable(sources), "weights": weights,
                       "val_fraction": val_fraction, "tokenizer": RUN_TOKENIZER}}
    if command is not None:
        record["command"] = command
    tokenizer_lib.write_atomically(run_dir / RUN_CONFIG, (json.dumps(record, indent=2) + "\n").encode())


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(f"{path} not found: {run_dir} is not a run directory written by "
                         "`python -m palm train`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{path} is not readable JSON: {e}") from None


# --- Processes. ---

def initialize_processes(coordinator: str | None, num_processes: int | None,
                         process_id: int | None, timeout: float) -> None:
    """Joins this process to a multi-process job (`jax.distributed.initialize`), which must
    happen before anything touches JAX's devices; nothing to do when all three are None.

    `coordinator` is process 0's HOST:PORT, given with `num_processes` and `process_id`; or
    "auto", which leaves all three to JAX's detection of the cluster (Cloud TPU, Slurm, Open
    MPI).

    Raises:
      TrainError: a missing, extra or out-of-range setting, or no cluster to detect. A process
        that has not met all the others within `timeout` seconds prints a one-line error and
        exits with code 2.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        return
    if not timeout > 0:
        raise TrainError(f"--coordinator-timeout {timeout} must be > 0 seconds")
    if coordinator == "auto":
        if num_processes is not None or process_id is not None:
            raise TrainError("--coordinator auto detects the processes: drop --num-processes "
                             "and --process-id")
        job, settings = "this process", {}
    else:
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise TrainError(f"{', '.join(missing)} missing: a multi-process run needs "
                             "--coordinator, --num-processes and --process-id")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TrainError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. "
                             "10.0.0.1:1234, or auto")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise TrainError(f"--process-id {process_id} must be in [0, {num_processes}) "
                             f"(--num-processes {num_processes})")
        job = f"process {process_id} of {num_processes}"
        settings = dict(coordinator_address=coordinator, num_processes=num_processes,
                        process_id=process_id)
    # CPU processes exchange collectives through gloo (JAX's default for CPU since 0.10, named
    # so that an environment setting another cannot break the job); GPUs and TPUs bring their
    # own and ignore the setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    # initialize does not raise when the others stay away: its deadline aborts the process
    # with a C++ stack trace. The watchdog ends it first, in one line; initialize's own
    # deadline is set past the watchdog's.
    def give_up():
        waiting = "the other processes did not all connect" if process_id == 0 else "no answer"
        print(f"error: {job} could not join the job at --coordinator {coordinator} within "
              f"--coordinator-timeout {timeout:g} s ({waiting})", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**settings, initialization_timeout=math.ceil(timeout) + 60)
    except (ValueError, RuntimeError) as e:  # "auto" where JAX detects no cluster; JAX in use
        raise TrainError(f"--coordinator {coordinator}: cannot start the job: {e}") from None
    finally:
        watchdog.cancel()


def _is_primary() -> bool:
    """Process 0 writes the run's files and prints; the others only compute."""
    return jax.process_index() == 0


def _say(text: str, file=None) -> None:
    if _is_primary():
        tqdm.write(text, file=file)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _primary_first(fn):
    """fn() on process 0, then on the others, which find what it wrote (the tokenizer, the
    token cache) instead of racing it to write the same files. An error on process 0 is
    raised there and stops the others too, which would otherwise wait for it forever."""
    if jax.process_count() == 1:
        return fn()
    error, result = None, None
    if _is_primary():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the others
            error = e
    # A barrier that also tells the others whether process 0 succeeded.
    succeeded = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not succeeded:
        raise TrainError("process 0 could not prepare the run; its error says why")
    return result if _is_primary() else fn()


# --- The loop. ---

class _MetricsLog:
    """Appends one JSON object per line and flushes, so a crash loses at most the line in hand.
    With no path (processes other than 0) it writes nothing."""

    def __init__(self, path: Path | None):
        self._file = None if path is None else open(path, "a+", encoding="utf-8")
        # A process killed mid-line leaves a fragment; the next line must not be glued to it.
        if self._file is not None and self._file.tell() > 0:
            self._file.seek(self._file.tell() - 1)
            if self._file.read(1) != "\n":
                self._file.write("\n")

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Interrupts:
    """SIGINT and SIGTERM during training: the first asks the loop to stop after the step in
    hand (it then writes a checkpoint); a second one aborts at once with KeyboardInterrupt.

    Handlers can only be installed from the main thread; elsewhere (a run started from a
    worker thread) signals keep their usual meaning.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted")
        self.received = signal.Signals(signum)
        tqdm.write(f"{self.received.name}: finishing this step and writing a checkpoint "
                   "(send it again to abort without one)")


def _agreed_signal(received: signal.Signals | None) -> signal.Signals | None:
    """The signal that stops the run, the same on every process: one process's stops them all
    at the same step, since each must take part in the same collectives (the checkpoint's
    too). Several processes compare at every call (a collective of one number)."""
    if jax.process_count() == 1:
        return received
    number = int(multihost_utils.process_allgather(np.int32(received or 0)).max())
    return signal.Signals(number) if number else None


def _to_float(tree: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def train(config: Config, train_config: TrainConfig, sources: dict[str, Any], run_dir: str | Path, *,
          weights: dict[str, float] | None = None, resume: bool = False, tokenizer_path: str | None = None,
          cache_dir: str | None = None, val_fraction: float = 0.02, progress: bool = True,
          fit_vocab: bool = False, command: dict | None = None) -> dict:
    """Trains, logs, checkpoints; returns a summary (final losses, tokens/s, wall time, sample,
    and `interrupted`: the signal that stopped the run early, or None).

    The model's vocabulary follows the tokenizer's (see `build_data`). A fresh run refuses a
    directory that already holds a run; on a bad input the directory is not left behind if
    this call created it. In a multi-process job every process calls this with the same
    arguments (after `initialize_processes`), and `train_config.mesh` must span their devices;
    the summary's sample is process 0's alone.

    Raises:
        TrainError, CheckpointError, ValueError, FileNotFoundError: bad input, named.
        KeyboardInterrupt: a second SIGINT/SIGTERM aborted the run.
    """
    start_time = time.perf_counter()
    run_dir = Path(run_dir)
    tc = train_config
    if tc.seq_len > config.max_seq_len:
        raise TrainError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    if jax.process_count() > 1 and tc.mesh is None:
        raise TrainError(f"{jax.process_count()} processes need --mesh over their "
                         f"{jax.device_count()} devices")
    mesh = None
    if tc.mesh is not None:
        try:
            mesh = sharding.make_mesh(*tc.mesh)
        except ValueError as e:
            raise TrainError(f"--mesh data={tc.mesh[0]},model={tc.mesh[1]}: {e}") from None
    # Every path and glob is resolved once, before anything is trained or written; the files
    # found are what the tokenizer and the corpus read (the run's config keeps the patterns).
    data_lib.Mixture(sources, weights=weights, val_fraction=val_fraction)
    files = {name: tokenizer_lib.resolve_paths(source) if isinstance(source, (str, Path, list, tuple))
             else source for name, source in sources.items()}
    if not resume:
        previous = [n for n in (RUN_CONFIG, "metrics.jsonl", "checkpoints") if (run_dir / n).exists()]
        if previous:
            raise TrainError(f"{run_dir} already holds a run ({', '.join(previous)}); pass --resume "
                             "to continue it or choose another --out")
    created = not run_dir.exists()
    # Every process has looked (and, seeing the same directory, decided alike) before any
    # process writes.
    _barrier("palm.train: run directory checked")
    checkpointer = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)
        if resume and checkpointer.latest_step() is None:
            raise TrainError(f"--resume: no checkpoint in {checkpointer.directory}")
        tokenizer, corpus, config = _primary_first(lambda: build_data(
            files, weights, config, run_dir, tokenizer_path, cache_dir, val_fraction,
            fit_vocab=fit_vocab, progress=progress and _is_primary()))
        if mesh is not None:  # after build_data: the vocabulary is the tokenizer's
            check_mesh(mesh, config, tc.batch_size)
        row_block, row_blocks = batch_rows(mesh, tc.batch_size)
        try:  # fails now rather than at the first validation, after compiling and training
            data_lib.validation_batches(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                        max_batches=1, process_index=row_block,
                                        process_count=row_blocks)
        except ValueError as e:
            raise TrainError(f"{e}: give more text, or a smaller --batch-size or --seq-len") from e
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        if created and _is_primary():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    loader = data_lib.Loader(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                             process_index=row_block, process_count=row_blocks)
    meta = {"config": config.to_dict(), "seq_len": tc.seq_len, "batch_size": tc.batch_size,
            "seed": tc.seed, "tokenizer_sha256": tokenizer.sha256}
    template = abstract_state(config, tc, mesh)
    if resume:
        try:
            state, latest = _restore_latest(checkpointer, template, meta, loader)
            if tc.steps <= latest:
                raise TrainError(f"--steps {tc.steps} is not above step {latest}, where the run "
                                 f"in {run_dir} stands; pass a larger --steps to train further")
        except BaseException:
            checkpointer.close()
            loader.close()
            raise
    else:
        state = init_state(config, tc, mesh)
    # Written once the run is known to go ahead; a resumed run records its new settings.
    if _is_primary():
        write_run_config(run_dir, config, tc, sources, weights, val_fraction, command)

    train_step = make_train_step(config, tc, mesh)
    eval_step = make_eval_step(config, tc, mesh)
    tokens_per_step = tc.batch_size * tc.seq_len
    flops = flops_per_token(config, tc.seq_len)
    # MFU counts the devices that compute the step (those holding the state), not every device
    # the process can see.
    n_devices = len(state["params"]["embed"].devices())
    log = _MetricsLog(run_dir / "metrics.jsonl" if _is_primary() else None)
    if resume:
        log.write({"event": "resume", "step": latest})

    def save(step):
        checkpointer.save(step, state, dict(meta, loader=loader.state()))

    def validate():
        batches = data_lib.validation_batches(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                              max_batches=tc.eval_batches, process_index=row_block,
                                              process_count=row_blocks)
        results = [_to_float(eval_step(state["params"], place_batch(b, mesh))) for b in batches]
        return {k: float(np.mean([r[k] for r in results])) for k in ("loss", "cross_entropy", "accuracy")}

    step = int(state["step"])
    saved_step = step if resume else None
    recent: list[float] = []
    rewinds = 0
    last = {}
    compiled = False
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and _is_primary()), unit="step",
               dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    interrupts = _Interrupts()
    try:
        with interrupts:
            while step < tc.steps and _agreed_signal(interrupts.received) is None:
                batch = place_batch(next(loader), mesh)
                new_state, metrics = train_step(state, batch)
                current = float(metrics["loss"])
                first = not compiled
                if first:
                    # The first step compiles; its time is reported apart, not in tokens/s.
                    compiled = True
                    seconds = time.perf_counter() - window_start
                    log.write({"event": "compiled", "step": step + 1, "seconds": seconds})
                    _say(f"compiled the train step and ran it once in {seconds:.1f} s")
                if tc.spike_factor is not None and _is_spike(current, recent, tc):
                    rewinds += 1
                    if rewinds > tc.max_rewinds:
                        raise TrainError(f"loss spike at step {step + 1} ({current:.4g}) after "
                                         f"{tc.max_rewinds} rewinds; giving up")
                    back = checkpointer.latest_step()
                    if back is None:
                        raise TrainError(f"loss spike at step {step + 1} ({current:.4g}) before any checkpoint")
                    state = _restore(checkpointer, back, template, meta, loader)
                    loader.skip(tc.spike_skip_batches)
                    log.write({"event": "loss_spike", "step": step + 1, "loss": current, "rewound_to": back,
                               "skipped_batches": tc.spike_skip_batches})
                    _say(f"loss spike at step {step + 1} ({current:.4g}): back to step {back}, "
                         f"skipping {tc.spike_skip_batches} batches")
                    step, recent = back, []
                    bar.n = step
                    window_start, window_steps = time.perf_counter(), 0
                    continue
                state, step = new_state, step + 1
                recent = (recent + [current])[-tc.spike_window:]
                if first:
                    window_start, window_steps = time.perf_counter(), 0
                else:
                    window_steps += 1
                bar.update(1)

                if step % tc.log_every == 0 or step == tc.steps:
                    elapsed = time.perf_counter() - window_start
                    # None until a step after the compiling one has been timed.
                    tokens_per_second = (window_steps * tokens_per_step / elapsed
                                         if window_steps else None)
                    last = dict(_to_float(metrics), step=step, tokens_per_second=tokens_per_second,
                                mfu=_mfu(tokens_per_second, config, tc, n_devices),
                                model_flops_per_token=flops)
                    if step % tc.eval_every == 0 or step == tc.steps:
                        last.update({f"val_{k}": v for k, v in validate().items()})
                    log.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}",
                                    tok_s="n/a" if tokens_per_second is None else f"{tokens_per_second:,.0f}",
                                    mfu="n/a" if last["mfu"] is None else f"{last['mfu']:.1%}")
                    window_start, window_steps = time.perf_counter(), 0
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    save(step)
                    saved_step = step
            stopped_by = _agreed_signal(interrupts.received)
            if stopped_by is not None and saved_step != step:
                save(step)
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        loader.close()
        log.close()

    interrupted = stopped_by.name if stopped_by is not None else None
    sample = None
    if not interrupted:
        params = state["params"]
        if jax.process_count() > 1:
            # Sharded over processes, no process holds the params whole: gather them to every
            # process (a collective: all must take part) and sample on process 0's own
            # device, as in a one-device run. Sampling under the mesh instead would need the
            # prompt and every decoded token placed globally, and GSPMD to split the decoder
            # and its Pallas kernels; a model whose sample is worth printing fits one device.
            params = multihost_utils.process_allgather(params, tiled=True)
        if _is_primary():
            sample = _sample(params, config, tc, tokenizer)
    return {"step": step, "final": last, "sample": sample, "interrupted": interrupted,
            "checkpoint": str(checkpointer.directory / str(step)),
            "wall_seconds": time.perf_counter() - start_time,
            "unigram_entropy": unigram_entropy(corpus, config.vocab_size)}


def _is_spike(current: float, recent: list[float], tc: TrainConfig) -> bool:
    if not math.isfinite(current):
        return True
    return len(recent) >= tc.spike_window and current > tc.spike_factor * float(np.mean(recent))


def _mfu(tokens_per_second: float | None, config: Config, tc: TrainConfig,
         n_devices: int) -> float | None:
    if tokens_per_second is None:
        return None
    try:
        return mfu(tokens_per_second, config, tc.seq_len, tc.peak_flops, num_devices=n_devices)
    except ValueError:
        return None  # unknown device (e.g. CPU) and no --peak-flops: reported as n/a


def _restore(checkpointer: Checkpointer, step: int, template: dict, meta: dict,
             loader: data_lib.Loader) -> dict:
    """Restores the train state into `template` (`abstract_state`) and the loader; refuses a
    checkpoint of another run's config."""
    check_meta(checkpointer, step, meta)
    state, saved = checkpointer.restore(step, template)
    loader.restore(saved["loader"])
    return state


def check_meta(checkpointer: Checkpointer, step: int, meta: dict) -> None:
    """Raises CheckpointMismatch naming the first entry of `meta` (config, tokenizer hash, ...)
    that checkpoint `step` was written with differently."""
    saved = checkpointer.read_meta(step)
    for key, value in meta.items():
        if saved.get(key) != value:
            raise CheckpointMismatch(f"checkpoint step {step} in {checkpointer.directory} was written "
                                     f"with {key}={saved.get(key)!r}, this run has {key}={value!r}")


def _restore_latest(checkpointer: Checkpointer, template: dict, meta: dict,
                    loader: data_lib.Loader) -> tuple[dict, int]:
    """Restores the newest intact checkpoint: a damaged one (an interrupted write, lost files)
    is skipped with a one-line warning. A checkpoint of another configuration is not damage:
    that error stands."""
    damaged = []
    for step in reversed(checkpointer.steps()):
        try:
            return _restore(checkpointer, step, template, meta, loader), step
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            damaged.append(step)
            _say(f"warning: {e}; trying an older checkpoint")
    raise CheckpointError(f"no intact checkpoint in {checkpointer.directory} (damaged: steps "
                          f"{', '.join(map(str, damaged))})")


def _sample(params: dict, config: Config, tc: TrainConfig, tokenizer: tokenizer_lib.Tokenizer) -> str:
    prompt = tokenizer.encode(tc.sample_prompt) or [tokenizer.bos_id]
    room = config.max_seq_len - len(prompt)
    out = greedy(params, jnp.asarray([prompt], jnp.int32), config,
                 max_new_tokens=min(tc.sample_tokens, room), impl=tc.impl)
    return tokenizer.decode([int(t) for t in out[0]])


# --- Command line (the parser is palm.cli's). ---

def _parse_named(values: list[str] | None, flag: str) -> dict[str, str]:
    named = {}
    for i, value in enumerate(values or []):
        name, sep, rest = value.partition("=")
        if not sep:
            name, rest = (f"source{i}" if len(values) > 1 else "data"), value
        if name in named:
            raise TrainError(f"{flag}: {name!r} given twice")
        named[name] = rest
    return named


def _parse_weights(values: list[str] | None, sources: dict[str, Any]) -> dict[str, float] | None:
    weights = {}
    for name, text in _parse_named(values, "--weights").items():
        try:
            weights[name] = float(text)
        except ValueError:
            raise TrainError(f"--weights {name}={text}: {text!r} is not a number") from None
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise TrainError(f"--weights names {', '.join(unknown)}, not a source of --data "
                         f"(sources: {', '.join(sources)})")
    return weights or None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _command_settings(args: argparse.Namespace) -> dict:
    """The run's flags: saved ones (--resume) overridden by those given again, or the defaults
    overridden by those given. Prints a note for each change a resumed run may take."""
    from palm.cli import RESUMABLE, TRAIN_DEFAULTS

    given = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS and v is not None}
    if not args.resume:
        return {**TRAIN_DEFAULTS, **given}
    saved = read_run_config(Path(args.out)).get("command")
    if saved is None:
        raise TrainError(f"{Path(args.out) / RUN_CONFIG} records no command line: the run was "
                         "started from Python; resume it with palm.train.train(..., resume=True)")
    settings = {**TRAIN_DEFAULTS, **saved}
    conflicts = []
    for name, value in given.items():
        if value == settings[name]:
            continue
        if name in RESUMABLE:
            _say(f"note: {_flag(name)} {value} (was {settings[name]})", file=sys.stderr)
            settings[name] = value
        else:
            conflicts.append(f"{_flag(name)} {value} (the run has {settings[name]})")
    if conflicts:
        raise TrainError(f"--resume: {'; '.join(conflicts)}. These define the run (see "
                         f"{Path(args.out) / RUN_CONFIG}); drop them, or start a new run with "
                         "another --out")
    return settings


def run(args: argparse.Namespace) -> int:
    """`python -m palm train`: bad input exits with code 2 and a one-line message; SIGINT or
    SIGTERM writes a checkpoint and exits with 128 + the signal number (130, 143)."""
    try:
        # First: nothing may touch JAX's devices before the processes have met.
        initialize_processes(args.coordinator, args.num_processes, args.process_id,
                             args.coordinator_timeout)
        flags = _command_settings(args)
        config = preset(flags["preset"])
        overrides = {k: flags[k] for k in ("remat", "dtype", "vocab_size") if flags[k] is not None}
        config = dataclasses.replace(config, **overrides)
        kernels.resolve_impl(flags["impl"])  # an unknown name fails here, with the list
        train_config = TrainConfig(
            steps=flags["steps"], batch_size=flags["batch_size"], seq_len=flags["seq_len"],
            seed=flags["seed"],
            optimizer=OptimizerConfig(learning_rate=flags["lr"], warmup_steps=flags["warmup_steps"],
                                      decay_start=flags["decay_start"]),
            impl=flags["impl"], log_every=flags["log_every"], eval_every=flags["eval_every"],
            eval_batches=flags["eval_batches"], checkpoint_every=flags["checkpoint_every"],
            keep_checkpoints=flags["keep_checkpoints"], spike_factor=flags["spike_factor"],
            spike_skip_batches=flags["spike_skip_batches"], peak_flops=flags["peak_flops"],
            mesh=parse_mesh(flags["mesh"]) if flags["mesh"] else None,
            collective_matmul=flags["collective_matmul"])
        sources = _parse_named(flags["data"], "--data") or {"stdlib": data_lib.stdlib_corpus()}
        weights = _parse_weights(flags["weights"], sources)
        summary = train(config, train_config, sources, args.out, weights=weights, resume=args.resume,
                        tokenizer_path=flags["tokenizer"], cache_dir=flags["cache_dir"],
                        progress=not args.no_progress, fit_vocab=flags["vocab_size"] is None,
                        command={k: flags[k] for k in sorted(flags)})
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, UnicodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"error: {e or 'interrupted'}: no checkpoint written for the last steps",
              file=sys.stderr)
        return 130
    final = summary["final"]
    if summary["interrupted"]:
        signum = int(getattr(signal, summary["interrupted"]))
        _say(f"{summary['interrupted']}: stopped at step {summary['step']}; checkpoint "
             f"{summary['checkpoint']}\nresume with: python -m palm train --out {args.out} --resume",
             file=sys.stderr)
        return 128 + signum
    if not _is_primary():
        return 0
    tokens_per_second = final.get("tokens_per_second")
    print(f"step {summary['step']}: loss {final.get('loss', float('nan')):.3f} "
          f"(val {final.get('val_cross_entropy', float('nan')):.3f} nats/token; unigram entropy "
          f"{summary['unigram_entropy']:.3f}), "
          f"{'n/a' if tokens_per_second is None else f'{tokens_per_second:,.0f}'} tokens/s, "
          f"{summary['wall_seconds']:.0f} s")
    print("sample:", repr(summary["sample"]))
    return 0
