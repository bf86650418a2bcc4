"""The device mesh and how every parameter and batch is laid out on it: decided here, by rules.

Mesh axes: 'data' (pure data parallel), 'fsdp' (data parallel whose devices also split the
parameters and optimizer state), 'tensor' (splits heads / MLP width). The batch is split
over ('data', 'fsdp'). Layers name only logical axes (clip_jax.models.AXES); RULES maps
each logical axis to at most one mesh axis. A dimension that does not divide over its mesh
axis, or whose mesh axis is already used by another dimension of the same tensor, stays
whole (replicated) rather than failing: e.g. a 3-channel conv input on any mesh.
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# One rule per logical axis (MaxText's lesson: repeated rules make the result order-dependent).
RULES: dict[str, Optional[str]] = {
    "embed": "fsdp",
    "conv_out": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "layers": None,
    "conv_in": None,
}


# Activations: the batch dim over every data axis, heads and MLP width over 'tensor', the rest
# whole (clip_jax.models.layers.constrain). Their own names: a weight's 'embed' goes to 'fsdp'.
ACTIVATION_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_kv", None),
)


@contextlib.contextmanager
def activation_layouts(mesh: Mesh):
    """While tracing a step: the models' activation constraints resolve on `mesh` by
    ACTIVATION_RULES (outside it they are no-ops)."""
    import flax.linen as nn

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        yield


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'tensor'); one size may be -1 (all remaining devices).

    Raises a clear error, before anything compiles, when the sizes do not match the devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}: use {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into a mesh with fixed axes {sizes}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {sizes} holds {math.prod(sizes.values())} devices but there are {len(devices)} "
            f"({jax.process_count()} processes x {jax.local_device_count()} local): set the sizes to multiply to "
            f"{len(devices)}, or one of them to -1"
        )
    dims = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU / odd topologies: plain order
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh) -> None:
    n = batch_devices(mesh)
    if global_batch % n:
        raise ValueError(
            f"global batch {global_batch} does not divide over the {n} devices of the mesh's data axes "
            f"{dict((a, mesh.shape[a]) for a in BATCH_AXES)}: use a multiple of {n}"
        )


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules=None) -> P:
    """The PartitionSpec of one tensor from its logical axes and shape."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape.get(axis, 1) == 1 or dim % mesh.shape[axis]:
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    return P(*out)


def init_shardings(init_fn, mesh: Mesh, rules=None, boxed=None):
    """NamedSharding for every variable `init_fn(rng)` makes (boxed with logical axes), by the rules.
    `boxed`: jax.eval_shape of init_fn where the caller traced it already."""
    import flax.linen as nn

    if boxed is None:
        boxed = jax.eval_shape(init_fn, jax.random.key(0))
    shapes, specs = nn.meta.unbox(boxed), nn.get_partition_spec(boxed)

    def one(spec, shape):
        logical = tuple(spec) if spec is not None else (None,) * len(shape.shape)
        return NamedSharding(mesh, spec_for(logical, shape.shape, mesh, rules))

    return jax.tree_util.tree_map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def sharded_init_fn(init_fn, mesh: Mesh, rng, rules=None, boxed=None):
    """(variables, shardings): `init_fn(rng)` run directly in its shardings, so the full state
    never sits on one device."""
    import flax.linen as nn

    shardings = init_shardings(init_fn, mesh, rules, boxed)
    return jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng), shardings


def variable_shardings(model, mesh: Mesh, rules=None):
    """NamedSharding for every variable of a CLIP `model` (params, batch_stats), by the rules."""
    from clip_jax.models import dummy_inputs

    return init_shardings(lambda r: model.init(r, *dummy_inputs(model)), mesh, rules)


def sharded_init(model, mesh: Mesh, rng, rules=None):
    """A CLIP `model`'s variables initialized directly in their shardings."""
    from clip_jax.models import dummy_inputs

    return sharded_init_fn(lambda r: model.init(r, *dummy_inputs(model)), mesh, rng, rules)


def slow_all_gather(mesh: Mesh) -> bool:
    """Whether an all-gather should go as a psum on this mesh: XLA:CPU across processes, whose
    gloo all-gather is pathologically slow (clip_jax.methods.losses: gather_by_sum)."""
    return mesh.devices.flat[0].platform == "cpu" and jax.process_count() > 1
