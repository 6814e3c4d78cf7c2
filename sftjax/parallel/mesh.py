"""Mesh creation, logical-axis rules and the divisibility pre-flight.

Parameters are annotated with logical axes in the model; a short rule table (`mesh.rules` in the
config, default `RULES`) maps them onto the (data, fsdp, tensor) mesh. A logical axis missing from
the table, or a dimension that its mesh axes do not divide, raises with the parameter path and
shapes (no silent replication).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sftjax.config import MESH_AXES as AXES
from sftjax.config import MESH_RULES as RULES
from sftjax.errors import UserError
from sftjax.params import flatten, unflatten


def rules_from(mesh_cfg) -> dict[str, tuple[str, ...]]:
    """The validated `mesh.rules` section as a plain {logical axis: mesh axes} dict."""
    rules = mesh_cfg.get("rules", RULES)
    return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in dict(rules).items()}


def mesh_sizes(mesh_cfg, n: int) -> dict[str, int]:
    """mesh.data/fsdp/tensor for `n` devices; one size may be -1 (fill the rest)."""
    sizes = [int(mesh_cfg[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise UserError("mesh: at most one of mesh.data/fsdp/tensor may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise UserError(f"mesh: {n} devices cannot be split with the fixed axes of size {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) > n:
        raise UserError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are only {n} devices")
    return dict(zip(AXES, sizes, strict=True))


def make_mesh(mesh_cfg) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices (see `mesh_sizes`)."""
    sizes = tuple(mesh_sizes(mesh_cfg, jax.device_count()).values())
    # A mesh smaller than the machine uses the first devices (e.g. a 1-device baseline run).
    return jax.make_mesh(sizes, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[: math.prod(sizes)])


def check_batch(mesh, micro_batch: int, rules: Mapping = RULES) -> None:
    """A micro-batch must split evenly over the data-parallel devices (the `batch` rule's axes)."""
    dp = math.prod(mesh.shape[a] for a in rules["batch"])
    if micro_batch % dp:
        raise UserError(f"train.batch_size: micro-batch {micro_batch} is not divisible by the data-parallel size {dp} "
                        f"(mesh axes {tuple(rules['batch'])})")


def check_heads(mesh, num_heads: int, rules: Mapping = RULES) -> None:
    """The `heads` rule's devices must divide the attention heads, or every head would be cut between
    devices and attention would run whole on each of them (GSPMD accepts it, silently wasting the
    tensor axis). Fewer KV heads than devices is fine (grouped-query models): they are replicated."""
    live, size = _live_axes(rules["heads"], mesh)
    if num_heads % size:
        axes = "*".join(f"mesh.{a}" for a in live)
        raise UserError(f"{axes}: {size} devices do not divide the model's {num_heads} attention heads "
                        f"(num_attention_heads); choose a size that divides {num_heads}")


def logical_axes(model, example_ids) -> dict:
    """Logical axis names of every parameter, read off the model's init without running it."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example_ids))["params"]
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _live_axes(mesh_axes, mesh) -> tuple[tuple[str, ...], int]:
    """The rule's mesh axes that actually split something (size > 1), and their total size."""
    live = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
    return live, math.prod(mesh.shape[a] for a in live)


def spec_for(path: str, shape: tuple[int, ...], axes: tuple, mesh, rules: Mapping = RULES) -> PartitionSpec:
    if len(axes) != len(shape):
        raise UserError(f"sharding: {path} has shape {shape} but logical axes {axes}")
    out = []
    for dim, name in zip(shape, axes, strict=True):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise UserError(f"sharding: {path}: logical axis {name!r} has no rule in mesh.rules")
        mesh_axes, size = _live_axes(rules[name], mesh)
        if dim % size:
            raise UserError(f"mesh: parameter {path} shape {shape}: dimension {name}={dim} is not divisible "
                            f"by mesh axes {mesh_axes} of total size {size}; change the mesh.* sizes")
        out.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*out)


def param_shardings(tree: Mapping, axes: Mapping, mesh, rules: Mapping = RULES) -> dict:
    """NamedSharding for each leaf of `tree` (arrays or ShapeDtypeStructs) from its logical axes."""
    flat_axes = flatten(axes)
    out = {}
    for path, x in flatten(tree).items():
        if path not in flat_axes:
            raise UserError(f"sharding: parameter {path} has no logical axes")
        out[path] = NamedSharding(mesh, spec_for(path, tuple(x.shape), flat_axes[path], mesh, rules))
    return unflatten(out)


@dataclass(frozen=True)
class ActivationLayout:
    """Where activations live on the mesh, handed to the model (`models.llama.Runtime.layout`) so it
    can pin its layer inputs, attention heads and MLP hidden units by logical name (batch, length,
    heads, kv, mlp) instead of leaving the layout to XLA's propagation. `rules` is
    ((logical, mesh axes), ...) so the layout is hashable, as Flax module attributes must be."""

    mesh: jax.sharding.Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def pin(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """with_sharding_constraint by logical axes. Unlike parameters (`spec_for`), an activation
        dimension its mesh axes do not divide (a batch of 1 when decoding, 3 KV heads on 4 tensor
        devices) is left unconstrained: that is a valid layout, not a mistake."""
        rules = dict(self.rules)
        spec = []
        for dim, name in zip(x.shape, axes, strict=True):
            live, size = _live_axes(rules.get(name, ()) if name else (), self.mesh)
            spec.append(live if live and dim % size == 0 else None)
        if all(s is None for s in spec):
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))


def batch_sharding(mesh, rules: Mapping = RULES) -> NamedSharding:
    """Batches split their rows over the mesh axes of the `batch` rule (data and fsdp by default)."""
    return NamedSharding(mesh, PartitionSpec(tuple(rules["batch"]) or None))


def place(tree: Mapping, shardings: Mapping) -> dict:
    """Host leaves -> global jax Arrays; each device gets only its own slice.

    A lazy leaf (`io/lazy.Lazy`) is asked, in one call, for the distinct slices this process's
    devices hold and nothing else, so a process never holds more of the model than its share
    plus what a source needs to produce it (one tensor, at most). A numpy array is sliced; a
    jax Array (computed on the mesh already) is moved with `device_put`."""
    from sftjax.io.lazy import Lazy, key

    def one(x, s):
        if isinstance(x, jax.Array):
            return jax.device_put(x, s)
        if not isinstance(x, Lazy):
            return jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx])
        wanted = {key(i): i for i in s.addressable_devices_indices_map(tuple(x.shape)).values()}
        parts = dict(zip(wanted, x.read_many(list(wanted.values())), strict=True))
        return jax.make_array_from_callback(tuple(x.shape), s, lambda idx: parts[key(idx)])

    return jax.tree.map(one, tree, shardings)


def place_batch(batch: Mapping[str, np.ndarray], mesh, local: bool = False, rules: Mapping = RULES) -> dict:
    """Host batch -> global arrays sharded along (data, fsdp).

    `local=False`: every process holds the whole global batch and contributes its rows.
    `local=True`: each process holds only its own rows (the training loader's batches), and the
    global batch is the processes' rows in process order.
    """
    sharding = batch_sharding(mesh, rules)
    n_proc, pid = jax.process_count(), jax.process_index()
    out = {}
    for k, v in batch.items():
        if local:
            out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n_proc, *v.shape[1:]))
        else:
            per = v.shape[0] // n_proc
            out[k] = jax.make_array_from_process_local_data(sharding, v[pid * per:(pid + 1) * per], v.shape)
    return out
