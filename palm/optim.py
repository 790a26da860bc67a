"""PaLM's optimizer (section 5), assembled from optax pieces.

Adafactor without factorisation is Adam with parameter scaling: the update is normalised by
a running second moment with beta2 = 1 - k^-0.8, clipped to RMS 1 per parameter matrix, scaled
by the learning rate times the parameter matrix's own RMS, smoothed by momentum beta1 = 0.9,
and the gradient is clipped to global norm 1 first. Weight decay is dynamic, lr(k)^2
(section 5).

"Parameter matrix" means one layer's weight. The model stacks every layer's copy of a weight
on a leading axis L (`palm.model.param_shapes`), so optax's `clip_by_block_rms` and
`scale_by_param_block_rms`, which take one RMS over a whole leaf, would mix the layers: a layer
of RMS 0.01 stacked with one of RMS 1 would step ~70x too far. The two RMS-based steps here
reduce over `matrix_axes` instead (optax 0.2.8 has no per-axis variant of either).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from palm.settings import OptimizerConfig  # noqa: F401 -- re-exported: palm.optim.OptimizerConfig

# The one rule for which leaves are stacked: everything under params["blocks"] has the layer
# axis L first (palm.model.init stacks the blocks for lax.scan); every other leaf (embed,
# final_norm_scale) is a single matrix or vector.
STACKED_SUBTREE = "blocks"


def matrix_axes(path: tuple, leaf: jax.Array) -> tuple[int, ...]:
    """The axes that one parameter matrix spans in a leaf: all but L for a stacked leaf,
    all of them otherwise.

    Args:
      path: the leaf's key path in the params tree, as `jax.tree.map_with_path` gives it.
      leaf: the parameter, its update or its gradient (same shape).
    """
    stacked = len(path) > 1 and path[0] == jax.tree_util.DictKey(STACKED_SUBTREE)
    return tuple(range(1 if stacked else 0, leaf.ndim))


def _matrix_rms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """RMS of each parameter matrix in x, kept as size-1 axes so it broadcasts against x:
    [L, 1, ...] for a stacked leaf, [1, ...] for the rest."""
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def clip_by_matrix_rms(threshold: float) -> optax.GradientTransformation:
    """optax.clip_by_block_rms with one RMS per parameter matrix: u / max(1, rms(u) / threshold)."""

    def update_fn(updates, state, params=None):
        del params

        def clip(path, u):
            return u / jnp.maximum(1.0, _matrix_rms(u, matrix_axes(path, u)) / threshold)

        return jax.tree.map_with_path(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_param_matrix_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """optax.scale_by_param_block_rms with one RMS per parameter matrix:
    u * max(rms(p), min_scale).

    The floor lets zero-initialised parameters move at all (Adafactor's epsilon2). Values equal
    optax's; its safe_root_mean_squares differs only in keeping gradients *through* the update
    finite at p = 0, and nothing here differentiates the optimizer.
    """

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_by_param_matrix_rms needs params: update(grads, state, params)")

        def scale(path, u, p):
            return u * jnp.maximum(_matrix_rms(p, matrix_axes(path, p)), min_scale)

        return jax.tree.map_with_path(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


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
        clip_by_matrix_rms(config.update_clip),
        optax.scale_by_learning_rate(lr, flip_sign=False),
        scale_by_param_matrix_rms(),
        optax.ema(config.beta1, debias=False, accumulator_dtype=jnp.float32),
        optax.add_decayed_weights(lambda count: lr(count) ** config.weight_decay_power),
        optax.scale(-1.0),
    )
