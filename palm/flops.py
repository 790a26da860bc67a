"""Parameter and FLOP counts, and model FLOPs utilisation as PaLM defines it (Appendix B)."""

from __future__ import annotations

import math

import jax

from palm.config import Config
from palm.model import param_shapes

# Dense bf16 peak FLOP/s per chip from the datasheets (../shared/ANCHORS.md). Matched as
# substrings of `device.device_kind`, first match wins, so the more specific names come first.
PEAK_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def num_params(config: Config) -> int:
    """All parameters N, the embedding included (PaLM counts it: 8.63B, 62.50B, 540.35B)."""
    shapes = jax.tree.leaves(param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))
    return sum(math.prod(s) for s in shapes)


def flops_per_token(config: Config, seq_len: int) -> float:
    """Model FLOPs per trained token, PaLM Appendix B: 6N + 12*L*H*K*T.

    6N counts the forward (2N) and backward (4N) matmuls against every parameter; the second
    term the attention's q·k and p·v matmuls, forward and backward, over the full window
    (causal masking is not discounted, as in the paper). Rematerialisation is not counted:
    this is MFU, not hardware FLOPs utilisation.
    """
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6.0 * num_params(config) + attention


def lookup_device_kind(table, device: jax.Device | None = None) -> float | None:
    """The value of the first (substring, value) row of `table` whose substring is in the
    device's `device_kind` (the local device by default), or None when no row matches."""
    device = device or jax.devices()[0]
    for name, value in table:
        if name in device.device_kind:
            return value
    return None


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one chip, or None when the device kind is not in the table."""
    return lookup_device_kind(PEAK_FLOPS, device)


def mfu(tokens_per_second: float, config: Config, seq_len: int, peak_flops: float | None = None,
        *, num_devices: int | None = None) -> float:
    """Model FLOPs utilisation: tokens/s * FLOPs/token / (peak FLOP/s of all devices).

    Args:
      tokens_per_second: training throughput of the whole job.
      config, seq_len: the model and training window length.
      peak_flops: peak FLOP/s of one device; None looks the local device up in `PEAK_FLOPS`.
      num_devices: devices sharing the work; None means `jax.device_count()`.

    Raises:
      ValueError: the device kind is unknown and no peak_flops was given.
    """
    if peak_flops is None:
        peak_flops = device_peak_flops()
        if peak_flops is None:
            kind = jax.devices()[0].device_kind
            raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; pass peak_flops= "
                             f"(known: {', '.join(name for name, _ in PEAK_FLOPS)})")
    num_devices = jax.device_count() if num_devices is None else num_devices
    return tokens_per_second * flops_per_token(config, seq_len) / (peak_flops * num_devices)
