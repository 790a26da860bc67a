"""The MLP half's input side: LayerNorm, both MLP input projections and the SwiGLU gate.

PaLM (section 2) uses SwiGLU, `silu(h·w_gate) * (h·w_up)`; fused, the [.., 2F] pre-activations
never reach HBM.

The front door `norm_swiglu`; its plain-jnp twin `norm_swiglu_reference` and the hand-written
backward `norm_swiglu_reference_bwd` (reference.py); the Pallas TPU kernels with their tiling
(`BlockSizes`, `vmem_bytes`), HBM and VMEM numbers and design notes (tpu.py); the Pallas GPU
(Triton) kernels, `impl="pallas_gpu"`, with their own tiling (`gpu.BlockSizes`,
`gpu.shared_memory_bytes`) and the same residuals and backward decomposition (gpu.py); the
Mosaic GPU (Hopper) kernels, forward and backward but the saved-gates one (Triton's),
`impl="pallas_mosaic_gpu"`, and its `mgpu.BlockSizes` (mgpu.py); what the Pallas backends
share, the custom_vjp over a backend module and the interface each backend provides
(pallas.py).
"""

from __future__ import annotations

import jax

from kernels._common import kernel_package, pallas_impl, resolve_impl
from kernels.norm_swiglu.gpu import norm_swiglu_pallas_gpu
from kernels.norm_swiglu.mgpu import norm_swiglu_pallas_mosaic_gpu
from kernels.norm_swiglu.reference import norm_swiglu_reference, norm_swiglu_reference_bwd
from kernels.norm_swiglu.tpu import BlockSizes, norm_swiglu_pallas_tpu, vmem_bytes

__all__ = ["BlockSizes", "norm_swiglu", "norm_swiglu_reference", "norm_swiglu_reference_bwd",
           "vmem_bytes"]


# Pallas implementations, each taking the reference's arguments plus interpret, block_sizes and
# save_gate_up (a tpu.BlockSizes for pallas_tpu, a gpu.BlockSizes for pallas_gpu, an
# mgpu.BlockSizes for pallas_mosaic_gpu).
_PALLAS = {"pallas_tpu": norm_swiglu_pallas_tpu, "pallas_gpu": norm_swiglu_pallas_gpu,
           "pallas_mosaic_gpu": norm_swiglu_pallas_mosaic_gpu}


def norm_swiglu(
    x: jax.Array,  # [B, T, D]
    norm_scale: jax.Array,  # [D]
    w_gate: jax.Array,  # [D, F]
    w_up: jax.Array,  # [D, F]
    *,
    eps: float,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
    save_gate_up: bool = False,
) -> jax.Array:
    """SwiGLU hidden activations of LayerNorm(x).

    Args:
      x: [B, T, D] the residual stream.
      norm_scale: [D] LayerNorm scale (no bias).
      w_gate, w_up: [D, F] the two MLP input projections.
      eps: LayerNorm epsilon.
      impl, interpret, block_sizes: see `kernels.rope.rope`.
      save_gate_up: Pallas only: the forward also writes the pre-activations gate and up
        ([B*T, F] each, x's dtype) and the backward reads them instead of recomputing both
        projections (4*B*T*D*F fewer FLOPs, 2*B*T*F more elements kept for the backward; the
        trade-off and its interplay with `jax.checkpoint` are in tpu.py's docstring). The xla
        reference ignores it: XLA's autodiff decides itself what to keep.

    Returns:
      [B, T, F] in x's dtype.
    """
    impl = resolve_impl(impl, "norm_swiglu", x.dtype)
    if impl == "xla":
        return norm_swiglu_reference(x, norm_scale, w_gate, w_up, eps=eps)
    fn = pallas_impl("norm_swiglu", impl, _PALLAS)
    return fn(x, norm_scale, w_gate, w_up, eps=eps, interpret=interpret, block_sizes=block_sizes,
              save_gate_up=save_gate_up)


kernel_package(__name__, norm_swiglu, _PALLAS)
