"""The device mesh and shardings: batches split along `data`, parameters replicated; the same code from 1 CPU to many hosts."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A one-axis mesh (`data`) over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays every device holds whole (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays split along their leading (batch) axis over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raises when the global batch cannot be split evenly over the devices and processes."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch % devices or global_batch % processes:
        raise ValueError(
            f"config key 'train.batch_size' = {global_batch} must be a multiple of the number of devices ({devices})"
            f" and of processes ({processes})"
        )


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's part of a batch into global arrays sharded along `data`."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host values on every device."""
    return jax.device_put(tree, replicated(mesh))
