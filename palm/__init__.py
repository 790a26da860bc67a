"""PaLM in JAX on our own Pallas kernels: `palm.forward(params, tokens, config)` and friends.

The names below load on first use (PEP 562), so `python -m palm --help` and `import palm.config`
do not pay for importing JAX.
"""

import importlib

from palm.config import PRESETS, Config, preset

_LAZY = {
    "device_peak_flops": "palm.flops",
    "flops_per_token": "palm.flops",
    "mfu": "palm.flops",
    "num_params": "palm.flops",
    "forward": "palm.model",
    "init": "palm.model",
    "loss": "palm.model",
    "param_shapes": "palm.model",
    "generate": "palm.generate",
    "make_mesh": "palm.sharding",
    "param_specs": "palm.sharding",
    "plan": "palm.sharding",
    "shard": "palm.sharding",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'palm' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["PRESETS", "Config", "preset", *_LAZY]
