"""Rotary position embedding (Su et al. 2021) as PaLM uses it (section 2), rotate-half convention.

The first half of the head dimension K is paired with the second half: for i < K/2,
(x[i], x[i + K/2]) is rotated by the angle `position * base ** (-i / (K/2))`.

The front door `rope`; its plain-jnp twin `rope_reference` (reference.py); the Pallas TPU
kernel with its tiling (`BlockSizes`, `vmem_bytes`) and design notes (tpu.py); the Pallas GPU
(Triton) kernel with its own tiling (`kernels.rope.gpu.BlockSizes`) and design notes (gpu.py);
what the two share, the checks and the custom_vjp wiring over a backend module (pallas.py).
"""

from __future__ import annotations

import jax

from kernels._common import kernel_package, pallas_impl, resolve_impl
from kernels.rope.gpu import rope_pallas_gpu
from kernels.rope.reference import rope_reference
from kernels.rope.tpu import BlockSizes, rope_pallas_tpu, vmem_bytes

__all__ = ["BlockSizes", "rope", "rope_reference", "vmem_bytes"]

# Pallas implementations, each taking (x, positions, *, base, interpret, block_sizes).
_PALLAS = {"pallas_tpu": rope_pallas_tpu, "pallas_gpu": rope_pallas_gpu}


def rope(
    x: jax.Array,  # [B, T, H, K] or [B, T, K]
    positions: jax.Array,  # int [B, T]
    *,
    base: float = 10000.0,
    impl: str = "auto",
    interpret=None,
    block_sizes=None,
) -> jax.Array:
    """Rotary embedding, see the module docstring.

    Args:
      x: [B, T, H, K] or [B, T, K] queries or keys, K even.
      positions: int [B, T] absolute positions.
      base: the frequency base (PaLM: 10000).
      impl: "auto" | "xla" | "pallas_tpu" | "pallas_gpu" (`kernels._common.resolve_impl`).
      interpret: None (native where it compiles, interpret elsewhere), False or True.
      block_sizes: the Pallas tiling, `BlockSizes` (tpu.py) for pallas_tpu and
        `kernels.rope.gpu.BlockSizes` for pallas_gpu; None picks a default for the shape.
    """
    impl = resolve_impl(impl, "rope")
    if impl == "xla":
        return rope_reference(x, positions, base=base)
    fn = pallas_impl("rope", impl, _PALLAS)
    return fn(x, positions, base=base, interpret=interpret, block_sizes=block_sizes)


kernel_package(__name__, rope, _PALLAS)
