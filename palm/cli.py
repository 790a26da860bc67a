"""`python -m palm <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from palm.config import PRESETS


def _forward(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import palm

    config = palm.preset(args.preset)
    params = palm.init(config, jax.random.key(args.seed))
    tokens = jax.random.randint(jax.random.key(args.seed + 1), (args.batch_size, args.seq_len), 0,
                                config.vocab_size, dtype=jnp.int32)
    logits = palm.forward(params, tokens, config, impl=args.impl)
    print(f"preset {args.preset}: {palm.num_params(config):,} parameters; "
          f"logits {tuple(logits.shape)} {logits.dtype} on {jax.devices()[0].device_kind}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m palm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fwd = commands.add_parser("forward", help="run one forward pass on random tokens")
    fwd.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    fwd.add_argument("--batch-size", type=int, default=2)
    fwd.add_argument("--seq-len", type=int, default=16)
    fwd.add_argument("--impl", default="auto")
    fwd.add_argument("--seed", type=int, default=0)
    fwd.set_defaults(run=_forward)

    from palm import train
    trn = commands.add_parser("train", help="train a model (default: the demo on the standard library)")
    train.add_arguments(trn)
    trn.set_defaults(run=train.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
