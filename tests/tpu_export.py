"""Exporting for a real TPU from a CPU machine: runs the Pallas-to-Mosaic lowering.

Only libtpu's final compile is skipped, so illegal block shapes and unsupported operations
are caught here. Some lowering rules ask which TPU generation they target; an abstract mesh
names it (../shared/JAX_NOTES.md).
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

# The generations we claim; device_kind strings as the TPU runtime reports them.
TPU_GENERATIONS = ("TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6 lite")


@contextlib.contextmanager
def targeting(device_kind: str = "TPU v5p"):
    device = AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def export_for_tpu(fn, *args, device_kind: str = "TPU v5p") -> str:
    """Exports jit(fn) at args (ShapeDtypeStructs) for TPU; returns the StableHLO text.

    Asserts the module holds Mosaic custom calls, i.e. the Pallas kernels lowered natively
    (a kernel traced with interpret on would lower to plain HLO instead).
    """
    with targeting(device_kind):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    text = exported.mlir_module()
    assert "tpu_custom_call" in text, "no Mosaic kernel in the exported module"
    return text


def mosaic_kernel_names(text: str) -> list[str]:
    """Names of the Pallas kernels in an exported module, in order of appearance."""
    import re
    return re.findall(r'kernel_name = "([^"]+)"', text)
