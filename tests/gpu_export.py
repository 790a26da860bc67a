"""Exporting for an NVIDIA GPU from a CPU machine: runs the Pallas-to-Triton and
Pallas-to-Mosaic-GPU lowerings.

The Triton and Mosaic GPU custom calls have no compatibility guarantee, so export refuses them
unless those checks are disabled; jax 0.11 also asks which GPU is targeted (an abstract mesh
names it). What runs is the whole lowering to Triton IR (which rejects non power-of-two arrays
and unsupported operations) or to the Mosaic GPU module (which checks layouts, shared-memory
transforms and wgmma shapes); only the GPU's compile to PTX is skipped.
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.extend
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from kernels import target_backend

H100 = "NVIDIA H100 80GB HBM3"
_TRITON_CALL = "__gpu$xla.gpu.triton"
_MOSAIC_GPU_CALL = "mosaic_gpu_v2"


@contextlib.contextmanager
def targeting(device_kind: str = H100):
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh), target_backend("gpu"):
        yield


def export_for_gpu(fn, *args, device_kind: str = H100) -> str:
    """Exports jit(fn) at args (ShapeDtypeStructs) for CUDA; returns the StableHLO text.

    Inside, `impl="auto"` and `interpret=None` resolve as on a GPU. Asserts the module holds
    Pallas kernels (Triton or Mosaic GPU), i.e. the Pallas kernels lowered natively.
    """
    with targeting(device_kind):
        exported = jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL),
                             jax.export.DisabledSafetyCheck.custom_call(_MOSAIC_GPU_CALL)])(*args)
    text = exported.mlir_module()
    assert _TRITON_CALL in text or _MOSAIC_GPU_CALL in text, "no Pallas kernel in the module"
    return text


def mosaic_gpu_kernel_count(text: str) -> int:
    """How many Mosaic GPU kernels an exported module calls (their names are inside the
    serialised modules)."""
    return len(re.findall(rf"custom_call @{_MOSAIC_GPU_CALL}\(", text))


def triton_kernel_names(text: str) -> list[str]:
    """Names of the Pallas Triton kernels in an exported module, in order of appearance."""
    return re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "([^"]+)"', text)


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def jaxpr_eqns(jaxpr):
    """Every equation of a jaxpr, those inside loops, branches and kernels included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _sub_jaxprs(eqn.params):
            yield from jaxpr_eqns(sub)


def unmasked_accesses(fn, *args) -> dict[str, list[str]]:
    """Per pallas_call in fn's jaxpr (by kernel name): the refs its body reads or writes
    without a mask (`ref[...]` rather than `pl_triton.load/store(..., mask=...)`), loops and
    branches included. The interpreter pads edge blocks and drops writes past an array, so a
    missing mask only shows on a GPU; this finds one on CPU."""
    found = {}
    for eqn in jaxpr_eqns(jax.make_jaxpr(fn)(*args).jaxpr):
        if eqn.primitive.name == "pallas_call":
            found[eqn.params["name"]] = sorted({
                f"{e.primitive.name} {e.invars[0].aval}" for e in jaxpr_eqns(eqn.params["jaxpr"])
                if e.primitive.name in ("get", "swap")})
    return found
