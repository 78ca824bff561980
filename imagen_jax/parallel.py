"""Device mesh, logical-axis rules and shardings, multi-host initialisation.

Three layers, as data: physical mesh axes (data, fsdp, tensor) sized by the config; logical-to-mesh
rules in the config; logical names on every parameter (models/, text/) and activation.
"""
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    pass


def maybe_initialize_distributed():
    """Calls jax.distributed.initialize() when IMAGEN_JAX_DISTRIBUTED=1 (set by launch/tpu.sh) or
    when the coordinator is given in the environment; a no-op for single-process runs."""
    if os.environ.get("IMAGEN_JAX_DISTRIBUTED", "0") == "1":
        jax.distributed.initialize()
    elif os.environ.get("IMAGEN_JAX_COORDINATOR"):
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU processes (tests, laptops) need an explicit cross-process collectives backend.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["IMAGEN_JAX_COORDINATOR"],
            num_processes=int(os.environ["IMAGEN_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["IMAGEN_JAX_PROCESS_ID"]))


def mesh_shape(mesh_cfg, num_devices):
    """Resolves {data, fsdp, tensor} sizes (one may be -1 = the rest) against the device count."""
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh axis sizes must be positive or -1, got {sizes}")
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh {sizes} does not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but there are {num_devices}")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg, devices=None):
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # abstract / odd topologies: fall back to the plain order
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def rules_tuple(rules):
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


def _axis_size(mesh, axes):
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec, shape, mesh):
    """Drops the mesh axes of any dimension they do not divide (e.g. a 3-channel RGB convolution
    under fsdp=2): that dimension is replicated instead of failing to shard."""
    dims = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*(ax if ax is not None and shape[i] % _axis_size(mesh, ax) == 0 else None
               for i, ax in enumerate(dims[: len(shape)])))


def logical_shardings(abstract_tree, mesh, rules):
    """NamedShardings for a tree of nn.Partitioned / plain leaves (plain leaves are replicated)."""
    rules = rules_tuple(rules)

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
            return NamedSharding(mesh, fit_spec(spec, leaf.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh):
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim):
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def to_global(x, sharding):
    """A value every process holds in full (the same prompts, keys or images on each host) -> an
    array laid out by `sharding`. One process passes it through: jit takes host values as they are.
    Across processes jit refuses a host value for a sharded argument, so each process hands over
    its own devices' slices of the global value."""
    if jax.process_count() == 1:
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x):
    """The whole value of an array as numpy, on every process (a multi-process array is gathered
    from all hosts)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync_hosts(name):
    """Every process waits here until all have arrived (a no-op on one process). Call it on a path
    every host takes, never inside a branch that depends on what this host saw on disk."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_parallel_size(mesh):
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_sharded(abstract_params, shardings, mesh, min_bytes):
    """With fsdp > 1, every parameter larger than `min_bytes` must be split over some mesh axis."""
    if mesh.shape["fsdp"] <= 1:
        return
    bad = []
    flat_p = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_params))
    flat_s = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_p, flat_s):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if nbytes >= min_bytes and all(ax is None for ax in sh.spec):
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}")
    if bad:
        raise MeshError(f"fsdp={mesh.shape['fsdp']} but {len(bad)} large parameters stay replicated "
                        f"(check mesh.rules): " + ", ".join(bad[:5]))


def host_local_batch_to_global(batch, mesh):
    """Assembles each host's slice of the global batch into global arrays sharded over data x fsdp.

    Leaves that are already jax arrays of the whole batch (T5 embeddings encoded on the fly: with
    one process any jax array, with several the encoder's global arrays) move device to device. A
    copy through the host would wait for the encoder, and with it for the previous train step, so
    the accelerator would idle while the host copied the embeddings back and dispatched the next
    step."""
    single = jax.process_count() == 1

    def put(x):
        if isinstance(x, jax.Array) and (single or not x.is_fully_addressable):
            return jax.device_put(x, batch_sharding(mesh, x.ndim))
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree_util.tree_map(put, batch)
