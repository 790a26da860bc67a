"""palm.forward and palm.loss with a mesh: shard_map over ("data", "model") on 8 CPU devices
equals the single-device run (logits, loss, and the gradient on one mesh), one psum over "model"
per layer in the compiled forward, collective_matmul=True gives the same results on 2x4 and 4x2
with collective-permutes in place of the all-gathers it replaces, and meshes that do not divide
the batch or the heads are refused: all in one subprocess (8 host devices need XLA_FLAGS before
JAX starts), so this process keeps its one device. In this process, the kernels' TPU lowering at their local shapes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
import pytest

from kernels import target_backend
from palm.config import preset
from palm.model import _logits, param_shapes
from tpu_export import mosaic_kernel_names

# Relative norm error allowed against the single-device run, float32 throughout: the sharded
# run only reorders sums (the psum of partial projections, the gathered D), so the errors
# seen are under 1e-6 (logits ~3e-7, gradients ~6e-7); 2e-5 is conftest.TOLERANCE["float32"].
_SCRIPT = textwrap.dedent("""
    import dataclasses
    import math
    import re

    import jax
    import numpy as np
    import pytest

    from palm.config import preset
    from palm.model import forward, init, loss
    from palm.sharding import make_mesh
    from tests.conftest import assert_close

    assert jax.device_count() == 8


    def group_size(groups: str) -> int:
        named = re.match(r"mesh\\[(.*)\\] \\{(.*)\\}", groups)
        if named is None:
            return groups.count(",") + 1  # {{0,1,...}: the first group's devices
        axes = {k.strip("'"): int(v) for k, v in (a.split("=") for a in named.group(1).split(","))}
        return math.prod(axes[n.strip().strip("'")] for n in named.group(2).split(","))

    # H = 8 so that every mesh of 8 devices splits the heads (tiny's H = 4 does not: below).
    config = dataclasses.replace(preset("tiny"), vocab_size=64, d_model=32, n_heads=8,
                                 head_dim=8, d_ff=64, max_seq_len=16)
    params = init(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, config.vocab_size)  # B=8, T+1=9

    def compiled(fn, *args):  # one compile: the program's HLO text and its results
        program = jax.jit(fn).lower(*args).compile()
        return program.as_text(), program(*args)

    def logits_and_loss(impl, mesh, **options):
        return lambda p, t: (forward(p, t[:, :-1], config, impl=impl, mesh=mesh, **options),
                             loss(p, t, config, impl=impl, mesh=mesh, **options)[0])

    def grad(mesh, **options):
        return jax.grad(lambda p, t: loss(p, t, config, impl="xla", mesh=mesh, **options)[0])

    def results(op, hlo):  # the result shapes of the program's `op` collectives
        return set(re.findall(rf"= (\\w+\\[[\\d,]*\\])\\S* {op}(?:-start)?\\(", hlo))

    _, (want_logits, want_loss) = compiled(logits_and_loss("xla", None), params, tokens)
    sharded = {}
    for data, model in [(1, 8), (2, 4), (4, 2), (8, 1)]:
        mesh = make_mesh(data, model)
        hlo, (logits, value) = compiled(logits_and_loss("xla", mesh), params, tokens)
        sharded[data, model] = hlo, logits, value
        what = f"mesh {data}x{model}"
        assert_close(logits, want_logits, "float32", what=what + " logits")
        assert_close(value, want_loss, "float32", what=what + " loss")
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model"))
        assert logits.sharding.is_equivalent_to(split, 3), (what, logits.sharding)

        # The scan over the layers compiles to a while loop (XLA merges forward's and loss's
        # identical ones) whose body holds exactly one all-reduce, over groups of the model
        # axis's size (on one device each when model = 1: XLA keeps it).
        bodies = re.findall(r"while\\(.*?body=%([\\w.-]+)", hlo)
        assert bodies, what
        for body in bodies:
            text = re.search(rf"^%{re.escape(body)} .*?^}}", hlo, re.S | re.M).group(0)
            # Replica groups print as {{0,1},{2,3}} (jax 0.10.2's XLA), or by mesh axes as
            # mesh['data'=1,'model'=8] {'model'} (0.11.2's): either way, one group's size.
            groups = re.findall(r"all-reduce\\(.*?replica_groups=(\\{\\{[\\d,]+\\}|mesh\\[[^\\]]*\\] \\{[^}]*\\})", text)
            sizes = [group_size(g) for g in groups]
            assert sizes == [model], (what, groups)

    # Gradients through the psums and all-gathers (shard_map runs with check_vma=False).
    def assert_grads_close(got, want, what):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
            assert_close(a, b, "float32", what=what + jax.tree_util.keystr(path))

    _, want_grad = compiled(grad(None), params, tokens)
    grad_hlo, grad_2x4 = compiled(grad(make_mesh(2, 4)), params, tokens)
    assert_grads_close(grad_2x4, want_grad, "2x4 grad")

    # Collective matmul, logits, loss and gradients in one program per mesh: the plain sharded
    # run's results (4x2's gradients against one device's, which the plain run matches). On
    # 2x4, where no other weight gathers to their shapes, the all-gathers over "data" of wo
    # [H/model, K, D], w_down [F/model, D] and the table [V/model, D] are gone, collective-
    # permutes of their D/data shards in their place; the backward's reduce-scatter of wo's
    # gradient goes too (the other two shards' shapes are also w_gate's and w_up's).
    collective_hlo = {}
    for data, model in [(2, 4), (4, 2)]:
        what = f"collective matmul {data}x{model}"
        mesh = make_mesh(data, model)
        hlo, ((logits, value), grads) = compiled(
            lambda p, t: (logits_and_loss("xla", mesh, collective_matmul=True)(p, t),
                          grad(mesh, collective_matmul=True)(p, t)), params, tokens)
        collective_hlo[data, model] = hlo
        _, plain_logits, plain_value = sharded[data, model]
        assert_close(logits, plain_logits, "float32", what=what + " logits")
        assert_close(value, plain_value, "float32", what=what + " loss")
        assert_grads_close(grads, grad_2x4 if data == 2 else want_grad, what + " grad")
    hlo, plain_hlo = collective_hlo[2, 4], sharded[2, 4][0]
    h, f, v = config.n_heads // 4, config.d_ff // 4, config.vocab_size // 4  # over "model"
    k, d = config.head_dim, config.d_model
    wo, w_down, table = (h, k), (f,), (v,)  # all but D
    kept, plain = results("all-gather", hlo), results("all-gather", plain_hlo)
    assert plain - kept == {f"f32[{','.join(map(str, (*w, d)))}]" for w in (wo, w_down, table)}, kept
    assert kept <= plain, kept
    assert not results("collective-permute", plain_hlo + grad_hlo)
    shards = {f"f32[{','.join(map(str, (*w, d // 2)))}]" for w in (wo, w_down, table)}
    assert results("collective-permute", hlo) == shards, hlo
    assert f"f32[{h},{k},{d // 2}]" in results("reduce-scatter", grad_hlo) - results("reduce-scatter", hlo)

    # The Pallas TPU kernels, interpreted, on their local shards: one 2x2 mesh of 4 devices.
    # On 8 host devices the TPU interpreter made no progress in 10 minutes on our 2-core
    # machine (its simulated devices wait on each other); 2 and 4 devices run in seconds.
    mesh = make_mesh(2, 2, devices=jax.devices()[:4])
    _, (logits, value) = compiled(logits_and_loss("pallas_tpu", mesh), params, tokens)
    assert_close(logits, want_logits, "float32", what="pallas_tpu 2x2 logits")
    assert_close(value, want_loss, "float32", what="pallas_tpu 2x2 loss")

    with pytest.raises(ValueError, match="batch 6 does not divide over the mesh axis 'data' of size 4"):
        forward(params, tokens[:6, :-1], config, impl="xla", mesh=make_mesh(4, 2))
    tiny = preset("tiny")  # H = 4
    with pytest.raises(ValueError, match=r"blocks/wo: dimension 1 .* size 4, .*'model' of size 8"):
        loss(init(tiny, jax.random.key(0)), tokens, tiny, impl="xla", mesh=make_mesh(1, 8))
    print("ok")
""")


@pytest.mark.long
def test_sharded_forward_and_loss_match_one_device_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-4000:]


def test_kernels_lower_natively_for_tpu_on_their_local_shards():
    """The Pallas kernels inside shard_map, exported for TPU from this 1-device process: the
    Mosaic lowering checks their blocks at the local shapes (H/model = 2 heads, F/model = 256
    columns, B/data = 2 rows). The mesh is abstract, so the exported module itself is a
    1-partition one: what this checks is the kernels' lowering, not a 4-device program."""
    config = dataclasses.replace(preset("tiny"), vocab_size=256, d_model=256, head_dim=128,
                                 d_ff=512, max_seq_len=256)  # H = 4
    device = AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
    mesh = AbstractMesh((2, 2), ("data", "model"), (AxisType.Auto,) * 2, abstract_device=device)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(config),
                          is_leaf=lambda s: isinstance(s, tuple))
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    fn = jax.jit(lambda p, t: _logits(p, t, config, "pallas_tpu", mesh=mesh))
    with target_backend("tpu"), jax.sharding.use_abstract_mesh(mesh):
        text = jax.export.export(fn, platforms=["tpu"])(params, tokens).mlir_module()
    # A forward alone: norm_swiglu's plain kernel (nothing would read a saved gate and up).
    assert mosaic_kernel_names(text) == ["palm_norm_qkv_rope_fwd", "palm_norm_swiglu_fwd",
                                         "palm_mq_flash_attention_fwd", "palm_block_out_fwd"]
