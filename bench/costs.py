"""FLOP and HBM-byte counts of each benchmarked operation, one small function per kernel.

Conventions, used for every implementation of the same math (ours, XLA's, JAX's bundled Pallas
ops, cuDNN) so that their achieved TFLOP/s and GB/s compare directly:
  * FLOPs: a matmul [M, K] x [K, N] is 2*M*N*K (one multiply and one add per term); attention
    forward is 4*B*T*S*H*K (q·kᵀ and p·v), halved when causal, and its backward 2.5x the
    forward (five matmuls to the forward's two). Elementwise work (LayerNorm, softmax, SiLU)
    is not counted, as in the papers we compare with; RoPE, which has no matmul, counts its
    3 flops per element.
  * Bytes: the minimum HBM traffic, every input read once and every output written once.
    Intermediates an implementation spills (scores, gates, K/V repeated per head) are its own
    cost and are deliberately not counted: that is what the fraction of roofline exposes.
  * "fwdbwd" is what a training step needs from a layer: the output y and the gradients of
    all differentiable inputs given a cotangent g, i.e. jax.vjp's forward and backward. Matmul
    layers count 3x their forward FLOPs (forward, dX, dW).

Dimension key: B batch, T query positions, S key positions, D model, H heads, K head dim,
F MLP hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses

PASSES = ("fwd", "fwdbwd")
_INT32 = 4


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; valid: {', '.join(PASSES)}")


def matmul_flops(m: int, n: int, k: int) -> float:
    """2*M*N*K for [M, K] x [K, N]."""
    return 2.0 * m * n * k


def rope(b: int, t: int, h: int, k: int, itemsize: int, pass_: str = "fwd") -> Cost:
    """RoPE on x [B, T, H, K] (H = 1 for the shared key head) with int32 positions [B, T].

    fwd:    flops 3*BTHK (x*cos + rot(x)*sin);      bytes (2*BTHK)*itemsize + 4*BT.
    fwdbwd: flops 6*BTHK (the backward rotates g back); bytes (4*BTHK)*itemsize + 4*BT
            (read x and g, write y and dx).
    """
    _check_pass(pass_)
    n = b * t * h * k
    if pass_ == "fwd":
        return Cost(3.0 * n, 2 * n * itemsize + _INT32 * b * t)
    return Cost(6.0 * n, 4 * n * itemsize + _INT32 * b * t)


def norm_qkv_rope(b: int, t: int, d: int, h: int, k: int, itemsize: int, pass_: str = "fwd") -> Cost:
    """LayerNorm(x [B, T, D]) projected by wq [D, H, K], wk, wv [D, K], RoPE on q and k.

    fwd:    flops 2*BT*D*(H+2)*K; bytes (BTD + D + D(H+2)K + BT(H+2)K)*itemsize + 4*BT.
    fwdbwd: flops 3x forward; bytes add the cotangents of q, k, v read and dx, d_scale, dwq,
            dwk, dwv written: (2*BTD + 2*D + 2*D(H+2)K + 2*BT(H+2)K)*itemsize + 4*BT.
    """
    _check_pass(pass_)
    m, n = b * t, (h + 2) * k
    flops = matmul_flops(m, n, d)
    once = m * d + d + d * n + m * n
    if pass_ == "fwd":
        return Cost(flops, once * itemsize + _INT32 * m)
    return Cost(3 * flops, 2 * once * itemsize + _INT32 * m)


def norm_swiglu(b: int, t: int, d: int, f: int, itemsize: int, pass_: str = "fwd") -> Cost:
    """silu(LN(x)·w_gate) * (LN(x)·w_up) for x [B, T, D], w_gate, w_up [D, F].

    fwd:    flops 2 * 2*BT*D*F;  bytes (BTD + D + 2DF + BTF)*itemsize.
    fwdbwd: flops 3x forward;    bytes 2x forward (dh read, dx, d_scale, dw_gate, dw_up written).
    """
    _check_pass(pass_)
    m = b * t
    flops = 2 * matmul_flops(m, f, d)
    once = (m * d + d + 2 * d * f + m * f) * itemsize
    return Cost(flops, once) if pass_ == "fwd" else Cost(3 * flops, 2 * once)


def block_in(b: int, t: int, d: int, h: int, k: int, f: int, itemsize: int, pass_: str = "fwd") -> Cost:
    """`norm_qkv_rope` and `norm_swiglu` on one LayerNorm: x and the scale are read once.

    fwd:    flops 2*BT*D*(H+2)*K + 2 * 2*BT*D*F;
            bytes (BTD + D + D(H+2)K + 2DF + BT(H+2)K + BTF)*itemsize + 4*BT.
    fwdbwd: flops 3x forward; bytes 2x forward, the int32 positions once.
    """
    _check_pass(pass_)
    m, n = b * t, (h + 2) * k
    flops = matmul_flops(m, n, d) + 2 * matmul_flops(m, f, d)
    once = (m * d + d + d * n + 2 * d * f + m * n + m * f) * itemsize
    return Cost(flops if pass_ == "fwd" else 3 * flops,
                (once if pass_ == "fwd" else 2 * once) + _INT32 * m)


def block_out(b: int, t: int, d: int, h: int, k: int, f: int, itemsize: int, pass_: str = "fwd") -> Cost:
    """x + o·wo + h·w_down for x [B, T, D], o [B, T, H, K], wo [H, K, D], h [B, T, F], w_down [F, D].

    fwd:    flops 2*BT*HK*D + 2*BT*F*D;  bytes (2*BTD + BTHK + HKD + BTF + FD)*itemsize.
    fwdbwd: flops 3x forward;            bytes 2x forward (g read; dx, do, dwo, dh, dw_down written).
    """
    _check_pass(pass_)
    m = b * t
    flops = matmul_flops(m, d, h * k) + matmul_flops(m, d, f)
    once = (2 * m * d + m * h * k + h * k * d + m * f + f * d) * itemsize
    return Cost(flops, once) if pass_ == "fwd" else Cost(3 * flops, 2 * once)


def mq_flash_attention(b: int, t: int, s: int, h: int, k: int, itemsize: int, *, causal: bool,
                       pass_: str = "fwd") -> Cost:
    """Multi-query attention, q [B, T, H, K] against one key/value head k, v [B, S, K].

    fwd:    flops 4*B*T*S*H*K (x 1/2 when causal); bytes (2*BTHK + 2*BSK)*itemsize (q, k, v
            read, o written).
    fwdbwd: flops 3.5x forward (backward = 2.5x); bytes (4*BTHK + 4*BSK)*itemsize (q, k, v, do
            read; o, dq, dk, dv written).
    """
    _check_pass(pass_)
    fwd = 4.0 * b * t * s * h * k * (0.5 if causal else 1.0)
    q_bytes, kv_bytes = b * t * h * k * itemsize, b * s * k * itemsize
    if pass_ == "fwd":
        return Cost(fwd, 2 * q_bytes + 2 * kv_bytes)
    return Cost(3.5 * fwd, 4 * q_bytes + 4 * kv_bytes)


def mq_decode_attention(b: int, s: int, h: int, k: int, itemsize: int) -> Cost:
    """One new token per sequence: q [B, H, K] against a full cache k, v [B, S, K].

    flops 4*B*H*S*K; bytes (2*BHK + 2*BSK)*itemsize + 4*B (q and lengths read, cache read once
    for all H heads, o written).
    """
    return Cost(4.0 * b * h * s * k, (2 * b * h * k + 2 * b * s * k) * itemsize + _INT32 * b)


def forward(tokens: int, model_flops_per_token: float, param_bytes: int, logits_bytes: int) -> Cost:
    """`palm.forward` on `tokens` token positions.

    flops: tokens * model_flops_per_token / 3, i.e. the forward third of PaLM Appendix B's
      6N + 12*L*H*K*T (causal masking not discounted, as in the paper).
    bytes: the parameters read once as stored, int32 tokens read, float32 logits written.
    """
    return Cost(tokens * model_flops_per_token / 3.0, param_bytes + _INT32 * tokens + logits_bytes)


def train_step(tokens: int, model_flops_per_token: float, state_bytes: int, batch_bytes: int) -> Cost:
    """One optimizer step on `tokens` trained positions.

    flops: tokens * model_flops_per_token (PaLM Appendix B: 6N + 12*L*H*K*T), the MFU numerator.
    bytes: the train state (parameters, optimizer moments, step, key) read and written once,
      plus the batch read: 2*state_bytes + batch_bytes.
    """
    return Cost(tokens * model_flops_per_token, 2 * state_bytes + batch_bytes)


def decode(batch: int, prompt: int, steps: int, *, matmul_params: int, param_bytes: int,
           layers: int, heads: int, head_dim: int, itemsize: int) -> Cost:
    """`palm.generate`: a prefill of B x P positions, then `steps` decode steps of one token
    per sequence (the last step's token is sampled, not fed, so steps - 1 are fed after the
    prefill's).

    flops: 2 * matmul_params per position fed (every weight once, the shared embedding as the
      logits matmul), plus attention 4*L*H*K per (query, key) pair: the causal prefill's
      B*P*(P+1)/2 pairs and, at step i, B*(P+i) pairs.
    bytes: the weights read once per pass (the prefill and each step), each step's cache read
      up to its current length and its new slot written (2*L*B*K*itemsize per slot: one K and
      one V head), the prefill's cache written. This is the "weight-and-cache read time" that
      decoding at small batch is bound by.
    """
    fed = steps - 1
    pairs = batch * prompt * (prompt + 1) / 2 + batch * sum(prompt + i for i in range(1, fed + 1))
    flops = 2.0 * matmul_params * batch * (prompt + fed) + 4.0 * layers * heads * head_dim * pairs
    slot = 2 * layers * batch * head_dim * itemsize
    cache = slot * (prompt + sum(prompt + i for i in range(1, fed + 1)) + fed)
    return Cost(flops, param_bytes * (1 + fed) + cache)
