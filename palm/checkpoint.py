"""Training checkpoints with orbax: the train state as arrays plus a JSON record beside it.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-write never leaves a checkpoint that looks valid; the manager keeps the last few.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not match the run trying to use it."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint written by a run of another configuration."""


def _one_line(e: Exception, limit: int = 160) -> str:
    """The exception's type and first line, shortened: orbax and TensorStore errors run to
    dozens of lines of internals that say nothing to the user."""
    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > limit:
        first = first[:limit - 3] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class Checkpointer:
    """Saves and restores {"state": pytree of arrays, "meta": JSON dict} by step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; the training step goes on while it writes."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores step `step` into the structure, shapes and dtypes of `abstract_state`."""
        self.wait()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 -- orbax raises many types for damaged files
            raise CheckpointError(f"cannot restore checkpoint step {step} from {self.directory}: "
                                  f"{_one_line(e)}") from e
        return restored["state"], dict(restored["meta"])

    def read_meta(self, step: int) -> dict:
        self.wait()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint step {step} in {self.directory}: "
                                  f"{_one_line(e)}") from e
        return dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for a pytree of arrays (or of their `jax.eval_shape`), as restore wants
    them: restore places each leaf by its struct's sharding, whatever mesh or device the
    checkpoint was written from (orbax reads each device's slice of the saved array).

    Args:
      tree: arrays, or anything with .shape and .dtype.
      shardings: one Sharding for every leaf, or a tree of them like `tree`; None keeps each
        array's own (`tree` must then hold placed jax.Arrays).
    """
    if shardings is None:
        shardings = jax.tree.map(lambda a: a.sharding, tree)
    elif isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)
