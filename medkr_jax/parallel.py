"""Device mesh, logical-axis sharding rules and multi-process start-up.

Parameters carry logical axis names ("embed", "mlp", ...); rules kept as data in the config map them onto
the mesh axes ("data", "fsdp", "tensor"), as MaxText does. Everything here works the same on one CPU, a GPU
box and a multi-host TPU pod.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from medkr_jax.sharding_rules import DEFAULT_SHARDING_RULES

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

class MeshError(ValueError):
    """The configured mesh does not fit the available devices."""


def _mesh_sizes(mesh_cfg: Mapping[str, int] | Any) -> dict[str, int]:
    get = mesh_cfg.get if isinstance(mesh_cfg, Mapping) else lambda k, d=None: getattr(mesh_cfg, k, d)
    sizes = {axis: int(get(axis, 1)) for axis in MESH_AXES}
    return sizes


def resolve_mesh_shape(mesh_cfg: Mapping[str, int] | Any, num_devices: int) -> tuple[int, ...]:
    """Sizes of ("data", "fsdp", "tensor"); at most one may be -1, meaning "all remaining devices"."""
    sizes = _mesh_sizes(mesh_cfg)
    free = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad or len(free) > 1:
        raise MeshError(
            f"config.mesh {sizes}: each axis size must be a positive int, and at most one may be -1 (the rest)")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"config.mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} available devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(
            f"config.mesh {sizes}: data*fsdp*tensor = {math.prod(sizes.values())} but {num_devices} devices are "
            f"available; make the product equal the device count or set one axis to -1")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg: Mapping[str, int] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor") over all (global) devices, sized from config."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    # Auto axes: XLA's sharding propagation fills in activations; params and batches are placed explicitly.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_rules(config_or_rules: Any = None) -> tuple[tuple[str, Any], ...]:
    """Rules as a tuple of (logical, mesh axis | tuple | None) pairs, from a config or a rules iterable.

    Rules missing from the config fall back to DEFAULT_SHARDING_RULES, so a config only lists what it changes.
    """
    rules = config_or_rules
    if rules is not None and not isinstance(rules, (list, tuple)):
        rules = getattr(rules, "sharding_rules", None)
    merged = dict(DEFAULT_SHARDING_RULES)
    for item in rules or ():
        if len(item) != 2:
            raise ValueError(f"config.sharding_rules: each rule must be (logical_name, mesh_axis), got {item!r}")
        name, axis = item
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        for a in axes:
            if a not in MESH_AXES:
                raise ValueError(f"config.sharding_rules: rule {name!r} -> {axis!r}: mesh axes are {MESH_AXES}")
        merged[name] = axis if isinstance(axis, str) or axis is None else tuple(axis)
    return tuple(merged.items())


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Iterable[tuple[str, Any]] | None = None):
    """Mesh + logical rules in scope: NNX params annotated with logical axes are created sharded."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules(rules)):
        yield


def logical_to_spec(logical_axes: Sequence[str | None], rules: Iterable[tuple[str, Any]] | None = None) -> P:
    """PartitionSpec for a tensor whose dims carry these logical names; a mesh axis is used at most once."""
    table = dict(logical_rules(rules))
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        axis = table.get(name) if name is not None else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def logical_sharding(logical_axes: Sequence[str | None], mesh: Mesh,
                     rules: Iterable[tuple[str, Any]] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Dim 0 split over ("data", "fsdp"), the other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place a host batch (global arrays, identical on every process) sharded over the batch axes."""
    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        if x.shape[0] % batch_divisor(mesh):
            raise ValueError(
                f"batch dim {x.shape[0]} is not divisible by data*fsdp = {batch_divisor(mesh)} of the mesh")
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(put, tree)


def state_logical_shardings(state: nnx.State, mesh: Mesh,
                            rules: Iterable[tuple[str, Any]] | None = None) -> Any:
    """NamedShardings for an NNX state (concrete or abstract) from each variable's logical axis names."""
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, logical_to_spec(tuple(s), rules) if s is not None else P()),
        specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def shard_module(model: nnx.Module, mesh: Mesh, rules: Iterable[tuple[str, Any]] | None = None) -> nnx.Module:
    """Reshard every annotated variable of a module (params, optimizer state ...) by its logical axes."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_logical_shardings(state, mesh, rules)))
    return model


def initialize_distributed(config: Any = None) -> bool:
    """Start JAX's multi-controller runtime when launched as several processes; a no-op for one process.

    Explicit: config.distributed.{coordinator_address, num_processes, process_id} or the environment variables
    MEDKR_COORDINATOR / MEDKR_NUM_PROCESSES / MEDKR_PROCESS_ID (set by launch/*.sh). Automatic: a multi-host TPU
    slice (TPU_WORKER_HOSTNAMES lists several hosts) or a SLURM job with several tasks, where
    jax.distributed.initialize() finds everything itself. Returns True when running multi-process.
    """
    if jax.distributed.is_initialized():
        return True
    dist = getattr(config, "distributed", None)
    coordinator = (getattr(dist, "coordinator_address", "") or os.environ.get("MEDKR_COORDINATOR", ""))
    num = int(getattr(dist, "num_processes", 0) or os.environ.get("MEDKR_NUM_PROCESSES", 0) or 0)
    pid = getattr(dist, "process_id", -1)
    pid = pid if pid is not None and pid >= 0 else int(os.environ.get("MEDKR_PROCESS_ID", -1))
    if coordinator and num > 1:
        if pid < 0:
            raise ValueError("multi-process run: config.distributed.process_id (or MEDKR_PROCESS_ID) is required "
                             "together with the coordinator address and num_processes")
        # Explicit settings win: no cluster auto-detection (under SLURM it would pin each process to one GPU).
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                                   cluster_detection_method="deactivate")
        return True
    multi_tpu = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    multi_slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    if multi_tpu or multi_slurm:
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    return jax.process_index() == 0
