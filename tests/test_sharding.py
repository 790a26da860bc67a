"""palm.sharding: spec trees against param_shapes, the rules, divisibility, the plan's arithmetic
by hand on the tiny preset, and placement on an 8-device CPU mesh (in a subprocess, so this
process keeps its one device)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from palm.config import PRESETS, preset
from palm.flops import num_params
from palm.model import param_shapes
from palm.sharding import (LOGICAL_AXES, RULES, check_specs, format_plan, optimizer_specs,
                           param_specs, plan, run)

TINY = preset("tiny")  # V=256, D=64, L=2, H=4, K=16, F=256, float32 throughout


def _is_tuple(x):
    return isinstance(x, tuple)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_logical_axes_and_specs_match_param_shapes(name):
    shapes = param_shapes(preset(name))
    assert jax.tree.structure(LOGICAL_AXES, is_leaf=_is_tuple) == jax.tree.structure(
        shapes, is_leaf=_is_tuple)
    ranks = jax.tree.map(lambda names, shape: len(names) == len(shape), LOGICAL_AXES, shapes,
                         is_leaf=_is_tuple)
    assert all(jax.tree.leaves(ranks))
    specs = param_specs(preset(name))
    assert jax.tree.structure(specs) == jax.tree.structure(shapes, is_leaf=_is_tuple)


def test_rules_split_the_block_as_the_paper_does():
    blocks = param_specs(TINY)["blocks"]
    assert blocks["wq"] == P(None, "data", "model", None)  # heads over model
    assert blocks["wo"] == P(None, "model", None, "data")
    assert blocks["w_gate"] == blocks["w_up"] == P(None, "data", "model")  # F over model
    assert blocks["w_down"] == P(None, "model", "data")
    assert blocks["wk"] == blocks["wv"] == P(None, "data", None)  # MQA's head: no "model"
    assert param_specs(TINY)["embed"] == P("model", "data")
    # FSDP: every leaf is split over "data", always along D.
    for names, spec in zip(jax.tree.leaves(LOGICAL_AXES, is_leaf=_is_tuple),
                           jax.tree.leaves(param_specs(TINY))):
        assert [n for n, axis in zip(names, spec) if axis == "data"] == ["embed"]
    assert set(RULES.values()) == {None, "data", "model"}


def test_indivisible_dimensions_name_leaf_dimension_and_axis():
    heads16 = dataclasses.replace(TINY, n_heads=16, d_ff=384, vocab_size=384)
    with pytest.raises(ValueError, match=r"blocks/wo: dimension 1 .* size 16, .*'model' of size 12"):
        check_specs(heads16, {"data": 1, "model": 12})
    with pytest.raises(ValueError, match=r"embed: dimension 0 .* 256000, .*'model' of size 12"):
        plan(preset("540b"), data=256, model=12, batch=2048)
    with pytest.raises(ValueError, match=r"dimension 1 .* size 64, .*'data' of size 3"):
        check_specs(TINY, {"data": 3, "model": 1})
    with pytest.raises(ValueError, match="batch 6 does not divide into data=2 x microbatches=2"):
        plan(TINY, data=2, model=1, batch=6, microbatches=2)


def _state_specs(transform):
    structs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(TINY),
                           is_leaf=_is_tuple)
    state = jax.eval_shape(transform.init, structs)
    return state, optimizer_specs(TINY, state)


def test_optimizer_specs_follow_params_and_drop_factored_dimensions():
    specs = param_specs(TINY)
    # Factored second moments: optax keeps, per matrix, the shape without one of its two
    # largest dimensions (v_row and v_col); the spec loses the same dimension.
    state, state_specs = _state_specs(optax.scale_by_factored_rms(min_dim_size_to_factor=16))
    # wq (L, D, H, K) = (2, 64, 4, 16); w_down (L, F, D) = (2, 256, 64).
    assert state.v_row["blocks"]["wq"].shape == (2, 4, 16)  # D dropped
    assert state_specs.v_row["blocks"]["wq"] == P(None, "model", None)
    assert state.v_col["blocks"]["wq"].shape == (2, 64, 4)  # K dropped
    assert state_specs.v_col["blocks"]["wq"] == P(None, "data", "model")
    assert state.v_row["blocks"]["w_down"].shape == (2, 64)  # F dropped
    assert state_specs.v_row["blocks"]["w_down"] == P(None, "data")
    assert state.v_col["blocks"]["w_down"].shape == (2, 256)  # D dropped
    assert state_specs.v_col["blocks"]["w_down"] == P(None, "model")
    # Unfactored leaves keep v whole and a (1,) placeholder in v_row and v_col.
    assert state_specs.v["blocks"]["norm_scale"] == specs["blocks"]["norm_scale"]
    assert state.v["blocks"]["wq"].shape == (1,) and state_specs.v["blocks"]["wq"] == P()
    assert state_specs.count == P()
    # PaLM's unfactored optimizer: every params-shaped leaf takes the parameter's spec.
    from palm.optim import make_optimizer
    state, state_specs = _state_specs(make_optimizer())
    assert state_specs[1].v == specs and state_specs[5].ema == specs


def test_plan_by_hand_on_tiny():
    # Mesh 2 x 4, 4 sequences of 16: M = 4 * 16 / 2 = 32 tokens per device; float32 (4 bytes).
    r = plan(TINY, data=2, model=4, batch=4, seq_len=16, remat="none")
    assert r["tokens_per_microbatch"] == 32
    # Elements per device, leaf by leaf: embed 256*64/8, norm_scale 2*64/2, wq 2*64*4*16/8,
    # wk = wv = 2*64*16/2, wo 2*4*16*64/8, w_gate = w_up = w_down 2*64*256/8, final 64/2.
    shard = {"embed": 2048, "norm_scale": 64, "wq": 1024, "wk": 1024, "wv": 1024, "wo": 1024,
             "mlp": 3 * 4096, "final": 32}
    params = 4 * sum(shard.values())
    assert r["memory"]["params"] == r["memory"]["gradients"] == params == 74112
    # make_optimizer's state: Adafactor's unfactored v and the momentum (2 x params), four
    # int32 step counts, and a (1,) float32 placeholder for v_row and for v_col per leaf.
    assert r["memory"]["optimizer"] == 2 * params + 4 * 4 + 2 * 10 * 4
    # One layer gathered over data (split over model): norm 64 + (wq, wo) 64*4*16/4 each +
    # (wk, wv) 64*16 each + 3 MLP matrices 64*256/4; plus the embedding 256/4 rows of 64.
    layer = 64 + 2 * 1024 + 2 * 1024 + 3 * 4096
    assert r["memory"]["gathered_weights"] == 4 * (layer + 64 * 64)
    # Saved per layer (remat none), elements: x 32*64/4, xn 32*64, q = o = 32*1*16, k = v = 32*16,
    # gate = up = h 32*256/4; plus the float32 logsumexp 32*1.
    saved = 4 * (512 + 2048 + 4 * 512 + 3 * 2048) + 4 * 32
    logits = 4 * (32 // 4) * 256
    assert r["activation_detail"] == {"saved_per_layer": saved, "layers": 2 * saved,
                                      "recomputed_layer": 0, "logits": logits}
    assert r["memory"]["activations"] == 2 * saved + logits
    assert r["memory"]["total"] == sum(v for k, v in r["memory"].items() if k != "total")

    # Weights after the data gather: embed 64*64 + per layer 2 * layer elements + final 64.
    full_over_data = 64 * 64 + 2 * layer + 64
    x = 32 * 64 * 4  # bytes of x [M, D]
    c = r["collectives"]
    assert c["fsdp_all_gather"] == 2 * (1 / 2) * full_over_data * 4
    assert c["grad_reduce_scatter"] == (1 / 2) * full_over_data * 4
    # norm_scale, wk, wv, final_norm_scale: not split over model, all-reduced over its 4 shards.
    assert c["replicated_grad_all_reduce"] == 2 * (3 / 4) * 4 * (64 + 1024 + 1024 + 32)
    assert c["layer_activations"] == 2 * 4 * (3 / 4) * x
    assert c["logits_all_to_all"] == 2 * (3 / 4) * x / 4


def test_plan_remat_policies():
    plans = {remat: plan(TINY, data=2, model=4, batch=4, seq_len=16, remat=remat)
             for remat in ("none", "dots", "full")}
    every = plans["none"]["activation_detail"]["saved_per_layer"]
    assert plans["dots"]["activation_detail"]["saved_per_layer"] == 4 * (512 + 3 * 512 + 2 * 2048)
    assert plans["full"]["activation_detail"]["saved_per_layer"] == 4 * 512
    for remat in ("dots", "full"):
        detail = plans[remat]["activation_detail"]
        assert detail["saved_per_layer"] + detail["recomputed_layer"] == every
        # The re-run forward gathers x once more per layer: 5 halves of an all-reduce, not 4.
        assert (plans[remat]["collectives"]["layer_activations"]
                == 5 / 4 * plans["none"]["collectives"]["layer_activations"])
    # Two microbatches: half the activations, every collective twice (the weights are
    # gathered and the gradients scattered per microbatch); layer traffic per token is equal.
    half = plan(TINY, data=2, model=4, batch=8, seq_len=16, remat="none", microbatches=2)
    assert half["memory"]["activations"] == plans["none"]["memory"]["activations"]
    assert half["collectives"]["total"] == 2 * plans["none"]["collectives"]["total"]
    one = plan(TINY, data=1, model=1, batch=4, seq_len=16)
    assert one["collectives"]["total"] == 0  # nothing to exchange on one device


def test_plan_for_the_paper_mesh_fits_a_tpu_v4():
    # 540B, vocabulary padded to a multiple of 12, on one pod of the paper's mesh.
    config = dataclasses.replace(preset("540b"), vocab_size=256_008)
    r = plan(config, data=256, model=12, batch=2048, remat="full")
    assert r["memory"]["total"] < 32 * 2 ** 30
    # Float32 params: 1/3072 of each leaf, but norm scales, wk and wv only 1/256.
    d, k, n = config.d_model, config.head_dim, config.n_layers
    replicated = n * (d + 2 * d * k) + d
    assert r["memory"]["params"] == 4 * ((num_params(config) - replicated) / 3072 + replicated / 256)
    assert num_params(config) == pytest.approx(540.35e9, rel=1e-3)
    assert "free of 32 GiB" in format_plan(r, device_memory=32 * 2 ** 30)


def _plan_args(**overrides):
    args = dict(preset="540b", vocab_size=256_008, data=256, model=12, batch_size=2048,
                seq_len=None, microbatches=1, remat="full", device_memory_gib=32)
    return argparse.Namespace(**{**args, **overrides})


def test_plan_command_prints_the_table_or_one_error_line(capsys):
    assert run(_plan_args()) == 0
    out = capsys.readouterr().out
    assert out.startswith("mesh data=256 x model=12, batch 2048 x 2048 tokens")
    assert "free of 32 GiB" in out and "layer_activations" in out
    assert run(_plan_args(vocab_size=None)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: embed: dimension 0") and err.count("\n") == 1


def test_shard_places_a_slice_of_every_leaf_on_each_of_8_devices():
    script = textwrap.dedent("""
        import math
        import jax
        import pytest
        from palm.config import preset
        from palm.sharding import make_mesh, param_specs, shard
        from palm.model import init

        assert jax.device_count() == 8
        with pytest.raises(ValueError, match="data=3 x model=3 needs 9 devices; 8 given"):
            make_mesh(3, 3)
        mesh = make_mesh(2, 4)
        assert dict(mesh.shape) == {"data": 2, "model": 4}
        assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
        config = preset("tiny")
        params = shard(init(config, jax.random.key(0)), mesh, config)
        for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(param_specs(config))):
            split = math.prod(mesh.shape[a] for a in spec if a is not None)
            shards = leaf.addressable_shards
            assert len({s.device for s in shards}) == 8
            assert all(s.data.size == leaf.size // split for s in shards), (leaf.shape, spec)
            assert leaf.sharding.spec == spec
        assert all(s.data.size * 8 == params["embed"].size
                   for s in params["embed"].addressable_shards)  # fully sharded: 1/8 each
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
