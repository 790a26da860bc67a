"""PaLM's training recipe on one machine: data, Adafactor, z-loss, checkpoints, resumption.

`python -m palm train` (see `add_arguments`) and `train(...)` for scripts. A run directory
holds the tokenizer (unless given), the token cache, `metrics.jsonl` and `checkpoints/`.
Resuming restores parameters, optimizer state, step, RNG key and the data iterator, so a run
continues exactly as if never stopped (bitwise on the same machine; see tests/test_train.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import kernels
from palm import data as data_lib
from palm import tokenizer as tokenizer_lib
from palm.checkpoint import CheckpointError, Checkpointer, abstract
from palm.config import PRESETS, Config, preset
from palm.flops import flops_per_token, mfu
from palm.generate import greedy
from palm.model import init, loss
from palm.optim import OptimizerConfig, learning_rate_schedule, make_optimizer


class TrainError(Exception):
    """Bad input to a training run, reported to the user with exit code 2."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run's settings (the model's are in `palm.Config`)."""

    steps: int = 300
    # Global batch in sequences, and tokens per sequence (windows hold seq_len + 1).
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    impl: str = "auto"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # Loss-spike remedy (section 5.1): when the loss is non-finite or above spike_factor times
    # its mean over the last spike_window steps, go back to the last checkpoint and skip the
    # next spike_skip_batches batches. None disables it.
    spike_factor: float | None = None
    spike_window: int = 50
    spike_skip_batches: int = 200
    max_rewinds: int = 5
    # Peak FLOP/s of one device for MFU; None looks the device up (palm.flops.PEAK_FLOPS).
    peak_flops: float | None = None
    # Greedy sample printed at the end.
    sample_prompt: str = "def __init__(self"
    sample_tokens: int = 48

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "spike_window"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


# --- The step functions. ---

def init_state(config: Config, train_config: TrainConfig) -> dict:
    """Parameters, optimizer state, step counter and the run's PRNG key.

    PaLM pre-trains without dropout, so nothing in the step consumes the key; it is part of
    the state so that stochastic extensions (dropout, sampled evaluation) resume exactly.
    """
    key = jax.random.PRNGKey(train_config.seed)
    key, init_key = jax.random.split(key)
    params = init(config, init_key)
    return {"params": params, "opt_state": make_optimizer(train_config.optimizer).init(params),
            "step": jnp.zeros((), jnp.int32), "rng": key}


def make_train_step(config: Config, train_config: TrainConfig):
    """jit(state, batch int32 [B, T + 1]) -> (state, metrics); the old state is donated."""
    tx = make_optimizer(train_config.optimizer)
    schedule = learning_rate_schedule(train_config.optimizer)
    impl = kernels.resolve_impl(train_config.impl)

    def step(state, batch):
        grad_fn = jax.value_and_grad(lambda p: loss(p, batch, config, impl=impl), has_aux=True)
        (_, metrics), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state["step"]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": jax.random.fold_in(state["rng"], state["step"])}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(config: Config, train_config: TrainConfig):
    impl = kernels.resolve_impl(train_config.impl)
    return jax.jit(lambda params, batch: loss(params, batch, config, impl=impl)[1])


# --- Data. ---

def build_data(sources: dict[str, Any], weights: dict[str, float] | None, config: Config,
               run_dir: Path, tokenizer_path: str | None, cache_dir: str | None,
               val_fraction: float) -> tuple[tokenizer_lib.Tokenizer, data_lib.Corpus]:
    """Loads or trains the tokenizer, then tokenises (or reuses) every source."""
    mixture = data_lib.Mixture(sources, weights=weights, val_fraction=val_fraction)
    path = Path(tokenizer_path) if tokenizer_path else run_dir / "tokenizer.model"
    if path.exists():
        tokenizer = tokenizer_lib.Tokenizer.load(path)
    else:
        tqdm.write(f"training a {config.vocab_size}-piece tokenizer -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        every_file = [p for source in sources.values() for p in tokenizer_lib.resolve_paths(source)]
        tokenizer = tokenizer_lib.train(every_file, config.vocab_size, path)
    if tokenizer.vocab_size > config.vocab_size:
        raise TrainError(f"tokenizer {path} has {tokenizer.vocab_size} pieces, more than the "
                         f"model's vocab_size={config.vocab_size}")
    corpus = data_lib.build_corpus(mixture, tokenizer, cache_dir or run_dir / "cache")
    return tokenizer, corpus


def unigram_entropy(corpus: data_lib.Corpus, vocab_size: int) -> float:
    """Entropy in nats/token of the corpus's unigram distribution: the loss of a model that
    knows token frequencies but no context; learning must go well below it."""
    counts = np.zeros(vocab_size, np.int64)
    for stream in corpus.streams.values():
        counts += np.bincount(stream.read(0, len(stream)), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --- The loop. ---

class _MetricsLog:
    """Appends one JSON object per line and flushes, so a crash loses at most the line in hand."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _to_float(tree: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def train(config: Config, train_config: TrainConfig, sources: dict[str, Any], run_dir: str | Path, *,
          weights: dict[str, float] | None = None, resume: bool = False, tokenizer_path: str | None = None,
          cache_dir: str | None = None, val_fraction: float = 0.02, progress: bool = True) -> dict:
    """Trains, logs, checkpoints; returns a summary (final losses, tokens/s, wall time, sample).

    Raises:
        TrainError, CheckpointError, ValueError, FileNotFoundError: bad input, named.
    """
    start_time = time.perf_counter()
    run_dir = Path(run_dir)
    tc = train_config
    if tc.seq_len > config.max_seq_len:
        raise TrainError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    if tc.batch_size % jax.process_count():
        raise TrainError(f"--batch-size {tc.batch_size} must divide over {jax.process_count()} processes")

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    latest = checkpointer.latest_step()
    if resume and latest is None:
        raise TrainError(f"--resume: no checkpoint in {checkpointer.directory}")
    if not resume and latest is not None:
        raise TrainError(f"{run_dir} already holds checkpoints (latest step {latest}); pass --resume "
                         "to continue that run or choose another --out")

    tokenizer, corpus = build_data(sources, weights, config, run_dir, tokenizer_path, cache_dir, val_fraction)
    loader = data_lib.Loader(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
    meta = {"config": config.to_dict(), "seq_len": tc.seq_len, "batch_size": tc.batch_size,
            "seed": tc.seed, "tokenizer_sha256": tokenizer.sha256}
    state = init_state(config, tc)
    if resume:
        state = _restore(checkpointer, latest, state, meta, loader)

    train_step = make_train_step(config, tc)
    eval_step = make_eval_step(config, tc)
    tokens_per_step = tc.batch_size * tc.seq_len
    flops = flops_per_token(config, tc.seq_len)
    log = _MetricsLog(run_dir / "metrics.jsonl")
    if resume:
        log.write({"event": "resume", "step": latest})

    def save(step):
        checkpointer.save(step, state, dict(meta, loader=loader.state()))

    def validate():
        batches = data_lib.validation_batches(corpus, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                              max_batches=tc.eval_batches, process_index=jax.process_index(),
                                              process_count=jax.process_count())
        results = [_to_float(eval_step(state["params"], jnp.asarray(b))) for b in batches]
        return {k: float(np.mean([r[k] for r in results])) for k in ("loss", "cross_entropy", "accuracy")}

    step = int(state["step"])
    recent: list[float] = []
    rewinds = 0
    last = {}
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < tc.steps:
            batch = jnp.asarray(next(loader))
            new_state, metrics = train_step(state, batch)
            current = float(metrics["loss"])
            if tc.spike_factor is not None and _is_spike(current, recent, tc):
                rewinds += 1
                if rewinds > tc.max_rewinds:
                    raise TrainError(f"loss spike at step {step + 1} ({current:.4g}) after {tc.max_rewinds} "
                                     "rewinds; giving up")
                back = checkpointer.latest_step()
                if back is None:
                    raise TrainError(f"loss spike at step {step + 1} ({current:.4g}) before any checkpoint")
                state = _restore(checkpointer, back, init_state(config, tc), meta, loader)
                loader.skip(tc.spike_skip_batches)
                log.write({"event": "loss_spike", "step": step + 1, "loss": current, "rewound_to": back,
                           "skipped_batches": tc.spike_skip_batches})
                tqdm.write(f"loss spike at step {step + 1} ({current:.4g}): back to step {back}, "
                           f"skipping {tc.spike_skip_batches} batches")
                step, recent = back, []
                bar.n = step
                continue
            state, step = new_state, step + 1
            recent = (recent + [current])[-tc.spike_window:]
            window_steps += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_second = window_steps * tokens_per_step / elapsed
                last = dict(_to_float(metrics), step=step, tokens_per_second=tokens_per_second,
                            mfu=_mfu(tokens_per_second, config, tc), model_flops_per_token=flops)
                if step % tc.eval_every == 0 or step == tc.steps:
                    last.update({f"val_{k}": v for k, v in validate().items()})
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                                mfu="n/a" if last["mfu"] is None else f"{last['mfu']:.1%}")
                window_start, window_steps = time.perf_counter(), 0
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save(step)
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        loader.close()
        log.close()

    sample = _sample(state["params"], config, tc, tokenizer)
    return {"step": step, "final": last, "sample": sample, "wall_seconds": time.perf_counter() - start_time,
            "unigram_entropy": unigram_entropy(corpus, config.vocab_size)}


def _is_spike(current: float, recent: list[float], tc: TrainConfig) -> bool:
    if not math.isfinite(current):
        return True
    return len(recent) >= tc.spike_window and current > tc.spike_factor * float(np.mean(recent))


def _mfu(tokens_per_second: float, config: Config, tc: TrainConfig) -> float | None:
    try:
        return mfu(tokens_per_second, config, tc.seq_len, tc.peak_flops)
    except ValueError:
        return None  # unknown device (e.g. CPU) and no --peak-flops: reported as n/a


def _restore(checkpointer: Checkpointer, step: int, template: dict, meta: dict,
             loader: data_lib.Loader) -> dict:
    """Restores the train state and the loader; refuses a checkpoint of another run's config."""
    saved = checkpointer.read_meta(step)
    for key, value in meta.items():
        if saved.get(key) != value:
            raise CheckpointError(f"checkpoint step {step} in {checkpointer.directory} was written with "
                                  f"{key}={saved.get(key)!r}, this run has {key}={value!r}")
    state, saved = checkpointer.restore(step, abstract(template))
    loader.restore(saved["loader"])
    return state


def _sample(params: dict, config: Config, tc: TrainConfig, tokenizer: tokenizer_lib.Tokenizer) -> str:
    prompt = tokenizer.encode(tc.sample_prompt) or [tokenizer.bos_id]
    room = config.max_seq_len - len(prompt)
    out = greedy(params, jnp.asarray([prompt], jnp.int32), config,
                 max_new_tokens=min(tc.sample_tokens, room), impl=tc.impl)
    return tokenizer.decode([int(t) for t in out[0]])


# --- Command line. ---

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    o = OptimizerConfig()
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--data", nargs="+", metavar="[NAME=]GLOB",
                        help="training text: files or glob patterns, one source each (NAME=GLOB names it); "
                             "default: the Python standard library's own source files")
    parser.add_argument("--weights", nargs="+", metavar="NAME=W", help="mixture weights of named sources")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--out", default="runs/train", help="run directory (metrics, checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--tokenizer", help="a .model to use, or where to train one (default OUT/tokenizer.model)")
    parser.add_argument("--cache-dir", help="token shard cache (default OUT/cache)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--lr", type=float, default=o.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=o.warmup_steps)
    parser.add_argument("--decay-start", type=int, default=o.decay_start)
    parser.add_argument("--impl", default=d.impl, choices=kernels.IMPLS)
    parser.add_argument("--remat", default=None, choices=("none", "full", "dots"))
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    parser.add_argument("--spike-factor", type=float, default=None,
                        help="enable the loss-spike remedy: rewind when loss > FACTOR x its recent mean")
    parser.add_argument("--spike-skip-batches", type=int, default=d.spike_skip_batches)
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device, for MFU")
    parser.add_argument("--no-progress", action="store_true")


def _parse_named(values: list[str] | None, what: str) -> dict[str, str]:
    named = {}
    for i, value in enumerate(values or []):
        name, sep, rest = value.partition("=")
        if not sep:
            name, rest = (f"source{i}" if len(values) > 1 else "data"), value
        if name in named:
            raise TrainError(f"{what}: {name!r} given twice")
        named[name] = rest
    return named


def run(args: argparse.Namespace) -> int:
    """The `python -m palm train` command; bad input exits with code 2 and a message."""
    try:
        config = preset(args.preset)
        overrides = {k: v for k, v in (("remat", args.remat), ("dtype", args.dtype)) if v is not None}
        config = dataclasses.replace(config, **overrides)
        train_config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
            optimizer=OptimizerConfig(learning_rate=args.lr, warmup_steps=args.warmup_steps,
                                      decay_start=args.decay_start),
            impl=args.impl, log_every=args.log_every, eval_every=args.eval_every,
            eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints, spike_factor=args.spike_factor,
            spike_skip_batches=args.spike_skip_batches, peak_flops=args.peak_flops)
        sources = _parse_named(args.data, "--data") or {"stdlib": data_lib.stdlib_corpus()}
        weights = {k: float(v) for k, v in _parse_named(args.weights, "--weights").items()} or None
        summary = train(config, train_config, sources, args.out, weights=weights, resume=args.resume,
                        tokenizer_path=args.tokenizer, cache_dir=args.cache_dir,
                        progress=not args.no_progress)
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, UnicodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = summary["final"]
    print(f"step {summary['step']}: loss {final.get('loss', float('nan')):.3f} "
          f"(val {final.get('val_cross_entropy', float('nan')):.3f} nats/token; unigram entropy "
          f"{summary['unigram_entropy']:.3f}), {final.get('tokens_per_second', 0):,.0f} tokens/s, "
          f"{summary['wall_seconds']:.0f} s")
    print("sample:", repr(summary["sample"]))
    return 0
