"""Sharding as data: logical axis names per weight, one rules table to mesh axes, the mesh,
placement, and a memory and communication plan that reads the same spec trees.

PaLM section 4 trains 540B on a 2-D mesh per pod: 12-way model (tensor) parallelism and
256-way fully sharded data parallelism (FSDP), with parameters and optimizer state sharded over
both axes. Here the mesh has axes ("data", "model"):

- "model" splits the parallel block Megatron-style: wq over heads H, w_gate and w_up over the
  MLP width F (column-parallel), wo over H and w_down over F (row-parallel), so attention and
  MLP outputs are partial sums that meet in one collective per layer (section 2: the parallel
  block shares it). wk and wv, the one multi-query head, are replicated over "model" as in the
  paper: they are 2*D*K per layer, too small to be worth splitting.
- "data" splits the batch, and every weight's model dimension D ("embed") for FSDP: every
  weight has a D dimension, and D divides the data axes we plan for (540B: 18432 = 72 * 256;
  8B: 4096 = 64 * 64).
- The embedding [V, D] is shared with the output projection, so its V dimension is the logits
  width: "vocab" goes over "model", which leaves each model shard the logits [M, V/model] (and
  only a max and a sum of the softmax to exchange) instead of partial logits [M, V] to all-
  reduce, and keeps the gathered table at V/model rows. V must then divide the model axis:
  the paper's 256,000 does not divide 12, so the 540B mesh needs the vocabulary padded (to
  256,008, say; Megatron does the same with --make-vocab-size-divisible-by).

Dimension key: B batch, T positions, D model, H heads, K head dim, F MLP hidden, V vocab,
L layers, M tokens per device (B*T/data, per microbatch when the batch is accumulated).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from palm.config import Config, preset
from palm.model import param_shapes
from palm.optim import make_optimizer

DATA, MODEL = "data", "model"

# One tuple of logical axis names per leaf dimension, beside palm.model.param_shapes (a test
# holds the two trees to the same structure and ranks).
LOGICAL_AXES = {
    "embed": ("vocab", "embed"),
    "blocks": {
        "norm_scale": ("layers", "embed"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_head_dim"),
        "wv": ("layers", "embed", "kv_head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    },
    "final_norm_scale": ("embed",),
}

# Logical name -> mesh axis (None: replicated). "layers" stays whole because lax.scan walks it.
RULES = {
    "layers": None,
    "embed": DATA,
    "heads": MODEL,
    "head_dim": None,
    "kv_head_dim": None,
    "mlp": MODEL,
    "vocab": MODEL,
}


def _is_names(x) -> bool:
    return isinstance(x, tuple)


def _spec(names: tuple[str, ...]) -> P:
    return P(*(RULES[name] for name in names))


def param_specs(config: Config) -> dict:
    """The params tree with a PartitionSpec per leaf, from LOGICAL_AXES through RULES.

    The specs are the same for every size; whether a mesh divides `config`'s shapes is
    `check_specs`'s question.
    """
    del config
    return jax.tree.map(_spec, LOGICAL_AXES, is_leaf=_is_names)


def _leaf_name(path) -> str:
    return "/".join(str(k.key) for k in path)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape) if not isinstance(mesh, dict) else mesh


def _check_divisible(name: str, shape: tuple[int, ...], spec: P, sizes: dict[str, int]) -> None:
    for dim, (size, axis) in enumerate(zip(shape, spec)):
        if axis is not None and size % sizes[axis]:
            raise ValueError(f"{name}: dimension {dim} of shape {shape} has size {size}, which the "
                             f"mesh axis {axis!r} of size {sizes[axis]} does not divide")


def check_specs(config: Config, mesh) -> None:
    """Raises ValueError naming the leaf, dimension and mesh axis of the first sharded
    dimension that the mesh does not divide.

    Args:
      mesh: a Mesh, or a dict of axis sizes {"data": ..., "model": ...} (for plans of meshes
        larger than this machine).
    """
    sizes = _mesh_sizes(mesh)
    jax.tree.map_with_path(
        lambda path, shape, spec: _check_divisible(_leaf_name(path), shape, spec, sizes),
        param_shapes(config), param_specs(config), is_leaf=_is_names)


def optimizer_specs(config: Config, opt_state_shapes):
    """PartitionSpecs for an optimizer state, following the params' specs.

    A state leaf belongs to the parameter whose key path ends its own path (optax keeps
    params-shaped trees inside its states: `[1].v['blocks']['wq']`). Of the same shape it
    takes the parameter's spec; with one dimension dropped (Adafactor's factored second
    moments) the spec drops that dimension too, the first that matches when two would; anything
    else (step counts, the (1,) placeholders of unfactored moments) is replicated.

    Args:
      config: the model configuration.
      opt_state_shapes: the optimizer state, or its `jax.eval_shape` (anything with .shape).
    """
    specs = {path: spec for path, spec in
             jax.tree_util.tree_flatten_with_path(param_specs(config))[0]}
    shapes = {path: shape for path, shape in
              jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=_is_names)[0]}

    def leaf_spec(path, leaf):
        shape = tuple(leaf.shape)
        for start in range(len(path)):
            if path[start:] in specs:
                param_path = path[start:]
                break
        else:
            return P()
        param_shape, spec = shapes[param_path], tuple(specs[param_path])
        if shape == param_shape:
            return P(*spec)
        for dim in range(len(param_shape)):
            if shape == param_shape[:dim] + param_shape[dim + 1:]:
                return P(*spec[:dim], *spec[dim + 1:])
        return P()

    return jax.tree.map_with_path(leaf_spec, opt_state_shapes)


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all of them).

    Both axes are Auto: the model is to wrap each layer in `shard_map` (kernels know nothing
    of meshes), which makes the axes manual inside and takes placements from its in_specs, and the glue around it (embedding lookup,
    loss) is left to the compiler's sharding propagation. Explicit axes would put shardings in
    the types of that glue and refuse every op whose output sharding is ambiguous, for nothing
    that shard_map needs.

    Raises:
      ValueError: data * model differs from the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    if data < 1 or model < 1 or data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; "
                         f"{len(devices)} given")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def shard(params: dict, mesh: Mesh, config: Config) -> dict:
    """Places params on the mesh as `param_specs` says (checked for divisibility first)."""
    check_specs(config, mesh)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config))
    return jax.device_put(params, shardings)


def _struct_tree(config: Config) -> dict:
    dtype = jnp.dtype(config.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(config),
                        is_leaf=_is_names)


def _per_device(shape, spec: P, sizes: dict[str, int]) -> int:
    """Elements of one device's shard."""
    return math.prod(shape) // math.prod(sizes[a] for a in spec if a is not None)


def _ring(group: int) -> float:
    """Fraction of a gathered (or scattered) array that each device receives in a ring
    all-gather or reduce-scatter over `group` devices; an all-reduce is twice that."""
    return (group - 1) / group


def activation_bytes(config: Config, *, tokens: int, model: int, remat: str) -> dict:
    """Per-device activation bytes of one training step; see `plan` for the model."""
    d, h, k, f = config.d_model, config.n_heads // model, config.head_dim, config.d_ff // model
    a = np.dtype(config.dtype).itemsize
    m = tokens
    tensors = {  # elements per device, all in the compute dtype but the float32 logsumexp
        "x": m * d // model, "xn": m * d, "q": m * h * k, "k": m * k, "v": m * k,
        "o": m * h * k, "gate": m * f, "up": m * f, "h": m * f,
    }
    saved_names = {"none": tuple(tensors), "dots": ("x", "q", "k", "v", "gate", "up"),
                   "full": ("x",)}[remat]
    lse = m * h * 4
    every = sum(tensors.values()) * a + lse
    saved = sum(tensors[n] for n in saved_names) * a + (lse if remat == "none" else 0)
    return {
        "saved_per_layer": saved,
        "layers": config.n_layers * saved,
        "recomputed_layer": every - saved,
        "logits": -(-tokens // model) * config.vocab_size * 4,  # M/model rows, rounded up
    }


def plan(config: Config, *, data: int, model: int, batch: int, seq_len: int | None = None,
         remat: str | None = None, microbatches: int = 1, optimizer=None) -> dict:
    """Per-device memory and per-step communication of training `config` on a data x model
    mesh, from `param_specs` and `optimizer_specs` (the trees `shard` places with) and shapes
    alone: nothing is allocated, so it answers for 540B on a laptop.

    Memory, in bytes per device:
    - params, gradients: each leaf's shard in `config.param_dtype` (gradients are reduce-
      scattered to the params' sharding, and microbatches add theirs into one buffer).
    - optimizer: optax's state for `optimizer` (default `palm.optim.make_optimizer()`), from
      `jax.eval_shape` of its init, each leaf sharded by `optimizer_specs`.
    - gathered_weights: one layer's weights all-gathered over "data" (still split over
      "model") in the compute dtype, plus the embedding's [V/model, D] for the logits; FSDP
      holds one layer's at a time.
    - activations, per layer and device, of one microbatch of M = batch*seq_len/(data*
      microbatches) tokens; compute dtype unless said. The layer input x [M, D/model] is
      kept split over "model" between layers (the paper's 2-D layout, Xu et al. 2021: whole,
      540B's saved inputs would take 71 GB per chip at batch 2048 on data=256). A block
      makes xn = LN(x) [M, D] (gathered), q [M, H/model, K], k and v [M, K], the attention
      output o [M, H/model, K] and its float32 logsumexp [M, H/model], gate, up and
      h = swish(gate)*up [M, F/model]. remat "none" saves all of them, "dots" x and the
      matmul outputs q, k, v, gate, up (the attention's q·k and p·v are batched dots, which
      dots_with_no_batch_dims_saveable does not keep), "full" only x. Under "dots" and
      "full" the backward of one layer holds the rest of that layer again (recomputed_layer).
      The loss holds float32 logits for M/model rows (each model shard takes its share of
      the rows, with all of V) once; their gradient is assumed to reuse the buffer.
    - total: the sum of params, optimizer, gradients, gathered_weights and activations.

    Communication, in bytes each device receives per step (ring collectives: an all-gather
    or reduce-scatter over g devices moves (g-1)/g of the full array per device, an all-
    reduce twice that):
    - fsdp_all_gather: every weight gathered over "data" in the compute dtype, forward and
      again in the backward (the gathered weights are not saved), once per microbatch.
    - grad_reduce_scatter: every gradient reduce-scattered over "data" in param_dtype, once
      per microbatch (the transpose of the all-gather does it).
    - replicated_grad_all_reduce: gradients of leaves not split over "model" (wk, wv, norm
      scales) are partial sums over its shards and all-reduced over it, on their data shard,
      once per microbatch.
    - layer_activations: per layer the all-gather of x [M, D] before the block and the
      reduce-scatter of its output (the paper's one all-reduce of the parallel block, as two
      halves), both transposed in the backward; remat other than "none" gathers x again.
    - logits_all_to_all: x [M, D/model] to rows [M/model, D] for the loss and back.

    Args:
      config: the model; its dtype and param_dtype set the byte sizes.
      data, model: the mesh axis sizes (any size: no devices are needed).
      batch: global batch in sequences, divisible by data.
      seq_len: tokens per sequence (default config.max_seq_len).
      remat: "none", "dots" or "full" (default config.remat).
      microbatches: gradient accumulation steps that split each device's batch.
      optimizer: an optax GradientTransformation (default palm.optim.make_optimizer()).

    Raises:
      ValueError: a sharded dimension does not divide its mesh axis, or the batch does not
        divide into data * microbatches.
    """
    seq_len = config.max_seq_len if seq_len is None else seq_len
    remat = config.remat if remat is None else remat
    optimizer = make_optimizer() if optimizer is None else optimizer
    sizes = {DATA: data, MODEL: model}
    check_specs(config, sizes)
    if microbatches < 1 or batch % (data * microbatches):
        raise ValueError(f"batch {batch} does not divide into data={data} x "
                         f"microbatches={microbatches}")
    tokens = batch * seq_len // (data * microbatches)
    param_bytes = np.dtype(config.param_dtype).itemsize
    compute_bytes = np.dtype(config.dtype).itemsize

    leaves = list(zip(
        jax.tree.leaves(param_shapes(config), is_leaf=_is_names),
        jax.tree.leaves(param_specs(config)),
        [path for path, _ in
         jax.tree_util.tree_flatten_with_path(LOGICAL_AXES, is_leaf=_is_names)[0]]))
    shard_elems = [_per_device(shape, spec, sizes) for shape, spec, _ in leaves]
    params = sum(shard_elems) * param_bytes

    state = jax.eval_shape(optimizer.init, _struct_tree(config))
    state_specs = optimizer_specs(config, state)
    optimizer_bytes = sum(
        _per_device(leaf.shape, spec, sizes) * leaf.dtype.itemsize
        for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(state_specs)))

    def model_split(spec):  # the shard a device holds once "data" is gathered
        return model if MODEL in spec else 1

    gathered = {"blocks": 0, "embed": 0}  # elements after the "data" all-gather
    for shape, spec, path in leaves:
        if path[0].key in gathered:
            gathered[path[0].key] += math.prod(shape) // model_split(spec)
    gathered_weights = (gathered["blocks"] // config.n_layers + gathered["embed"]) * compute_bytes

    acts = activation_bytes(config, tokens=tokens, model=model, remat=remat)
    activations = acts["layers"] + acts["recomputed_layer"] + acts["logits"]

    full_over_data = sum(math.prod(shape) // model_split(spec) for shape, spec, _ in leaves)
    replicated = sum(n for n, (_, spec, _) in zip(shard_elems, leaves) if MODEL not in spec)
    x_bytes = tokens * config.d_model * compute_bytes
    gathers_per_layer = 4 + (remat != "none")
    collectives = {
        "fsdp_all_gather": 2 * _ring(data) * full_over_data * compute_bytes,
        "grad_reduce_scatter": _ring(data) * full_over_data * param_bytes,
        "replicated_grad_all_reduce": 2 * _ring(model) * replicated * param_bytes,
        "layer_activations": config.n_layers * gathers_per_layer * _ring(model) * x_bytes,
        "logits_all_to_all": 2 * _ring(model) * x_bytes / model,
    }
    collectives = {name: microbatches * value for name, value in collectives.items()}
    memory = {"params": params, "optimizer": optimizer_bytes, "gradients": params,
              "gathered_weights": gathered_weights, "activations": activations}
    return {
        "mesh": {DATA: data, MODEL: model}, "batch": batch, "seq_len": seq_len, "remat": remat,
        "microbatches": microbatches, "tokens_per_microbatch": tokens,
        "memory": {**memory, "total": sum(memory.values())},
        "activation_detail": acts,
        "collectives": {**collectives, "total": sum(collectives.values())},
    }


def format_plan(result: dict, *, device_memory: float | None = None) -> str:
    """`plan`'s dict as a table of GiB per device, with the headroom left when the device's
    memory in bytes is given."""
    gib = 2 ** 30
    mesh = result["mesh"]
    lines = [f"mesh data={mesh[DATA]} x model={mesh[MODEL]}, batch {result['batch']} x "
             f"{result['seq_len']} tokens in {result['microbatches']} microbatch(es) of "
             f"{result['tokens_per_microbatch']} per device, remat={result['remat']}",
             "memory per device (GiB):"]
    lines += [f"  {name:<26}{value / gib:10.3f}" for name, value in result["memory"].items()]
    if device_memory is not None:
        lines.append(f"  {'free of ' + format(device_memory / gib, '.0f') + ' GiB':<26}"
                     f"{(device_memory - result['memory']['total']) / gib:10.3f}")
    lines.append("received per device per step (GiB):")
    lines += [f"  {name:<26}{value / gib:10.3f}" for name, value in result["collectives"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The `python -m palm plan` command: prints `format_plan`; bad input exits with code 2.

    args holds preset, vocab_size (None keeps the preset's; 256008 pads 540B's for model=12),
    data, model, batch_size, seq_len, microbatches, remat and device_memory_gib (or None).
    """
    try:
        config = preset(args.preset)
        if args.vocab_size is not None:
            config = dataclasses.replace(config, vocab_size=args.vocab_size)
        result = plan(config, data=args.data, model=args.model, batch=args.batch_size,
                      seq_len=args.seq_len, remat=args.remat, microbatches=args.microbatches)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    memory = None if args.device_memory_gib is None else args.device_memory_gib * 2 ** 30
    print(format_plan(result, device_memory=memory))
    return 0
