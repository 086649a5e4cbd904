"""Data parallelism with ``jax.sharding``: one 1-D mesh over every device of every process,
the batch split along it, parameters and optimiser state replicated.

Multi-host: every process runs the same program. :func:`initialize_distributed` calls
``jax.distributed.initialize`` from flags or environment variables (or lets JAX detect a TPU
pod / SLURM / Open MPI job); each process then loads its own 1/n of every global batch (the
loader's ``process_index`` / ``process_count``) and :func:`shard_batch` assembles the global
array from the per-process pieces without moving data between hosts.

On one CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX is imported)
gives N devices, which is how the data-parallel path is tested.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rep_medsam_jax.mesh import (DATA_AXIS, batch_sharding, make_mesh,  # noqa: F401
                                 replicated_sharding)

# Environment variables read by initialize_distributed (flags take precedence).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_AUTO = "REP_MEDSAM_DISTRIBUTED"          # "auto": let JAX detect the cluster


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           auto: bool | None = None) -> bool:
    """Join a multi-process job when one is described; returns True if it did.

    Explicit: coordinator ``host:port``, the number of processes and this one's id, from the
    arguments or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.
    Automatic (``auto=True`` or ``REP_MEDSAM_DISTRIBUTED=auto``): ``jax.distributed.initialize()``
    with no arguments, which reads a Cloud TPU pod slice, SLURM or Open MPI environment.
    Nothing described: single process, nothing done. Call before any other JAX call.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if auto is None:
        auto = os.environ.get(ENV_AUTO, "").lower() == "auto"
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("a multi-process launch needs all three of the coordinator address, "
                             "the number of processes and this process's id (flags "
                             "--coordinator/--num_processes/--process_id or "
                             f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        return True
    if auto:
        jax.distributed.initialize()
        return True
    return False


def check_batch_size(global_batch: int, mesh: Mesh | None = None,
                     process_count: int | None = None) -> int:
    """The per-process batch; raises ValueError if the batch does not split evenly."""
    devices = mesh.devices.size if mesh is not None else jax.device_count()
    processes = jax.process_count() if process_count is None else process_count
    if global_batch <= 0:
        raise ValueError(f"batch_size must be > 0, got {global_batch}")
    if global_batch % devices:
        raise ValueError(f"batch_size {global_batch} is not divisible by the number of devices "
                         f"({devices}); use a multiple of {devices}")
    if global_batch % processes:
        raise ValueError(f"batch_size {global_batch} is not divisible by the number of processes"
                         f" ({processes})")
    return global_batch // processes


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch (leading axis = global batch / process count) -> global
    arrays split over the mesh. Single process: the whole batch, split over local devices."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf (identical on every process) on every device of the mesh."""
    sharding = replicated_sharding(mesh)

    def put(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(jax.device_get(leaf)) if isinstance(leaf, jax.Array) else np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Replicated (or fully addressable) arrays -> NumPy, on every process."""
    def get(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(jax.device_get(leaf))

    return jax.tree.map(get, tree)
