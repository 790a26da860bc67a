"""The train step on a ("data", "model") mesh: five steps on 8 CPU devices (meshes 1x8, 2x4,
4x2, 8x1) equal the single-device run, every device holds its 1/N of the params and optimizer
state (also with --collective-matmul on 2x4), a 2x4 checkpoint restores onto 2x4, 4x2 and
one device with identical values, and
`python -m palm train --mesh data=2,model=4` trains, resumes onto 4x2 and continues the
uninterrupted run's losses, and `load_run` brings the run onto one device: all in one
subprocess (8 host devices need XLA_FLAGS before JAX starts). In this process, `--mesh` errors.

Tolerance: the relative norm error of every state leaf and metric after five steps, float32
throughout, is conftest.TOLERANCE["float32"] = 2e-5; the largest seen is 8e-7 (2x4). The
sharded step only reorders sums (psums of partial projections, gathered D, reduce-scattered
gradients, the optimizer's RMS over sharded leaves). The resumed command-line run's losses,
gradient norms and validation losses, and its final params, are held to the same tolerance
against the uninterrupted run's (its first two steps run the same program and match exactly;
after the move to 4x2, seen <= 2.2e-7 for the losses, 1.3e-8 for the params).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from palm.cli import main
from palm.settings import TrainError, parse_mesh
from conftest import FAST_COMPILE_FLAGS

_SCRIPT = textwrap.dedent("""
    import dataclasses
    import json
    import math
    import os
    import tempfile

    import jax
    import numpy as np

    from palm import data as data_lib
    from palm.checkpoint import Checkpointer
    from palm.cli import main
    from palm.config import preset
    from palm.settings import TrainConfig
    from palm.sharding import make_mesh
    from palm.decoding import load_run
    from palm.train import abstract_state, init_state, make_train_step, place_batch
    from tests.conftest import assert_close

    assert jax.device_count() == 8
    # H = 8 so that every mesh of 8 devices splits the heads; one layer keeps compiles short.
    config = dataclasses.replace(preset("tiny"), vocab_size=64, d_model=32, n_layers=1,
                                 n_heads=8, head_dim=8, d_ff=64, max_seq_len=16)
    tc = TrainConfig(batch_size=8, seq_len=8, impl="xla")
    batches = np.asarray(jax.random.randint(jax.random.key(1), (5, 8, 9), 0, config.vocab_size))

    def five_steps(mesh, tc=tc):
        state = init_state(config, tc, mesh)
        step = make_train_step(config, tc, mesh)
        for b in batches:
            state, metrics = step(state, place_batch(b, mesh))
        return step, state, metrics

    one_step, want, want_metrics = five_steps(None)
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    runs = {}
    for data, model in [(1, 8), (2, 4), (4, 2), (8, 1)]:
        mesh, what = make_mesh(data, model), f"mesh {data}x{model}"
        step, state, metrics = five_steps(mesh)
        runs[data, model] = step, state
        for (path, got), (_, expected) in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                              want_leaves):
            assert_close(got, expected, "float32", what=what + jax.tree_util.keystr(path))
        for name, value in metrics.items():
            assert_close(value, want_metrics[name], "float32", what=f"{what} {name}")

        # Each device's shard of a leaf is 1/(product of the mesh axes its spec names): 1/8
        # for the weights split over both axes and their optimizer moments; only wk, wv and
        # the norm scales (and their moments) stay whole over "model", and only scalars, the
        # key and optax's (1,) placeholders are replicated.
        sizes = dict(mesh.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            name = jax.tree_util.keystr(path)
            split = math.prod(sizes[a] for a in leaf.sharding.spec if a is not None)
            assert len(leaf.addressable_shards) == 8, (what, name)
            for shard in leaf.addressable_shards:
                assert shard.data.size * split == leaf.size, (what, name, shard.data.shape)
            if all(axis is None for axis in leaf.sharding.spec):
                assert leaf.size <= 2, (what, name)
            if leaf.size > 2 and any(w in name for w in ("'wq'", "'wo'", "'w_gate'", "'w_up'", "'w_down'", "'embed'")):
                assert split == 8, (what, name, leaf.sharding.spec)

    # --collective-matmul (wo, w_down and the embedding round rings of ppermutes): the same
    # five steps on 2x4.
    ring = dataclasses.replace(tc, mesh=(2, 4), collective_matmul=True)
    _, state, metrics = five_steps(make_mesh(2, 4), ring)
    for (path, got), (_, expected) in zip(jax.tree_util.tree_flatten_with_path(state)[0], want_leaves):
        assert_close(got, expected, "float32", what="collective matmul" + jax.tree_util.keystr(path))
    for name, value in metrics.items():
        assert_close(value, want_metrics[name], "float32", what=f"collective matmul {name}")

    # Checkpoints are mesh-independent: the 2x4 state restores onto 2x4, 4x2 and one device
    # with every value identical and every leaf placed as abstract_state asks, and each
    # compiled step takes the restored state as it comes.
    _, saved = runs[2, 4]
    with tempfile.TemporaryDirectory() as directory:
        checkpointer = Checkpointer(directory)
        checkpointer.save(5, saved, {})
        for target in [(2, 4), (4, 2), None]:
            mesh = make_mesh(*target) if target else None
            template = abstract_state(config, tc, mesh)
            restored, _ = checkpointer.restore(5, template)
            for got, wanted, value in zip(jax.tree.leaves(restored), jax.tree.leaves(template),
                                          jax.tree.leaves(saved)):
                assert got.sharding.is_equivalent_to(wanted.sharding, got.ndim), (target, got.sharding)
                np.testing.assert_array_equal(got, value)
            (runs[target][0] if target else one_step)(restored, place_batch(batches[0], mesh))
        checkpointer.close()

    # The command line end to end (tiny: H = 4): a run trained on 2x4 for two steps, resumed
    # onto 4x2 for a third, then resumed without --mesh (config.json now says 4x2) for a
    # fourth, logs the losses of an uninterrupted 2x4 run within the float32 tolerance (the
    # meshes only reorder sums); load_run brings both onto one device, params as close.
    with tempfile.TemporaryDirectory() as directory:
        files = [str(p) for p in data_lib.stdlib_corpus(limit=12)]
        shared = ["--tokenizer", directory + "/tok.model", "--cache-dir", directory + "/cache"]
        first = ["train", "--preset", "tiny", "--vocab-size", "512", "--batch-size", "8",
                 "--seq-len", "16", "--log-every", "1", "--eval-every", "2", "--eval-batches",
                 "1", "--mesh", "data=2,model=4", "--data", *files, *shared, "--no-progress"]
        a, b = directory + "/a", directory + "/b"
        assert main([*first, "--steps", "4", "--out", a]) == 0
        assert main([*first, "--steps", "2", "--out", b]) == 0
        assert main(["train", "--resume", "--steps", "3", "--mesh", "data=4,model=2",
                     "--no-progress", "--out", b]) == 0
        assert main(["train", "--resume", "--steps", "4", "--no-progress", "--out", b]) == 0
        record = json.load(open(b + "/config.json"))
        assert record["command"]["mesh"] == "data=4,model=2" and record["train"]["mesh"] == [4, 2]
        assert sorted(os.listdir(b + "/checkpoints")) == ["2", "3", "4"]
        logged = [[r for r in map(json.loads, open(run + "/metrics.jsonl")) if "loss" in r]
                  for run in (a, b)]
        assert [r["step"] for r in logged[1]] == [1, 2, 3, 4], logged[1]
        for want, got in zip(*logged):
            for name in ("loss", "grad_norm", "val_loss"):
                if name in want:
                    assert_close(got[name], want[name], "float32", what=f"step {want['step']} {name}")
                    if want["step"] <= 2:
                        assert got[name] == want[name], (want["step"], name)
        (params_a, _, _), (params_b, _, _) = load_run(a), load_run(b)
        for got, expected in zip(jax.tree.leaves(params_b), jax.tree.leaves(params_a)):
            assert got.sharding.device_set == expected.sharding.device_set == {jax.devices()[0]}
            assert_close(got, expected, "float32", what="load_run params")
    print("ok")
""")


@pytest.mark.long
def test_sharded_train_steps_match_one_device_on_8_cpu_devices():
    # conftest's cheap compile settings, so that they reach every compile (init_state's
    # too): the compiles are nearly all of this test's time, and the flags halve them.
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0 and done.stdout.splitlines()[-1:] == ["ok"], done.stderr[-4000:]


@pytest.mark.parametrize("text", ["data=2", "data=2,model=4,data=1", "data=2;model=4", "x=2,model=4",
                                  "data=two,model=4", "data=0,model=8", "data=-1,model=4", ""])
def test_mesh_flag_syntax_is_refused(text):
    with pytest.raises(TrainError, match=r"--mesh .*expected data=D,model=M"):
        parse_mesh(text)


def test_mesh_flag_parses_either_order():
    assert parse_mesh("data=2,model=4") == parse_mesh("model=4, data=2") == (2, 4)


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "data=2;model=4"], "--mesh 'data=2;model=4': expected data=D,model=M with positive "
                                   "integers, e.g. data=2,model=4"),
    (["--mesh", "data=2,model=4"], "--mesh data=2,model=4: mesh data=2 x model=4 needs 8 devices; 1 given"),
    (["--collective-matmul"], "--collective-matmul replaces all-gathers over a mesh's data axis: "
                              "it needs --mesh"),
])
def test_mesh_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "a.txt").write_text("text\n")
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress",
                 "--seq-len", "16", "--batch-size", "8", "--data", str(tmp_path / "a.txt"), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()
