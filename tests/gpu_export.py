"""Exporting for an NVIDIA GPU from a CPU machine: runs the Pallas-to-Triton lowering.

The Triton custom call has no compatibility guarantee, so export refuses it unless that check
is disabled; jax 0.11 also asks which GPU is targeted (an abstract mesh names it). What runs is
the whole lowering to Triton IR, which rejects non power-of-two arrays and unsupported
operations; only the GPU's compile of that IR to PTX is skipped.
"""

from __future__ import annotations

import contextlib
import re

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from kernels import target_backend

H100 = "NVIDIA H100 80GB HBM3"
_TRITON_CALL = "__gpu$xla.gpu.triton"


@contextlib.contextmanager
def targeting(device_kind: str = H100):
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh), target_backend("gpu"):
        yield


def export_for_gpu(fn, *args, device_kind: str = H100) -> str:
    """Exports jit(fn) at args (ShapeDtypeStructs) for CUDA; returns the StableHLO text.

    Inside, `impl="auto"` and `interpret=None` resolve as on a GPU. Asserts the module holds
    Triton kernels, i.e. the Pallas kernels lowered natively.
    """
    with targeting(device_kind):
        exported = jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)
    text = exported.mlir_module()
    assert _TRITON_CALL in text, "no Triton kernel in the exported module"
    return text


def triton_kernel_names(text: str) -> list[str]:
    """Names of the Pallas Triton kernels in an exported module, in order of appearance."""
    return re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "([^"]+)"', text)
