"""A training run's settings as plain frozen dataclasses, importable without JAX (the command
line reads their defaults for --help)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Section 5's settings; only the schedule is scaled for small models."""

    # Peak learning rate (a relative step size: Adafactor multiplies it by each parameter's
    # RMS). The paper uses 1e-2.
    learning_rate: float = 1e-2
    # Linear warm-up steps from 0; the paper uses none (Adafactor's beta2 schedule is already a
    # warm-up), small models trained briefly benefit from a few.
    warmup_steps: int = 0
    # Constant until this step, then lr * sqrt(decay_start / k): with 1e-2 and 10k this is the
    # paper's "1e-2 for 10k steps, then 1/sqrt(k)".
    decay_start: int = 10_000
    beta1: float = 0.9
    # beta2 = 1 - k^-decay_rate.
    decay_rate: float = 0.8
    # Update clipping: RMS of each parameter matrix's update at most this.
    update_clip: float = 1.0
    # Global-norm gradient clipping.
    grad_clip: float = 1.0
    # Decoupled weight decay of lr(k)^power per step (the paper: lr^2).
    weight_decay_power: float = 2.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.decay_start < 1:
            raise ValueError(f"need warmup_steps >= 0 and decay_start >= 1, got "
                             f"{self.warmup_steps}, {self.decay_start}")


class TrainError(Exception):
    """Bad input to a training run, reported to the user with exit code 2."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run's settings (the model's are in `palm.Config`)."""

    steps: int = 300
    # Global batch in sequences, and tokens per sequence (windows hold seq_len + 1).
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    impl: str = "auto"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # Loss-spike remedy (section 5.1): when the loss is non-finite or above spike_factor times
    # its mean over the last spike_window steps, go back to the last checkpoint and skip the
    # next spike_skip_batches batches. None disables it.
    spike_factor: float | None = None
    spike_window: int = 50
    spike_skip_batches: int = 200
    max_rewinds: int = 5
    # Peak FLOP/s of one device for MFU; None looks the device up (palm.flops.PEAK_FLOPS).
    peak_flops: float | None = None
    # Device mesh (data, model) axis sizes, e.g. (2, 4) from `--mesh data=2,model=4`; None runs
    # on one device. Their product must be the device count (palm.sharding.make_mesh).
    mesh: tuple[int, int] | None = None
    # With a mesh: wo, w_down and the embedding computed shard by shard round a ring of
    # ppermutes over "data" instead of all-gathered (palm.collective; `palm.forward`'s
    # collective_matmul). Same results; how the schedule overlaps them is the hardware's.
    collective_matmul: bool = False
    # Greedy sample printed at the end.
    sample_prompt: str = "def __init__(self"
    sample_tokens: int = 48

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "spike_window"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.mesh is not None and (len(self.mesh) != 2 or min(self.mesh) < 1):
            raise TrainError(f"mesh must be (data, model) sizes >= 1, got {self.mesh}")
        if self.collective_matmul and self.mesh is None:
            raise TrainError("--collective-matmul replaces all-gathers over a mesh's data axis: "
                             "it needs --mesh")


def parse_mesh(text: str) -> tuple[int, int]:
    """`--mesh data=D,model=M` (either order) -> (D, M); TrainError on anything else."""
    error = TrainError(f"--mesh {text!r}: expected data=D,model=M with positive integers, "
                       "e.g. data=2,model=4")
    sizes = {}
    for part in text.split(","):
        name, _, size = part.strip().partition("=")
        if name not in ("data", "model") or name in sizes or not size.strip().isdigit():
            raise error
        sizes[name] = int(size)
    if len(sizes) != 2 or min(sizes.values()) < 1:
        raise error
    return sizes["data"], sizes["model"]
