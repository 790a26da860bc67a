"""`python -m palm <command>`: the command-line entry point.

Parsing imports no JAX (about 1 s saved on every `--help` and every typo); each command
imports what it runs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from palm.config import PRESETS, REMAT_POLICIES
from palm.settings import OptimizerConfig, TrainConfig

# The flags of `python -m palm train` that shape a run, saved in its config.json: dest ->
# where its value goes. All default to None on the command line so that a resumed run can tell
# a flag given again from one left out; the defaults shown in --help are filled in afterwards.
_TRAIN, _OPTIMIZER = TrainConfig(), OptimizerConfig()
TRAIN_DEFAULTS = {
    "preset": "demo", "data": None, "weights": None, "vocab_size": None, "tokenizer": None,
    "cache_dir": None, "steps": _TRAIN.steps, "batch_size": _TRAIN.batch_size,
    "seq_len": _TRAIN.seq_len, "seed": _TRAIN.seed, "lr": _OPTIMIZER.learning_rate,
    "warmup_steps": _OPTIMIZER.warmup_steps, "decay_start": _OPTIMIZER.decay_start,
    "impl": _TRAIN.impl, "remat": None, "dtype": None, "log_every": _TRAIN.log_every,
    "eval_every": _TRAIN.eval_every, "eval_batches": _TRAIN.eval_batches,
    "checkpoint_every": _TRAIN.checkpoint_every, "keep_checkpoints": _TRAIN.keep_checkpoints,
    "spike_factor": _TRAIN.spike_factor, "spike_skip_batches": _TRAIN.spike_skip_batches,
    "peak_flops": _TRAIN.peak_flops, "mesh": None, "collective_matmul": _TRAIN.collective_matmul,
}


# kernels.IMPLS holds the names; naming them here would import JAX. A wrong one is refused
# when the command runs, with the list.
_IMPL_HELP = "kernel implementation (auto: the backend's best; see kernels.IMPLS)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each flag's default; a train flag's parser default is None (see
    TRAIN_DEFAULTS), so its default is looked up there."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None:
            default = TRAIN_DEFAULTS.get(action.dest)
        shown = default is not None and default is not False and default is not argparse.SUPPRESS
        if shown and "(default" not in text:
            text += f" (default: {default})"
        return text


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    def flag(name, **kwargs):
        parser.add_argument(name, default=None, **kwargs)

    flag("--preset", choices=sorted(PRESETS), help="model size")
    flag("--data", nargs="+", metavar="[NAME=]GLOB",
         help="training text: files or glob patterns, one source each (NAME=GLOB names it); "
              "default: the Python standard library's own source files")
    flag("--weights", nargs="+", metavar="NAME=W", help="mixture weights of named sources")
    flag("--vocab-size", type=int,
         help="tokenizer pieces; the model's vocabulary follows the tokenizer's (default: the "
              "preset's, or the nearest size the corpus supports, with a note)")
    flag("--steps", type=int, help="train until this step (may change on --resume)")
    flag("--batch-size", type=int, help="global batch in sequences")
    flag("--seq-len", type=int, help="tokens per sequence")
    parser.add_argument("--out", default="runs/train", help="run directory (config, tokenizer, "
                        "metrics, checkpoints)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out with its saved settings (config.json); "
                             "flags given again must match, except those that may change: "
                             + ", ".join(f"--{n.replace('_', '-')}" for n in sorted(RESUMABLE)))
    flag("--tokenizer", help="a .model to use, or where to train one (the run keeps a copy)")
    flag("--cache-dir", help="token shard cache (default OUT/cache)")
    flag("--seed", type=int, help="PRNG seed of initialisation and data order")
    flag("--lr", type=float, help="peak learning rate (Adafactor: relative to each parameter's RMS)")
    flag("--warmup-steps", type=int, help="linear learning-rate warm-up steps")
    flag("--decay-start", type=int, help="lr decays as 1/sqrt(step) after this step")
    flag("--impl", help=_IMPL_HELP)
    flag("--remat", choices=REMAT_POLICIES, help="activation rematerialisation (default: the preset's)")
    flag("--dtype", help="compute dtype, e.g. float32, bfloat16 (default: the preset's)")
    flag("--log-every", type=int, help="steps between metrics lines")
    flag("--eval-every", type=int, help="steps between validations")
    flag("--eval-batches", type=int, help="batches per validation")
    flag("--checkpoint-every", type=int, help="steps between checkpoints")
    flag("--keep-checkpoints", type=int, help="checkpoints kept (the newest)")
    flag("--spike-factor", type=float,
         help="enable the loss-spike remedy: rewind when loss > FACTOR x its recent mean")
    flag("--spike-skip-batches", type=int, help="batches skipped after a loss-spike rewind")
    flag("--peak-flops", type=float, help="peak FLOP/s of one device, for MFU")
    flag("--mesh", metavar="data=D,model=M",
         help="shard the run over a device mesh: batch and FSDP over data, tensor parallelism "
              "over model; D*M must be the device count (default: one device). A resumed run "
              "may change it: checkpoints are restored onto whatever mesh the run has now")
    flag("--collective-matmul", action="store_true",
         help="with --mesh: compute wo, w_down and the embedding shard by shard round a ring of "
              "ppermutes instead of all-gathering them (same results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Where this launch's processes meet: given on every launch, never saved with the run nor
    # compared on --resume (a run may move to another cluster).
    launch = parser.add_argument_group(
        "multi-process runs", "one process per host (or per GPU), all with the same flags but "
                              "--process-id;\nthe run directory must be one that every process sees")
    launch.add_argument("--coordinator", metavar="HOST:PORT",
                        help="address of process 0, where the processes meet (jax.distributed); "
                             "auto: detected with the process count and index on Cloud TPU, "
                             "Slurm or Open MPI")
    launch.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    launch.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    launch.add_argument("--coordinator-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up, with an error, when the processes have not all met by then")


# Settings a resumed run may change: they steer its end point, logging, checkpointing, caching,
# which kernels run and on which devices (the mesh: the batch is the same global batch on any
# mesh), not what is learned from which data.
RESUMABLE = frozenset({"steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                       "keep_checkpoints", "peak_flops", "impl", "cache_dir", "spike_factor",
                       "spike_skip_batches", "mesh", "collective_matmul"})


def forward(args: argparse.Namespace) -> int:
    """`python -m palm forward`: one forward pass of a preset on random tokens."""
    import jax
    import jax.numpy as jnp

    import kernels
    import palm

    config = palm.preset(args.preset)
    try:
        impl = kernels.resolve_impl(args.impl)
        if not 1 <= args.seq_len <= config.max_seq_len:
            raise ValueError(f"--seq-len {args.seq_len} must be in [1, {config.max_seq_len}], the "
                             f"{args.preset} preset's max_seq_len")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = palm.init(config, jax.random.key(args.seed))
    tokens = jax.random.randint(jax.random.key(args.seed + 1), (args.batch_size, args.seq_len), 0,
                                config.vocab_size, dtype=jnp.int32)
    logits = palm.forward(params, tokens, config, impl=impl)
    print(f"preset {args.preset}: {palm.num_params(config):,} parameters; "
          f"logits {tuple(logits.shape)} {logits.dtype} on {jax.devices()[0].device_kind}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m palm", formatter_class=_Formatter,
        description="PaLM in JAX: one forward pass, training, generation, evaluation, plots of training "
                    "runs, and memory plans for meshes.")
    commands = parser.add_subparsers(dest="command", required=True)

    fwd = commands.add_parser("forward", help="run one forward pass on random tokens",
                              formatter_class=_Formatter)
    fwd.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model size")
    fwd.add_argument("--batch-size", type=int, default=2, help="sequences")
    fwd.add_argument("--seq-len", type=int, default=16, help="tokens per sequence")
    fwd.add_argument("--impl", default="auto", help=_IMPL_HELP)
    fwd.add_argument("--seed", type=int, default=0, help="PRNG seed of parameters and tokens")
    fwd.set_defaults(run="palm.cli:forward")

    trn = commands.add_parser("train", help="train a model (default: the demo on the standard library)",
                              formatter_class=_Formatter)
    _add_train_arguments(trn)
    trn.set_defaults(run="palm.train:run")

    from palm import plot
    plt = commands.add_parser("plot", help="draw training and validation loss of runs as an image",
                              formatter_class=_Formatter)
    plot.add_arguments(plt)
    plt.set_defaults(run="palm.plot:run")

    pln = commands.add_parser("plan", help="per-device memory and collective bytes of training on a mesh",
                              formatter_class=_Formatter)
    pln.add_argument("--preset", default="8b", choices=sorted(PRESETS), help="model size")
    pln.add_argument("--vocab-size", type=int, help="vocabulary override, to pad it to a multiple of --model")
    pln.add_argument("--data", type=int, default=8, help="data (FSDP) axis size")
    pln.add_argument("--model", type=int, default=1, help="model (tensor parallel) axis size")
    pln.add_argument("--batch-size", type=int, default=256, help="global batch, sequences")
    pln.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    pln.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps")
    pln.add_argument("--remat", default="full", choices=REMAT_POLICIES, help="activation rematerialisation")
    pln.add_argument("--device-memory-gib", type=float, help="show the headroom on devices of this size")
    pln.set_defaults(run="palm.sharding:run")

    gen = commands.add_parser("generate", help="continue a prompt with a trained run's model, printing "
                              "the text as it is generated", formatter_class=_Formatter)
    # dest run_dir: `run` names the function that main() dispatches to.
    gen.add_argument("--run", required=True, metavar="DIR", dest="run_dir",
                     help="run directory of `python -m palm train` (its --out): config, tokenizer "
                          "and newest checkpoint")
    gen.add_argument("--prompt", default="",
                     help="text to continue (default: none, the model starts from a BOS token)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate at most; generation "
                     "also stops at the end-of-document token (default: 64, or as many as the "
                     "model's max_seq_len leaves after the prompt)")
    gen.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, help="sample among the K most likely tokens (default: all)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling: the most likely tokens holding "
                     "probability P (default: 1, all)")
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling")
    gen.add_argument("--impl", default="auto", help=_IMPL_HELP)
    gen.set_defaults(run="palm.decoding:run")

    evl = commands.add_parser("eval", help="score a trained run's model: a few-shot task's accuracy, "
                              "or the perplexity and bits per byte of text", formatter_class=_Formatter)
    evl.add_argument("--run", required=True, metavar="DIR", dest="run_dir",
                     help="run directory of `python -m palm train` (its --out)")
    evl.add_argument("--task", metavar="FILE", help="a JSONL task file (README: Evaluating)")
    evl.add_argument("--text", nargs="+", metavar="GLOB", help="held-out text files: perplexity and bits per byte")
    evl.add_argument("--shots", type=int, default=0, help="exemplars: the task file's first SHOTS examples")
    evl.add_argument("--cot", action="store_true",
                     help="chain-of-thought: exemplars show their rationale; the answer is read from the model's")
    evl.add_argument("--calculator", action="store_true",
                     help="with --cot: complete <<expr= annotations with the calculator's result")
    evl.add_argument("--limit", type=int, help="evaluate at most this many questions (default: all)")
    evl.add_argument("--max-new-tokens", type=int,
                     help="generative tasks: tokens per answer at most (default: 32, or 128 with --cot)")
    evl.add_argument("--batch-size", type=int, default=8, help="questions decoded, or text windows scored, at once")
    evl.add_argument("--out", metavar="JSON", help="also write the result with every question's record here")
    evl.add_argument("--impl", default="auto", help=_IMPL_HELP)
    evl.add_argument("--no-progress", action="store_true", help="no progress bar")
    evl.set_defaults(run="palm.evaluation:run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, function = args.run.split(":")
    return getattr(importlib.import_module(module), function)(args)


if __name__ == "__main__":
    sys.exit(main())
