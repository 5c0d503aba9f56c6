"""Logical axis names, the default logical -> mesh rules, mesh construction and shardings.

The model names the axes of its parameters and activations with the constants below
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); a short rules table maps each
logical name to mesh axes. Without rules in scope the annotations are no-ops, so the same model
runs unchanged on one CPU. Parallelism is chosen by the mesh shape alone:

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  Megatron-style: heads, MLP and vocabulary dimensions split across devices
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# -- Logical axis names ------------------------------------------------------------------------
# Activations.
BATCH = "batch"  # B: the (global) batch
LENGTH = "length"  # T: query positions
CACHE_LENGTH = "cache_length"  # S: KV-cache slots
# Parameters (and the activations of the same width).
LAYERS = "layers"  # L: stacked decoder layers (scan_layers)
EMBED = "embed"  # D: hidden_size
EMBED_PROJ = "embed_proj"  # P: word_embed_proj_dim (the token-embedding width)
HEADS = "heads"  # N: attention heads
HEAD_DIM = "kv"  # H: per-head width
MLP = "mlp"  # F: ffn_dim
VOCAB = "vocab"  # V: vocab_size
POSITIONS = "positions"  # rows of the learned position table
CLASSES = "classes"  # outputs of the classification / QA heads

# -- Mesh axes ---------------------------------------------------------------------------------
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Priority-ordered: a rule applies only if its mesh axes are still free in that array, so the
# batch takes (data, fsdp) in activations and `embed` then stays unsharded there, while in
# parameters (which have no batch axis) `embed` is split by fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, (DATA, FSDP)),
    (VOCAB, TENSOR),
    (HEADS, TENSOR),
    (MLP, TENSOR),
    (EMBED, FSDP),
    (EMBED_PROJ, FSDP),
    (LENGTH, None),
    (CACHE_LENGTH, None),
    (HEAD_DIM, None),
    (POSITIONS, None),
    (LAYERS, None),
    (CLASSES, None),
)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    dcn_tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all).

    The first three sizes are within a slice (ICI / NVLink); the dcn_* sizes multiply them
    across slices or nodes (multi-slice TPU, multi-node GPU). One within-slice size may be -1:
    it takes the remaining devices.

    Raises:
      ValueError: a size is not an integer >= 1 (or -1 where allowed), naming it; or the
        sizes do not multiply to the device count.
    """
    sizes = dict(data=data, fsdp=fsdp, tensor=tensor)
    dcn_sizes = dict(dcn_data=dcn_data, dcn_fsdp=dcn_fsdp, dcn_tensor=dcn_tensor)
    for name, size in {**sizes, **dcn_sizes}.items():
        allowed = name in sizes and size == -1
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise ValueError(f"mesh size {name} must be an integer, got {size!r}")
        if size < 1 and not allowed:
            raise ValueError(
                f"mesh size {name} must be >= 1"
                + (" (or -1 for the remaining devices)" if name in sizes else "")
                + f", got {size}"
            )
    devices = list(jax.devices() if devices is None else devices)
    dcn = (dcn_data, dcn_fsdp, dcn_tensor)
    ici = [data, fsdp, tensor]
    per_slice, rem = divmod(len(devices), math.prod(dcn))
    if rem:
        raise ValueError(f"{len(devices)} devices cannot be split into dcn mesh {dcn}")
    if ici.count(-1) > 1:
        raise ValueError(
            f"at most one mesh size may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    if -1 in ici:
        known = math.prod(s for s in ici if s != -1)
        if per_slice % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, ici, strict=True))} do not divide the "
                f"{per_slice} devices of a slice"
            )
        ici[ici.index(-1)] = per_slice // known
    if math.prod(ici) != per_slice or min(ici) < 1:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, ici, strict=True))} x dcn "
            f"{dict(zip(MESH_AXES, dcn, strict=True))} needs "
            f"{math.prod(ici) * math.prod(dcn)} devices, there are {len(devices)}"
        )
    ici = tuple(ici)
    if math.prod(dcn) > 1 and (devices[0].platform == "tpu" or jax.process_count() > 1):
        from jax.experimental import mesh_utils

        # Slices (TPU) or processes (GPU nodes) are the granules the dcn axes run across.
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=devices[0].platform != "tpu"
        )
    else:
        # One process (or no dcn axes): the dcn blocks are emulated, outermost per axis.
        grid = np.array(devices).reshape(dcn + tuple(ici))
        grid = grid.transpose(0, 3, 1, 4, 2, 5).reshape(
            [d * i for d, i in zip(dcn, ici, strict=True)]
        )
    # Auto axis types: jax.make_mesh's default (Explicit) breaks the logical-rules style.
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
    """make_mesh from an ml_collections `mesh` group (data, fsdp, tensor, dcn_*)."""
    return make_mesh(
        mesh_config.data,
        mesh_config.fsdp,
        mesh_config.tensor,
        dcn_data=mesh_config.dcn_data,
        dcn_fsdp=mesh_config.dcn_fsdp,
        dcn_tensor=mesh_config.dcn_tensor,
    )


def rules_from_config(rules) -> tuple:
    """Normalises a rules table from a config (lists from JSON/ConfigDict) into tuples."""
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, (list, tuple)):
            mesh_axes = tuple(mesh_axes)
        out.append((logical, mesh_axes))
    return tuple(out)


def logical_to_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def check_divisible(abstract_tree, logical_specs, mesh_shape: dict, rules=DEFAULT_RULES) -> None:
    """Raises a ValueError naming the parameter, dimension and mesh axis of the first array
    dimension that its mesh axes do not divide evenly."""
    flat_specs = dict(
        jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=lambda x: isinstance(x, P))[0]
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
        spec = flat_specs.get(path)
        if spec is None:
            continue
        mesh_axes = nn.logical_to_mesh_axes(tuple(spec), list(rules))
        for dim, (size, axes, name) in enumerate(zip(leaf.shape, mesh_axes, spec, strict=False)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(mesh_shape[a] for a in axes)
            if size % ways:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)}: dimension {dim} ({name}, size "
                    f"{size}) is not divisible by mesh axis {'x'.join(axes)} of size {ways}"
                )


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Sharding of [B, T] input batches (ndim=1: [B] labels): batch over the mesh axes the
    rules give it."""
    spec = nn.logical_to_mesh_axes((BATCH, LENGTH)[:ndim] + (None,) * (ndim - 2), list(rules))
    return NamedSharding(mesh, spec)


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch is split."""
    axes = nn.logical_to_mesh_axes((BATCH,), list(rules))[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes of the largest per-device shard set of a tree of ShapeDtypeStructs."""
    total = 0
    for leaf, sharding in zip(
        jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True
    ):
        total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
    """Makes `mesh` and the logical rules current: jit-traced model code then applies its
    activation constraints (and KV-cache constraints) on this mesh."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield


def state_logical_specs(abstract_state, param_specs, params_field: str = "params"):
    """Logical specs of a train state: params from `param_specs`; optimizer-state leaves that
    mirror a parameter (Adam's moments) take that parameter's spec; everything else (counters,
    scalars) is replicated."""
    flat_params = {
        tuple(str(k) for k in path): spec
        for path, spec in jax.tree_util.tree_flatten_with_path(
            param_specs, is_leaf=lambda x: isinstance(x, P)
        )[0]
    }

    def spec_for(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            spec = flat_params.get(keys[start:])
            if spec is not None and len(spec) == len(leaf.shape):
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, abstract_state)


def sync(name: str) -> None:
    """A barrier across processes (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
