"""The parallel block's output side: `x + o·wo + h·w_down` in one pass.

PaLM's parallel formulation (section 2) sums the attention and MLP outputs into the residual;
both output projections contract into one accumulator and the residual joins in the epilogue,
so the block writes its result once.

The front door `block_out`; its plain-jnp twin `block_out_reference` and the hand-written
backward `block_out_reference_bwd` (reference.py); the Pallas TPU kernels with their tiling
(`BlockSizes`, `vmem_bytes`), HBM and VMEM numbers and design notes (tpu.py); the Pallas GPU
(Triton) kernels, `impl="pallas_gpu"`, with their own tiling (`gpu.BlockSizes`,
`gpu.shared_memory_bytes`) and the same residuals and backward decomposition (gpu.py); the Mosaic
GPU (Hopper) forward and activation gradients, `impl="pallas_mosaic_gpu"`, and its
`mgpu.BlockSizes` (mgpu.py); what they share, the checks, the jit and the custom_vjp wiring
over a backend module (pallas.py).
"""

from __future__ import annotations

import jax

from kernels._common import kernel_package, pallas_impl, resolve_impl
from kernels.block_out.gpu import block_out_pallas_gpu
from kernels.block_out.mgpu import block_out_pallas_mosaic_gpu
from kernels.block_out.reference import block_out_reference, block_out_reference_bwd
from kernels.block_out.tpu import BlockSizes, block_out_pallas_tpu, vmem_bytes

__all__ = ["BlockSizes", "block_out", "block_out_reference", "block_out_reference_bwd",
           "vmem_bytes"]


# Pallas implementations, each taking the reference's arguments plus interpret and block_sizes
# (a tpu.BlockSizes for pallas_tpu, a gpu.BlockSizes for pallas_gpu).
_PALLAS = {"pallas_tpu": block_out_pallas_tpu, "pallas_gpu": block_out_pallas_gpu,
           "pallas_mosaic_gpu": block_out_pallas_mosaic_gpu}


def block_out(
    x: jax.Array,  # [B, T, D]
    o: jax.Array,  # [B, T, H, K]
    wo: jax.Array,  # [H, K, D]
    h: jax.Array,  # [B, T, F]
    w_down: jax.Array,  # [F, D]
    *,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """The parallel block's result `x + o·wo + h·w_down`.

    Args:
      x: [B, T, D] the residual stream (block input).
      o: [B, T, H, K] attention output per head; wo: [H, K, D].
      h: [B, T, F] SwiGLU activations; w_down: [F, D].
      impl, interpret, block_sizes: see `kernels.rope.rope`.

    Returns:
      [B, T, D] in x's dtype.
    """
    impl = resolve_impl(impl, "block_out", x.dtype)
    if impl == "xla":
        return block_out_reference(x, o, wo, h, w_down)
    fn = pallas_impl("block_out", impl, _PALLAS)
    return fn(x, o, wo, h, w_down, interpret=interpret, block_sizes=block_sizes)


kernel_package(__name__, block_out, _PALLAS)
