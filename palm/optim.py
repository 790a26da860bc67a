"""PaLM's optimizer (section 5), assembled from optax pieces.

Adafactor without factorisation is Adam with parameter scaling: the update is normalised by
a running second moment with beta2 = 1 - k^-0.8, clipped to RMS 1 per parameter block, scaled
by the learning rate times the parameter's own RMS, smoothed by momentum beta1 = 0.9, and the
gradient is clipped to global norm 1 first. Weight decay is dynamic, lr(k)^2 (section 5).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Section 5's settings; only the schedule is scaled for small models."""

    # Peak learning rate (a relative step size: Adafactor multiplies it by each parameter's
    # RMS). The paper uses 1e-2.
    learning_rate: float = 1e-2
    # Linear warm-up steps from 0; the paper uses none (Adafactor's beta2 schedule is already a
    # warm-up), small models trained briefly benefit from a few.
    warmup_steps: int = 0
    # Constant until this step, then lr * sqrt(decay_start / k): with 1e-2 and 10k this is the
    # paper's "1e-2 for 10k steps, then 1/sqrt(k)".
    decay_start: int = 10_000
    beta1: float = 0.9
    # beta2 = 1 - k^-decay_rate.
    decay_rate: float = 0.8
    # Update clipping: RMS of each parameter block's update at most this.
    update_clip: float = 1.0
    # Global-norm gradient clipping.
    grad_clip: float = 1.0
    # Decoupled weight decay of lr(k)^power per step (the paper: lr^2).
    weight_decay_power: float = 2.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.decay_start < 1:
            raise ValueError(f"need warmup_steps >= 0 and decay_start >= 1, got "
                             f"{self.warmup_steps}, {self.decay_start}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """lr(count) for optax's 0-based step count; the paper's k is count + 1."""

    def schedule(count):
        k = jnp.asarray(count, jnp.float32) + 1.0
        warmup = jnp.minimum(1.0, k / config.warmup_steps) if config.warmup_steps else 1.0
        decay = jnp.minimum(1.0, jnp.sqrt(config.decay_start / k))
        return config.learning_rate * warmup * decay

    return schedule


def make_optimizer(config: OptimizerConfig = OptimizerConfig()) -> optax.GradientTransformation:
    """The full update rule; the state lives in float32 like the master weights."""
    lr = learning_rate_schedule(config)
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        # factored=False: the second moment keeps the parameter's full shape (section 5).
        optax.scale_by_factored_rms(factored=False, decay_rate=config.decay_rate),
        optax.clip_by_block_rms(config.update_clip),
        optax.scale_by_learning_rate(lr, flip_sign=False),
        optax.scale_by_param_block_rms(),
        optax.ema(config.beta1, debias=False, accumulator_dtype=jnp.float32),
        optax.add_decayed_weights(lambda count: lr(count) ** config.weight_decay_power),
        optax.scale(-1.0),
    )
