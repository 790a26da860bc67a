"""The model's one configuration: a frozen dataclass, with the paper's sizes as presets."""

from __future__ import annotations

import dataclasses

import ml_dtypes  # bfloat16 for NumPy; a dependency of jax, and imported without it
import numpy as np

REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class Config:
    """PaLM hyper-parameters. Frozen and hashable, so it passes to `jax.jit` as a static argument.

    Variants come from `dataclasses.replace(preset("8b"), n_layers=2)`.
    """

    # 256k lossless SentencePiece vocabulary in the paper; the input embedding is shared with
    # the output projection, so this is also the logits width.
    vocab_size: int
    # Residual stream width D; the 1/sqrt(D) logit scale and the N(0, 1) embedding assume it.
    d_model: int
    # Number of parallel blocks L, stacked on a leading axis and run with `lax.scan`.
    n_layers: int
    # Query heads H; multi-query attention keeps a single key/value head whatever H is.
    n_heads: int
    # Head dimension K. PaLM keeps 256 at every size (Table 1) so that MQA's single K/V head
    # stays wide enough; it must be even for RoPE's rotate-half pairing.
    head_dim: int
    # MLP hidden width F; the paper uses 4*D with SwiGLU (which makes the MLP 3 matrices).
    d_ff: int
    # Longest sequence forward() accepts; PaLM trains on 2048-token windows.
    max_seq_len: int = 2048
    # LayerNorm epsilon; statistics are computed in float32 so a small eps is safe.
    norm_eps: float = 1e-6
    # RoPE frequency base (Su et al. 2021): positions rotate by pos * base**(-i/(K/2)).
    rope_base: float = 10000.0
    # Weight of the auxiliary z-loss mean(log(Z)^2), keeping the softmax normaliser near 0
    # (PaLM section 5: 1e-4) so bf16 logits stay well conditioned.
    z_loss_weight: float = 1e-4
    # Compute dtype of activations and matmul operands; accumulation is float32 throughout.
    dtype: str = "bfloat16"
    # Dtype of the master parameters (and of Adafactor's state): float32 for stable updates.
    param_dtype: str = "float32"
    # Activation rematerialisation per block: "none" keeps every activation, "full" recomputes
    # the block in the backward pass, "dots" saves only matmul outputs (a middle ground).
    remat: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"Config.head_dim must be even for RoPE, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Config.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        # Canonical dtype names keep the config hashable, comparable and JSON-serialisable.
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                canonical = np.dtype(getattr(ml_dtypes, value, value) if isinstance(value, str)
                                     else value).name
            except TypeError as e:
                raise ValueError(f"Config.{name}: not a dtype: {getattr(self, name)!r}") from e
            object.__setattr__(self, name, canonical)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PAPER = dict(vocab_size=256_000, head_dim=256, max_seq_len=2048)

PRESETS = {
    # PaLM Table 1.
    "8b": Config(d_model=4096, n_layers=32, n_heads=16, d_ff=4 * 4096, **_PAPER),
    "62b": Config(d_model=8192, n_layers=64, n_heads=32, d_ff=4 * 8192, **_PAPER),
    "540b": Config(d_model=18432, n_layers=118, n_heads=48, d_ff=4 * 18432, **_PAPER),
    # PaLM-shaped at one GPU's size (issue 9's whole-model benchmark): the paper's head dim,
    # vocabulary and 4*D MLP at D=2048; 0.96B parameters in the 16 blocks plus 0.52B in the
    # shared embedding (1.48B). Its training state (float32 master weights and Adafactor
    # moments) is 18 GB; a whole step at B=1, T=2048 about 47 GB, at B=2 about 67 GB (XLA's
    # buffer assignment, compiled on CPU), so B=1 on an 80 GB H100.
    "1b": Config(d_model=2048, n_layers=16, n_heads=8, d_ff=4 * 2048, **_PAPER),
    # Unit tests: every code path, a fraction of a second on CPU. float32 because CPUs have no
    # bf16 matrix units and the tests compare against float64.
    "tiny": Config(vocab_size=256, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=256,
                   max_seq_len=64, dtype="float32"),
    # The training demo: about 5M parameters that learn visibly on 2 CPU cores in minutes.
    "demo": Config(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=1024,
                   max_seq_len=256, dtype="float32"),
}


def preset(name: str) -> Config:
    """One of the paper's Table 1 configs ("8b", "62b", "540b"), the one-GPU "1b", or a small one
    ("tiny", "demo")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]
