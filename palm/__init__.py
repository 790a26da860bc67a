"""PaLM in JAX on our own Pallas kernels: `palm.forward(params, tokens, config)` and friends."""

from palm.config import PRESETS, Config, preset
from palm.flops import device_peak_flops, flops_per_token, mfu, num_params
from palm.model import forward, init, loss, param_shapes

__all__ = [
    "PRESETS",
    "Config",
    "preset",
    "device_peak_flops",
    "flops_per_token",
    "mfu",
    "num_params",
    "forward",
    "init",
    "loss",
    "param_shapes",
]
