"""The foundation contract: config, init, the reference forward, loss and FLOP accounting."""

from __future__ import annotations

import dataclasses
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import kernels
import palm
from conftest import assert_close

TINY = palm.preset("tiny")


@pytest.fixture(scope="module")
def tiny_params():
    return palm.init(TINY, jax.random.key(0))


def random_tokens(seed, shape, vocab):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


# --- An independent float64 NumPy statement of the contract in issue 2. ---

def np_layer_norm(x, scale, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale


def np_rope(x, base):
    # x [B, T, ..., K]; position of row t is t.
    t, k = x.shape[1], x.shape[-1]
    half = k // 2
    freq = base ** (-np.arange(half) / half)
    angle = np.arange(t)[:, None] * freq[None, :]  # [T, K/2]
    angle = angle.reshape((1, t) + (1,) * (x.ndim - 3) + (half,))
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], axis=-1)


def np_forward(params, tokens, c):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"][np.asarray(tokens)]
    t = x.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    for layer in range(c.n_layers):
        w = {name: leaf[layer] for name, leaf in p["blocks"].items()}
        h = np_layer_norm(x, w["norm_scale"], c.norm_eps)
        q = np_rope(np.einsum("btd,dhk->bthk", h, w["wq"]), c.rope_base)
        k = np_rope(np.einsum("btd,dk->btk", h, w["wk"]), c.rope_base)
        v = np.einsum("btd,dk->btk", h, w["wv"])
        s = np.einsum("bthk,bsk->bhts", q, k) / math.sqrt(c.head_dim)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        probs = s / s.sum(-1, keepdims=True)
        o = np.einsum("bhts,bsk->bthk", probs, v)
        attn = np.einsum("bthk,hkd->btd", o, w["wo"])
        gate = np.einsum("btd,df->btf", h, w["w_gate"])
        mlp = (gate / (1 + np.exp(-gate)) * np.einsum("btd,df->btf", h, w["w_up"])) @ w["w_down"]
        x = x + attn + mlp
    h = np_layer_norm(x, p["final_norm_scale"], c.norm_eps)
    return h @ p["embed"].T / math.sqrt(c.d_model)


small_configs = st.builds(
    lambda layers, heads, half_k, d, f, vocab: dataclasses.replace(
        TINY, n_layers=layers, n_heads=heads, head_dim=2 * half_k, d_model=d, d_ff=f, vocab_size=vocab),
    layers=st.integers(1, 3), heads=st.integers(1, 4), half_k=st.integers(1, 12),
    d=st.integers(8, 48), f=st.integers(8, 64), vocab=st.integers(2, 80))


@given(config=small_configs, batch=st.integers(1, 3), seq=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_forward_matches_float64_numpy(config, batch, seq, seed):
    # numpy draws params and tokens: palm.init and eager jax.random would compile for every
    # drawn config, as long as the forward itself (palm.init is tested on its own below).
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape) / math.sqrt(shape[-1]), jnp.float32),
                          palm.param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))
    # Non-trivial norm scales, so a dropped scale would show.
    for name in ("norm_scale", "final_norm_scale"):
        tree = params["blocks"] if name == "norm_scale" else params
        tree[name] = jnp.asarray(1 + 0.5 * rng.normal(size=tree[name].shape), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(batch, seq)), jnp.int32)
    assert_close(palm.forward(params, tokens, config, impl="xla"), np_forward(params, tokens, config),
                 "float32", factor=5, what="logits")


# --- Properties of the model. ---

@given(seed=st.integers(0, 2**16), t=st.integers(0, 15))
def test_causal(tiny_params, seed, t):
    tokens = random_tokens(seed, (2, 16), TINY.vocab_size)
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % TINY.vocab_size)
    a = palm.forward(tiny_params, tokens, TINY, impl="xla")
    b = palm.forward(tiny_params, changed, TINY, impl="xla")
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-5, atol=1e-5)
    if t < 15:
        assert not np.allclose(a[:, t + 1:], b[:, t + 1:]), "later positions should see the change"


def test_batch_independence(tiny_params):
    tokens = random_tokens(1, (4, 12), TINY.vocab_size)
    whole = palm.forward(tiny_params, tokens, TINY, impl="xla")
    for i in range(4):
        alone = palm.forward(tiny_params, tokens[i:i + 1], TINY, impl="xla")
        np.testing.assert_allclose(whole[i:i + 1], alone, rtol=1e-5, atol=1e-5)


@given(offset=st.integers(0, 500), shift=st.integers(1, 1000), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_offset(offset, shift, seed):
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (1, 1, 64))
    k = jax.random.normal(kk, (1, 1, 64))
    pos = lambda p: jnp.full((1, 1), p, jnp.int32)  # noqa: E731
    score = lambda pq, pk: float(jnp.sum(kernels.rope(q, pos(pq)) * kernels.rope(k, pos(pk))))  # noqa: E731
    np.testing.assert_allclose(score(offset, 0), score(offset + shift, shift), rtol=1e-4, atol=1e-4)


def test_rope_rotate_half_convention():
    # K=4: the pairs are (x0, x2) and (x1, x3), rotated by pos*1 and pos*base^-1/2.
    x = jnp.array([[[1.0, 0.0, 0.0, 0.0]]])
    out = kernels.rope(x, jnp.full((1, 1), 3, jnp.int32), base=100.0)
    np.testing.assert_allclose(out[0, 0], [math.cos(3), 0, math.sin(3), 0], atol=1e-6)


@given(seed=st.integers(0, 2**16), causal=st.booleans(), t=st.integers(1, 9), s=st.integers(1, 9))
def test_multi_query_equals_multi_head_with_tiled_kv(seed, causal, t, s):
    rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile per shape
    b, h, k = 2, 3, 8
    q, key, value = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                     for shape in ((b, t, h, k), (b, s, k), (b, s, k)))
    mq = kernels.mq_flash_attention(q, key, value, causal=causal, impl="xla")

    @jax.jit
    def multi_head(q, key, value):
        # Ordinary multi-head attention with the shared head copied H times.
        keys, values = (jnp.repeat(a[:, :, None, :], h, axis=2) for a in (key, value))  # [B, S, H, K]
        logits = jnp.einsum("bthk,bshk->bhts", q, keys) / math.sqrt(k)
        if causal:
            logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, -jnp.inf)
        return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, -1), values)

    np.testing.assert_allclose(mq, multi_head(q, key, value), rtol=1e-5, atol=1e-5)


def test_loss_matches_numpy(tiny_params):
    tokens = random_tokens(3, (2, 10), TINY.vocab_size)
    mask = jnp.array(np.random.default_rng(0).random((2, 9)) > 0.3)
    total, metrics = palm.loss(tiny_params, tokens, TINY, mask=mask, impl="xla")
    logits = np.asarray(palm.forward(tiny_params, tokens[:, :-1], TINY, impl="xla"), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    targets = np.asarray(tokens[:, 1:])
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    ce = (nll * m).sum() / m.sum()
    z = TINY.z_loss_weight * (lse**2 * m).sum() / m.sum()
    acc = ((logits.argmax(-1) == targets) * m).sum() / m.sum()
    np.testing.assert_allclose(metrics["cross_entropy"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["z_loss"], z, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(total, ce + z, rtol=1e-5)


def test_loss_gradients_finite_and_nonzero(tiny_params):
    tokens = random_tokens(4, (2, 17), TINY.vocab_size)
    grads = jax.jit(jax.grad(lambda p: palm.loss(p, tokens, TINY, impl="xla")[0]))(tiny_params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.any(g != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_does_not_change_gradients(tiny_params, remat):
    tokens = random_tokens(5, (2, 9), TINY.vocab_size)
    grad = lambda c: jax.jit(jax.grad(lambda p: palm.loss(p, tokens, c, impl="xla")[0]))(tiny_params)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(TINY)), jax.tree.leaves(grad(dataclasses.replace(TINY, remat=remat)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_close_to_f32(tiny_params):
    tokens = random_tokens(6, (2, 32), TINY.vocab_size)
    f32 = palm.forward(tiny_params, tokens, TINY, impl="xla")
    bf16 = palm.forward(tiny_params, tokens, dataclasses.replace(TINY, dtype="bfloat16"), impl="xla")
    assert bf16.dtype == jnp.float32
    # Two layers of bf16 rounding in every matmul operand: a few bf16 ulps on the logits.
    assert_close(bf16, f32, "bfloat16", factor=2, what="bf16 vs f32 logits")


# --- Initialisation and counts. ---

def test_init_statistics():
    config = dataclasses.replace(TINY, d_model=128, d_ff=512, vocab_size=512, n_layers=3)
    params = palm.init(config, jax.random.key(7))
    fan_in = {"wq": 128, "wk": 128, "wv": 128, "wo": 4 * 16, "w_gate": 128, "w_up": 128, "w_down": 512}
    for name, n_in in fan_in.items():
        leaf = np.asarray(params["blocks"][name])
        np.testing.assert_allclose(leaf.std(), 1 / math.sqrt(n_in), rtol=0.05, err_msg=name)
        assert abs(leaf.mean()) < 0.05 / math.sqrt(n_in), name
        # Layers drawn independently: no two layers alike.
        assert not np.allclose(leaf[0], leaf[1]), f"{name}: layers 0 and 1 identical"
    np.testing.assert_allclose(np.asarray(params["embed"]).std(), 1.0, rtol=0.05)
    assert np.all(np.asarray(params["blocks"]["norm_scale"]) == 1)
    assert np.all(np.asarray(params["final_norm_scale"]) == 1)
    assert not np.allclose(params["blocks"]["wk"], params["blocks"]["wv"]), "leaves share a key"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name,billions", [("8b", 8.63), ("62b", 62.50), ("540b", 540.35)])
def test_num_params_match_paper(name, billions):
    # The paper prints two decimals (540.356B as 540.35B, 62.496B as 62.50B).
    assert palm.num_params(palm.preset(name)) / 1e9 == pytest.approx(billions, abs=0.01)


def test_flops_per_token_palm_8b():
    assert round(palm.flops_per_token(palm.preset("8b"), 2048) / 1e9, 1) == 55.0


def test_mfu():
    config = palm.preset("8b")
    # 1 chip at 275 TFLOP/s processing 2500 tokens/s of 55.0 GFLOP each: 50%.
    assert palm.mfu(2500, config, 2048, peak_flops=275e12, num_devices=1) == pytest.approx(0.50, abs=0.001)
    assert palm.mfu(5000, config, 2048, peak_flops=275e12, num_devices=2) == pytest.approx(0.50, abs=0.001)


def test_mfu_unknown_device_says_so():
    with pytest.raises(ValueError, match="no peak FLOP/s known for device kind 'cpu'"):
        palm.mfu(1.0, TINY, 16)


def test_peak_table_matches_specific_names_first():
    class Fake:
        def __init__(self, kind):
            self.device_kind = kind
    assert palm.device_peak_flops(Fake("TPU v5 lite")) == 197e12
    assert palm.device_peak_flops(Fake("TPU v5")) == 459e12
    assert palm.device_peak_flops(Fake("NVIDIA H100 PCIe")) == 756e12
    assert palm.device_peak_flops(Fake("NVIDIA H100 80GB HBM3")) == 989e12
    assert palm.device_peak_flops(Fake("cpu")) is None


# --- Bad input. ---

def test_unknown_preset_lists_valid():
    with pytest.raises(ValueError, match="valid: 8b, 62b, 540b, 1b, tiny, demo"):
        palm.preset("7b")


@pytest.mark.parametrize("field,value,match", [
    ("head_dim", 15, "even"), ("n_layers", 0, "positive"), ("remat", "some", "remat"),
    ("dtype", "nonsense", "not a dtype")])
def test_bad_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **{field: value})


def test_config_hashable_and_canonical():
    assert dataclasses.replace(TINY, dtype=jnp.bfloat16) == dataclasses.replace(TINY, dtype="bfloat16")
    hash(palm.preset("8b"))


@pytest.mark.parametrize("tokens,match", [
    (jnp.zeros((2, 4), jnp.float32), "integer"),
    (jnp.zeros((8,), jnp.int32), r"\[B, T\]"),
    (jnp.zeros((1, 65), jnp.int32), "exceeds the maximum 64"),
    (jnp.full((1, 4), 256, jnp.int32), "token id 256 outside"),
    (jnp.full((1, 4), -1, jnp.int32), "token id -1 outside"),
])
def test_bad_tokens(tiny_params, tokens, match):
    with pytest.raises(ValueError, match=match):
        palm.forward(tiny_params, tokens, TINY)


def test_bad_params(tiny_params):
    tokens = jnp.zeros((1, 4), jnp.int32)
    wrong = dict(tiny_params, blocks=dict(tiny_params["blocks"], wk=jnp.zeros((2, 64, 8))))
    with pytest.raises(ValueError, match=r"params\['blocks'\]\['wk'\] has shape \(2, 64, 8\)"):
        palm.forward(wrong, tokens, TINY)
    missing = dict(tiny_params, blocks={k: v for k, v in tiny_params["blocks"].items() if k != "wo"})
    with pytest.raises(ValueError, match="missing leaf"):
        palm.forward(missing, tokens, TINY)
    with pytest.raises(ValueError, match="unexpected leaf"):
        palm.forward(dict(tiny_params, extra=jnp.zeros(1)), tokens, TINY)


def test_bad_impl(tiny_params):
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        palm.forward(tiny_params, jnp.zeros((1, 4), jnp.int32), TINY, impl="cuda")


def test_bad_loss_inputs(tiny_params):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        palm.loss(tiny_params, jnp.zeros((1, 1), jnp.int32), TINY)
    with pytest.raises(ValueError, match="mask must be"):
        palm.loss(tiny_params, jnp.zeros((1, 5), jnp.int32), TINY, mask=jnp.ones((1, 5)))
    # The loss reads max_seq_len + 1 tokens: inputs and the shifted targets.
    palm.loss(tiny_params, jnp.zeros((1, 65), jnp.int32), TINY)


def test_cli_forward(capsys):
    from palm.cli import main
    assert main(["forward", "--preset", "tiny", "--seq-len", "8"]) == 0
    assert "logits (2, 8, 256) float32" in capsys.readouterr().out
