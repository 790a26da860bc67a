"""PaLM in JAX on our own Pallas kernels: `palm.forward(params, tokens, config)` and friends.

The names below load on first use (PEP 562), so `python -m palm --help` and `import palm.config`
do not pay for importing JAX. No module of the package shares a name with one of them: importing
a submodule sets the package attribute of its name, which would shadow the function (hence
`palm.generate` lives in palm/decoding.py).
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
    "generate": "palm.decoding",
    "evaluate": "palm.evaluation",
    "perplexity": "palm.evaluation",
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
