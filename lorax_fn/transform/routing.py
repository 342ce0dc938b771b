"""Adapters routed per example: a stack's factors plus each example's adapter id.

The grouped (SGMV / Punica) way to run a batch in which examples use different
adapters: instead of gathering one copy of the factors per example, the examples are
sorted by adapter and the low-rank products run as two ``lax.ragged_dot`` over the
adapter groups, reading each adapter's factors once. :class:`RoutedFactors` is what
``multi_lora(..., method="grouped")`` hands to :func:`lorax_fn.lora` for each example
(under ``vmap``); :func:`low_rank` is the product whose ``vmap`` rule does the
grouping, so it needs no guess about which axis of an activation is the example axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lorax_fn.factors import Layout, LoraFactors


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutedFactors:
    """One example's adapter: the whole stack ``a: (N, *batch, *in, R)``, ``b: (N, *batch,
    R, *out)`` (scale folded into B) and its ``adapter_id`` (``-1``: the base alone).

    Example:
        >>> import jax.numpy as jnp
        >>> f = RoutedFactors(jnp.ones((2, 8, 1)), jnp.ones((2, 1, 4)), jnp.array(1),
        ...                   Layout((0,), (1,)))
        >>> f.shapes().weight_shape
        (8, 4)
    """

    a: jax.Array
    b: jax.Array
    adapter_id: jax.Array
    layout: Layout = dataclasses.field(metadata={"static": True})

    def shapes(self) -> LoraFactors:
        """One adapter's factors as shapes and dtypes only (for checks)."""

        def sds(x: jax.Array) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)

        return LoraFactors(sds(self.a), sds(self.b), 1.0, self.layout)


def take(stack: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    """``stack[adapter_ids]``: zeros for the base (-1), NaN for an id outside ``[-1, N)``.

    ``adapter_ids`` is one id or an array of them (one per example).

    Example:
        >>> import jax.numpy as jnp
        >>> take(jnp.ones((2, 3)), jnp.array([-1, 1])).tolist()
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    # The base (-1) reads no adapter's values, not adapter 0's: 0·NaN is NaN, so one bad
    # adapter would otherwise poison every base row's output and input gradient. An id
    # past the stack gathers NaN (mode="fill"): loud, never the base.
    n = stack.shape[0]
    index = jnp.where(adapter_ids == -1, 0, jnp.where(adapter_ids < 0, n, adapter_ids))
    taken = jnp.take(stack, index, axis=0, mode="fill")
    base = (adapter_ids == -1).reshape(adapter_ids.shape + (1,) * (stack.ndim - 1))
    return jnp.where(base, 0, taken)


def _gathered(x: jax.Array, a: jax.Array, b: jax.Array, adapter_id: jax.Array) -> jax.Array:
    a_i, b_i = take(a, adapter_id), take(b, adapter_id)
    return jnp.dot(jnp.dot(x, a_i), b_i).astype(x.dtype)


def _grouped(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
    """``x: (B, rows, in)``, ``ids: (B,)`` → ``(B, rows, out)`` by two ragged_dots."""
    # Sizes are spelled out, not -1: an empty batch (no examples, or no rows) has none
    # to infer.
    batch, rows, features = x.shape
    n = a.shape[0]
    # ragged_dot may mask by multiplying (0·NaN = NaN, as XLA:CPU does): a NaN or Inf in
    # one adapter would reach every row. So it runs on finite factors, and the rows of
    # an adapter holding a non-finite value are NaN: loud, and only there.
    finite = [jnp.all(jnp.isfinite(f), axis=tuple(range(1, f.ndim))) for f in (a, b)]
    a, b = (jnp.where(jnp.isfinite(f), f, 0) for f in (a, b))
    valid = (ids >= 0) & (ids < n)
    # Base rows (and invalid ids) sort last, past every group: ragged_dot leaves them 0.
    order = jnp.argsort(jnp.where(valid, ids, n), stable=True)
    sizes = jnp.zeros(n, jnp.int32).at[jnp.where(valid, ids, n)].add(rows, mode="drop")
    xs = x[order].reshape(batch * rows, features)
    y = lax.ragged_dot(lax.ragged_dot(xs, a, sizes), b, sizes)
    y = y.reshape(batch, rows, b.shape[-1])[jnp.argsort(order)]
    healthy = (finite[0] & finite[1])[jnp.clip(ids, 0, n - 1)]
    bad = (ids != -1) & ~(valid & healthy)
    return jnp.where(bad[:, None, None], jnp.nan, y).astype(x.dtype)


@jax.custom_batching.custom_vmap
def _routed(x: jax.Array, a: jax.Array, b: jax.Array, adapter_id: jax.Array) -> jax.Array:
    return _gathered(x, a, b, adapter_id)


@_routed.def_vmap
def _routed_vmap(axis_size, in_batched, x, a, b, adapter_id):
    x_batched, a_batched, b_batched, id_batched = in_batched
    if x_batched and id_batched and not a_batched and not b_batched:
        return _grouped(x, a, b, adapter_id), True
    # Any other mix (an outer vmap over stacks, say): per example, gathered.
    axes = [0 if batched else None for batched in in_batched]
    return jax.vmap(_gathered, in_axes=axes)(x, a, b, adapter_id), True


@jax.custom_vjp
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, adapter_id: jax.Array) -> jax.Array:
    """``x · A[id] · B[id]`` for ``x: (rows, in)``, ``a: (N, in, R)``, ``b: (N, R, out)``.

    Under ``vmap`` over ``(x, adapter_id)`` it sorts the examples by adapter and runs
    two ``lax.ragged_dot`` over the adapter groups instead of gathering each example's
    factors. The gradient is that of the gathered form.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> a, b = jnp.ones((3, 4, 2)), jnp.ones((3, 2, 5))
        >>> jax.vmap(low_rank, (0, None, None, 0))(jnp.ones((2, 1, 4)), a, b,
        ...                                         jnp.array([2, -1]))[:, 0, 0]
        Array([8., 0.], dtype=float32)
    """
    return _routed(x, a, b, adapter_id)


def _low_rank_fwd(x, a, b, adapter_id):
    return _routed(x, a, b, adapter_id), (x, a, b, adapter_id)


def _low_rank_bwd(residuals, g):
    x, a, b, adapter_id = residuals
    _, vjp = jax.vjp(lambda x, a, b: _gathered(x, a, b, adapter_id), x, a, b)
    return (*vjp(g), None)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)
