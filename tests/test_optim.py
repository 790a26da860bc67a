"""PaLM's optimizer against a per-matrix NumPy restatement of section 5's update rule.

The model stacks every layer's copy of a weight on a leading axis L; section 5 scales and clips
by "the root-mean-square of the parameter matrix", one layer's matrix. The reference below knows
nothing of optax or stacking: it walks a flat dict of matrices, one per layer, in float64.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import FAST_COMPILE, assert_close
from palm import param_shapes, preset
from palm.optim import OptimizerConfig, make_optimizer



def _rms(x):
    return np.sqrt(np.mean(np.square(x)))


def _with_rms(x, rms):
    return x * (rms / _rms(x))


# --- The reference. ---

def learning_rate_reference(count: int, config: OptimizerConfig) -> float:
    """Section 5's schedule with the paper's k = count + 1: linear warm-up, constant until
    decay_start, then lr * sqrt(decay_start / k)."""
    k = count + 1
    warmup = min(1.0, k / config.warmup_steps) if config.warmup_steps else 1.0
    return config.learning_rate * warmup * min(1.0, np.sqrt(config.decay_start / k))


def adafactor_reference(matrices: dict, grads_per_step: list[dict], config: OptimizerConfig):
    """Runs the update rule on {name: one parameter matrix} for each step's gradients.

    Returns:
      The updates of every step ([{name: update}]), and which clips engaged: the global-norm
      clip per step, the update clip per (step, name).
    """
    p = {name: np.asarray(m, np.float64) for name, m in matrices.items()}
    v = {name: np.zeros_like(x) for name, x in p.items()}  # unfactored second moment
    m = {name: np.zeros_like(x) for name, x in p.items()}  # momentum
    updates_per_step, global_clipped, update_clipped = [], [], {}
    for count, grads in enumerate(grads_per_step):
        g = {name: np.asarray(x, np.float64) for name, x in grads.items()}
        # Global-norm clip: optax keeps g when its norm is strictly below the bound.
        g_norm = np.sqrt(sum(np.sum(np.square(x)) for x in g.values()))
        global_clipped.append(g_norm >= config.grad_clip)
        if g_norm >= config.grad_clip:
            g = {name: x / g_norm * config.grad_clip for name, x in g.items()}
        lr = learning_rate_reference(count, config)
        # optax's scale_by_factored_rms counts from 0, so beta2 = 1 - (count + 1)^-0.8: 0 on
        # the first step, which makes v the first squared gradient; epsilon 1e-30 inside v.
        beta2 = 1.0 - (count + 1.0) ** -config.decay_rate
        updates = {}
        for name in p:
            v[name] = beta2 * v[name] + (1 - beta2) * (np.square(g[name]) + 1e-30)
            u = g[name] / np.sqrt(v[name])
            update_clipped[count, name] = _rms(u) > config.update_clip
            u = u / max(1.0, _rms(u) / config.update_clip)
            u = lr * max(_rms(p[name]), 1e-3) * u  # relative step: the matrix's own RMS, floored
            m[name] = config.beta1 * m[name] + (1 - config.beta1) * u  # no debiasing
            # Decoupled decay lr^2 * p on the pre-step parameter, added after momentum.
            updates[name] = -(m[name] + lr ** config.weight_decay_power * p[name])
            p[name] = p[name] + updates[name]
        updates_per_step.append(updates)
    return updates_per_step, global_clipped, update_clipped


def matrices_of(tree: dict) -> dict:
    """The test tree's parameter matrices: each layer of blocks/wq is one, the rest are whole."""
    out = {"embed": tree["embed"], "final_norm_scale": tree["final_norm_scale"]}
    for layer, matrix in enumerate(tree["blocks"]["wq"]):
        out[f"blocks/wq[{layer}]"] = matrix
    return out


def tree_of(matrices: dict) -> dict:
    """The inverse of matrices_of, in float32 like the model's master weights."""
    wq = np.stack([matrices["blocks/wq[0]"], matrices["blocks/wq[1]"]])
    tree = {"embed": matrices["embed"], "blocks": {"wq": wq},
            "final_norm_scale": matrices["final_norm_scale"]}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# --- Tests. ---

def test_matches_per_matrix_reference():
    # A small tree shaped like the model's: a stacked leaf whose layers have RMS 1 and 0.01,
    # an unstacked matrix, and an unstacked vector below the 1e-3 parameter-RMS floor.
    rng = np.random.default_rng(0)
    params = tree_of({"embed": rng.standard_normal((6, 4)),
                      "blocks/wq[0]": _with_rms(rng.standard_normal((4, 3)), 1.0),
                      "blocks/wq[1]": _with_rms(rng.standard_normal((4, 3)), 0.01),
                      "final_norm_scale": _with_rms(rng.standard_normal(4), 5e-4)})
    # Gradients of RMS 0.05 (global norm ~0.36) with two events: at step 2 layer 1 of wq jumps
    # 4x and outgrows its second moment, so its update is clipped while layer 0's is not; at
    # step 4 everything jumps 10x and the global-norm clip engages.
    def gradient_rms(step, name):
        return 0.5 if step == 4 else 0.2 if (step, name) == (2, "blocks/wq[1]") else 0.05

    grads_per_step = [
        tree_of({name: gradient_rms(step, name) * rng.standard_normal(x.shape)
                 for name, x in matrices_of(params).items()})
        for step in range(5)]
    # Warm-up over 2 steps and decay from step 3, so 5 steps cover every piece of the schedule;
    # lr 0.1 makes the lr^2 decay comparable to the step itself.
    config = OptimizerConfig(learning_rate=0.1, warmup_steps=2, decay_start=3)

    expected, global_clipped, update_clipped = adafactor_reference(
        matrices_of(params), [matrices_of(g) for g in grads_per_step], config)
    # The data must exercise what the test claims to check.
    assert global_clipped == [False, False, False, False, True]
    assert update_clipped[2, "blocks/wq[1]"] and not update_clipped[2, "blocks/wq[0]"]

    tx = make_optimizer(config)
    update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
    p, state = params, tx.init(params)
    for step, grads in enumerate(grads_per_step):
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
        actual = matrices_of(updates)
        for name in expected[step]:
            assert_close(actual[name], expected[step][name], "float32", what=f"step {step} {name}:")


def test_each_layer_steps_by_its_own_rms():
    # Every stacked leaf of the model's own tree with layer 0 at RMS 1 and layer 1 at RMS 0.01,
    # the same gradient in both layers: the normalised update is then identical per layer, so
    # layer 0's step must be exactly 100x layer 1's (parameter scaling and lr^2 decay both
    # scale with the layer's parameters). One RMS over the whole leaf gives both layers the
    # same step instead.
    config = dataclasses.replace(preset("tiny"), vocab_size=16, d_model=8, n_heads=2, head_dim=4,
                                 d_ff=16, n_layers=2)
    shapes = param_shapes(config)
    rng = np.random.default_rng(1)
    params = {"embed": rng.standard_normal(shapes["embed"]), "blocks": {},
              "final_norm_scale": np.ones(shapes["final_norm_scale"])}
    grads = {"embed": 0.05 * rng.standard_normal(shapes["embed"]), "blocks": {},
             "final_norm_scale": 0.05 * rng.standard_normal(shapes["final_norm_scale"])}
    for name, shape in shapes["blocks"].items():
        layer = _with_rms(rng.standard_normal(shape[1:]), 1.0)
        params["blocks"][name] = np.stack([layer, 0.01 * layer])
        g = 0.05 * rng.standard_normal(shape[1:])
        grads["blocks"][name] = np.stack([g, g])
    params, grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (params, grads))

    tx = make_optimizer(OptimizerConfig())
    updates, _ = jax.jit(tx.update, compiler_options=FAST_COMPILE)(grads, tx.init(params), params)
    for name, step in updates["blocks"].items():
        step = np.asarray(step)
        ratio = _rms(step[0]) / _rms(step[1])
        assert ratio == pytest.approx(100.0, rel=1e-4), (
            f"blocks/{name}: layer 0 steps {ratio:.3g}x layer 1")
