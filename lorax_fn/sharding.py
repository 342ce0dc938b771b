"""Placing a LoRA run on a device mesh for ``jax.jit``: batch, frozen base, factors.

The recipe: the batch is split over a ``data`` mesh axis (:func:`put_batch`), the
frozen base is replicated, laid out by your model's own specs (``nn.get_sharding``
for a linen model made with ``nn.with_partitioning``), or sharded FSDP-style over the
same ``data`` axis (:func:`fsdp_shardings`), and each factor is sharded like the weight
it adapts (:func:`lora_shardings`). ``jax.jit`` then inserts the all-gathers and the
gradient all-reduce itself::

    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    base_sh = lorax_fn.sharding.fsdp_shardings(base, mesh, "data")
    base = jax.device_put(base, base_sh)
    lt = jax.device_put(lt, lorax_fn.lora_shardings(lt, base_sh))
    opt_state = tx.init(lt)  # eagerly: the moments keep the factors' shardings
    step = jax.jit(train_step, donate_argnums=(1, 2))
    for x, y in batches:
        lt, opt_state, loss = step(base, lt, opt_state, *lorax_fn.sharding.put_batch((x, y), mesh))

where ``train_step`` is the plain single-device step; no ``pmean`` is needed, because
the loss is a mean over the global batch. Use ``Auto`` mesh axes (``jax.make_mesh``
defaults to ``Explicit``, under which a contraction over a sharded axis must be
resolved by hand).

Beyond one machine: call ``jax.distributed.initialize()`` (arguments or cluster
auto-detection: SLURM, Open MPI, Cloud TPU, ...) in every process before any other JAX
call. ``jax.devices()`` then lists every process's devices, so the same mesh spans the
cluster; each process passes its own slice of the batch to :func:`put_batch`, and loads
the same base (or builds it with ``jax.make_array_from_callback``). lorax_fn adds
nothing to JAX's runtime.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors
from lorax_fn.paths import path_str

MeshAxes = str | tuple[str, ...]


def _axis_size(mesh: Mesh, axis: MeshAxes) -> int:
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    if missing := [n for n in names if n not in mesh.shape]:
        raise LoraError(f"mesh axes {missing} not in the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[n] for n in names)


def fsdp_shardings(tree: Any, mesh: Mesh, axis: MeshAxes = "data", *, min_size: int = 0) -> Any:
    """Shard each leaf over ``axis`` along its largest axis divisible by the axis size.

    Fully sharded data parallelism for a frozen base: each device holds ``1/n`` of
    every weight and ``jax.jit`` all-gathers a weight where it is used. Ties go to the
    first such axis. Leaves with no divisible axis, scalars and leaves of fewer than
    ``min_size`` elements are replicated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        >>> fsdp_shardings({"w": jnp.ones((3, 8))}, mesh)["w"].spec
        P(None, 'data')
    """
    n = _axis_size(mesh, axis)

    def place(leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        divisible = [i for i, d in enumerate(shape) if d % n == 0]
        if not divisible or math.prod(shape) < min_size:
            return NamedSharding(mesh, PartitionSpec())
        best = max(divisible, key=lambda i: (shape[i], -i))
        return NamedSharding(
            mesh, PartitionSpec(*(axis if i == best else None for i in range(len(shape))))
        )

    return jax.tree.map(place, tree)


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec | NamedSharding)


def _factor_specs(
    path: str, spec: PartitionSpec, factors: LoraFactors
) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """A's, B's and a column vector's (a variant's extra array) specs from the weight's."""
    layout = factors.layout
    ndim = layout.ndim
    if len(spec) > ndim:
        raise LoraError(
            f"{path}: PartitionSpec {spec} has more entries than the weight "
            f"{factors.weight_shape} has axes"
        )
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    batch = tuple(entries[i] for i in layout.batch_axes)
    a = PartitionSpec(*batch, *(entries[i] for i in layout.in_axes), None)
    fan_out = tuple(entries[i] for i in layout.out_axes)
    b = PartitionSpec(*batch, None, *fan_out)
    # A variant's extra array is a column vector, indexed by (batch, out) like B without
    # its rank axis, and scales the output columns that B produces: B's spec less the rank.
    column = PartitionSpec(*batch, *fan_out)
    return a, b, column


def lora_shardings(
    lora: dict[str, Any], base_shardings: Any, mesh: Mesh | None = None
) -> dict[str, Any]:
    """Shardings for the LoRA tree that follow the base weights' shardings.

    A takes the base weight's mesh axes on its batch and fan-in axes, B on its batch and
    fan-out axes (per the factors' :class:`~lorax_fn.Layout`), and the rank axis is
    replicated; so ``x @ A`` contracts over the same shards as ``x @ W0`` and
    ``(x@A) @ B`` comes out sharded like ``x @ W0``. An adapter variant's extra arrays
    (:mod:`lorax_fn.variants`; column vectors of shape ``(*batch, *out)``) take B's spec
    without the rank axis, so they are split like the output columns they scale. Fully
    trainable leaves take their base leaf's sharding.

    Args:
      lora: the LoRA tree from :func:`lorax_fn.split`.
      base_shardings: a tree with the base's paths whose leaves are ``NamedSharding``
        (e.g. from :func:`fsdp_shardings`, ``nn.get_sharding(variables, mesh)`` or
        ``jax.tree.map(lambda x: x.sharding, base)``), ``PartitionSpec`` (e.g.
        ``nn.get_partition_spec(variables)`` for a linen model made with
        ``nn.with_partitioning``, ``nnx.get_partition_spec(state)``), or ``None``
        (replicated). Logical axis names must be mapped to mesh axes first
        (``nn.logical_to_mesh(specs, rules)``).
      mesh: the mesh for ``PartitionSpec``/``None`` leaves; unused for ``NamedSharding``.

    Returns:
      A tree with the structure of ``lora`` (``LoraFactors`` whose ``a``, ``b`` and
      ``extras`` arrays are ``NamedSharding``), for ``jax.device_put`` or ``jax.jit``'s
      ``out_shardings``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import PartitionSpec as P
        >>> from lorax_fn import LoraSpec, split
        >>> base, lt = split({"w": jnp.ones((8, 4))}, LoraSpec("w", rank=2),
        ...                  key=jax.random.key(0))
        >>> mesh = jax.make_mesh((1, 1), ("data", "model"),
        ...                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
        >>> sh = lora_shardings(lt, {"w": P("data", "model")}, mesh)
        >>> sh["w"].a.spec, sh["w"].b.spec
        (P('data', None), P(None, 'model'))
        >>> from lorax_fn.factors import Layout, LoraFactors
        >>> from lorax_fn.variants.base import Variant, register
        >>> class Gain(Variant):  # a learned per-column gain
        ...     name, extras = "doc_shard_gain", ("gain",)
        >>> f = LoraFactors(jnp.ones((8, 2)), jnp.zeros((2, 4)), 1.0, Layout((0,), (1,)),
        ...                 extras={"gain": jnp.ones(4)}, variant=register(Gain()).name)
        >>> lora_shardings({"w": f}, {"w": P("data", "model")}, mesh)["w"].extras["gain"].spec
        P('model',)
    """
    flat = jax.tree_util.tree_flatten_with_path(base_shardings, is_leaf=_is_spec)[0]
    by_path = {path_str(k): s for k, s in flat}

    def sharding(path: str, spec: Any) -> tuple[Mesh, PartitionSpec]:
        if isinstance(spec, NamedSharding):
            return spec.mesh, spec.spec
        if mesh is None:
            raise LoraError(f"{path}: base sharding is {spec!r}; pass mesh= to place it")
        return mesh, PartitionSpec() if spec is None else spec

    out: dict[str, Any] = {}
    for path, entry in lora.items():
        if path not in by_path:
            raise LoraError(
                f"{path}: no sharding for this path in base_shardings "
                f"(it has {sorted(by_path)[:5]}...)"
            )
        m, spec = sharding(path, by_path[path])
        if isinstance(entry, LoraFactors):
            a, b, column = _factor_specs(path, spec, entry)
            out[path] = dataclasses.replace(
                entry,
                a=NamedSharding(m, a),
                b=NamedSharding(m, b),
                extras={name: NamedSharding(m, column) for name in entry.extras},
            )
        else:
            out[path] = NamedSharding(m, spec)
    return out


def put_batch(batch: Any, mesh: Mesh, axis: MeshAxes = "data") -> Any:
    """Place this process's batch on the mesh, split along its leading axis over ``axis``.

    Built on ``jax.make_array_from_process_local_data``, so the same call serves one
    process (the batch is the global batch) and many (each passes its own slice; the
    global batch is their concatenation).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        >>> put_batch({"x": jnp.ones((4, 3))}, mesh)["x"].sharding.spec
        P('data',)
    """
    n = _axis_size(mesh, axis)
    local = max(n // jax.process_count(), 1)
    sharding = NamedSharding(mesh, PartitionSpec(axis))

    def place(key_path: Sequence[Any], x: Any) -> jax.Array:
        shape = np.shape(x)
        if not shape or shape[0] % local:
            raise LoraError(
                f"batch leaf {path_str(key_path) or '<root>'}: leading axis of "
                f"shape {shape} is not divisible by the {local} local devices "
                f"of mesh axis {axis!r}"
            )
        # A device array goes through as is, without a round trip to the host.
        local_data = x if isinstance(x, jax.Array) else np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, local_data)

    return jax.tree_util.tree_map_with_path(place, batch)
