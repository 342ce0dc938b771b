"""Data parallelism with ``jax.pmap``: replicate the trees, split the batch, average grads.

The recipe — the single-device step plus one ``lax.pmean``::

    def train_step(base, lt, opt_state, x, y):
        loss, grads = jax.value_and_grad(lorax_fn.lora(loss_fn), argnums=1)(base, lt, x, y)
        # Equal per-device shards: the mean of the per-device mean gradients is the
        # full-batch gradient, so every replica takes the same step and stays in sync.
        grads, loss = jax.lax.pmean((grads, loss), axis_name="batch")
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, loss

    step = jax.pmap(train_step, axis_name="batch", donate_argnums=(1, 2))
    base, lt, opt_state = lorax_fn.parallel.replicate((base, lt, tx.init(lt)))
    for x, y in batches:
        lt, opt_state, loss = step(base, lt, opt_state, *lorax_fn.parallel.shard_batch((x, y)))
    lt = lorax_fn.parallel.unreplicate(lt)

Only the LoRA tree's gradients cross devices: the all-reduce is ``r·(fan_in +
fan_out)`` per adapted weight instead of the full weight. Every device still holds the
whole base; to shard it as well, use ``jax.jit`` on a mesh (:mod:`lorax_fn.sharding`).

Beyond one machine: call ``jax.distributed.initialize()`` in every process first; each
process then replicates over and shards its own batch across its *local* devices, and
``pmean`` runs over every device of every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax_fn.errors import LoraError
from lorax_fn.paths import path_str


def _stacked_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    # The layout pmap itself gives its inputs: slice i of the leading axis on device i.
    return NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy of every leaf per device, stacked on a new leading axis, for ``jax.pmap``.

    Placed where ``pmap`` expects it, so no step re-transfers it. ``devices`` defaults to
    ``jax.local_devices()``, the devices ``pmap`` maps over.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> r = replicate({"w": jnp.ones((4, 3))})
        >>> r["w"].shape == (jax.local_device_count(), 4, 3)
        True
    """
    devices = list(devices or jax.local_devices())
    sharding = _stacked_sharding(devices)
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices), *np.shape(x))), sharding),
        tree,
    )


def unreplicate(tree: Any) -> Any:
    """The first replica of a tree from :func:`replicate` or a ``pmap`` output.

    Reads device 0's shard instead of indexing the global array, which would gather.

    Example:
        >>> import jax.numpy as jnp
        >>> unreplicate(replicate({"w": jnp.ones((4, 3))}))["w"].shape
        (4, 3)
    """
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def shard_batch(batch: Any, n_devices: int | None = None) -> Any:
    """Reshape each leaf's leading axis ``B`` to ``(n_devices, B // n_devices, ...)``.

    ``n_devices`` defaults to ``jax.local_device_count()``; a batch that does not divide
    evenly is an error (uneven shards would weight examples unequally in the ``pmean``).

    Example:
        >>> import jax.numpy as jnp
        >>> shard_batch({"x": jnp.ones((16, 3))}, n_devices=8)["x"].shape
        (8, 2, 3)
    """
    n = n_devices or jax.local_device_count()

    def split(key_path: Sequence[Any], x: Any) -> Any:
        shape = np.shape(x)
        if not shape or shape[0] % n:
            raise LoraError(
                f"batch leaf {path_str(key_path) or '<root>'}: leading axis of "
                f"shape {shape} is not divisible by {n} devices"
            )
        return x.reshape(n, shape[0] // n, *shape[1:])

    return jax.tree_util.tree_map_with_path(split, batch)
