"""Shared-input fusion: the adapted products that read one activation share ``x·A``.

Several adapted weights often read the same activation: q, k and v; gate and up.
:func:`lorax_fn.lora` computes each product as ``x·W0 + s·(x·A)·B``, so each reads
``x`` again for its rank-r product ``x·A`` (memory-bound, a kernel of its own), and
the backward pass adds one ``dt·Aᵀ`` per weight into ``dx`` and reads ``x`` again for
each ``xᵀ·dt``. XLA's CPU pipeline merges no dots that share an operand (its dot
merger is a GPU pass; docs/results/fusion.md), so the transform does it: the first
such product evaluated computes ``x·[A_1|A_2|…]`` once for every adapted product of
the same jaxpr that reads the same ``x`` the same way, and each takes its columns.
The backward pass follows: one ``dt·[A_1|A_2|…]ᵀ`` into ``dx`` and one ``xᵀ·dt``
for every A's gradient.

Only the plain 2-D form is fused (``x``'s contracted axes against all of A's fan-in
axes, no batch axes), for weights with no column scale (DoRA), routing
(``multi_lora``) or dropout mask of their own; any other product is computed alone.
The sums are those of the unfused path, up to float rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

from lorax_fn.quant.lazy import LazyWeight
from lorax_fn.transform.symbolic import (
    SymbolicWeight,
    _add_low_rank,
    _as_rows,
    _unflatten,
)


def _operands(eqn: core.JaxprEqn, env: dict[Any, Any]) -> tuple[Any, SymbolicWeight, bool] | None:
    """``(x's var, weight, weight_is_lhs)`` of a ``dot_general`` between an activation
    and an adapted weight that is already evaluated; ``None`` otherwise."""
    if eqn.primitive.name != "dot_general":
        return None
    lhs, rhs = eqn.invars
    values = [env.get(v) if isinstance(v, core.Var) else None for v in (lhs, rhs)]
    held = [isinstance(v, SymbolicWeight) for v in values]
    if held[0] == held[1] or any(isinstance(v, LazyWeight) for v in values):
        return None
    return (rhs, values[0], True) if held[0] else (lhs, values[1], False)


def _contracted(eqn: core.JaxprEqn, weight_is_lhs: bool) -> tuple[Any, Any]:
    """``(x's contracted axes, the weight's)``."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    return (rc, lc) if weight_is_lhs else (lc, rc)


def _signature(eqn: core.JaxprEqn, w: SymbolicWeight, weight_is_lhs: bool, keyed: bool) -> Any:
    """What two products must agree on to share ``x·A`` (x's contracted axes in A's
    order, precision, A's dtype); ``None`` for a product that is not fused."""
    _, (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or w.route is not None or w.c is not None:
        return None
    if getattr(w, "out_bias", None) is not None:  # lora_bias: its own output term
        return None
    # A column scale still to be computed (a stacked variant's), a dropout mask: its own x.
    if w.pending is not None or (keyed and w.dropout):
        return None
    xc, wc = _contracted(eqn, weight_is_lhs)
    a_axes = w.axes_of("a")
    if set(wc) != set(a_axes) or any(w.kinds[k] != "i" for k in wc):
        return None
    x_order = tuple(xc[list(wc).index(k)] for k in a_axes)
    return x_order, eqn.params["precision"], w.a.dtype


class SharedInputs:
    """One jaxpr's fusion plan: its ``dot_general`` equations by operand, and the
    ``x·A`` columns computed ahead for members of a group not yet evaluated.

    :mod:`lorax_fn.transform.apply` makes one per jaxpr it evaluates (``env`` is that
    evaluation's environment, filled as it goes) and asks :meth:`product` at each
    ``dot_general`` with an adapted weight.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, lora, split
        >>> params = {"q": jnp.ones((4, 3)), "k": jnp.ones((4, 3))}
        >>> base, lt = split(params, LoraSpec(["q", "k"], rank=2), key=jax.random.key(0))
        >>> def f(p, x):
        ...     return (x @ p["q"]) * (x @ p["k"])
        >>> def products(**kw):  # x·W0 twice, x·A once or twice, t·B twice
        ...     jaxpr = jax.make_jaxpr(lora(f, **kw))(base, lt, jnp.ones((2, 4)))
        ...     return str(jaxpr).count("dot_general")
        >>> products(), products(fuse_shared_inputs=False)
        (5, 6)
    """

    def __init__(self, eqns: list[core.JaxprEqn], env: dict[Any, Any], keyed: bool):
        self._env = env
        self._keyed = keyed  # a dropout key is given: each weight's dropout masks x its own way
        self._readers: dict[core.Var, list[core.JaxprEqn]] = {}
        for eqn in eqns:
            if eqn.primitive.name == "dot_general":
                for v in dict.fromkeys(v for v in eqn.invars if isinstance(v, core.Var)):
                    self._readers.setdefault(v, []).append(eqn)
        self._seen: set[int] = set()
        self._ahead: dict[int, tuple[jax.Array, list[int]]] = {}

    def product(
        self,
        eqn: core.JaxprEqn,
        x: jax.Array,
        w: SymbolicWeight,
        weight_is_lhs: bool,
        base: Callable[[jax.Array], jax.Array],
    ) -> jax.Array | None:
        """``x·W0 + s·(x·A)·B`` from shared ``x·A`` columns, or ``None`` if this product
        shares ``x·A`` with no other (the caller computes it alone).

        ``base(x)`` is the product with W0, as :func:`symbolic.dot_general` takes it.
        """
        self._seen.add(id(eqn))
        found = self._ahead.pop(id(eqn), None) or self._group_columns(eqn)
        if found is None:
            return None
        t, free_shape = found
        b = w.b.reshape(-1, w.b.shape[-1])
        precision = eqn.params["precision"]
        y = lax.dot_general(t, b, (((1,), (1,)), ((), ())), precision=precision)
        y = _unflatten(y, free_shape, w.b.shape[:-1], weight_is_lhs)
        return _add_low_rank(base(x), y, w.scale)

    def _group_columns(self, eqn: core.JaxprEqn) -> tuple[jax.Array, list[int]] | None:
        """This product's ``x·A`` rows, computed with those of the group it leads."""
        found = _operands(eqn, self._env)
        if found is None or not isinstance(found[0], core.Var):
            return None
        x_var, w, weight_is_lhs = found
        signature = _signature(eqn, w, weight_is_lhs, self._keyed)
        if signature is None:
            return None
        group = [w]
        members = []
        for other in self._readers.get(x_var, ()):
            if id(other) in self._seen:
                continue
            match = _operands(other, self._env)
            if (
                match is not None
                and match[0] is x_var
                and _signature(other, match[1], match[2], self._keyed) == signature
            ):
                group.append(match[1])
                members.append(other)
        if not members:
            return None
        xc, wc = _contracted(eqn, weight_is_lhs)
        rows, free_shape = _as_rows(self._env[x_var], xc, wc, w.axes_of("a"))
        factors = [m.a.reshape(-1, m.a.shape[-1]) for m in group]
        t = jnp.dot(
            rows.astype(w.a.dtype), jnp.concatenate(factors, axis=1), precision=signature[1]
        )
        starts = list(itertools.accumulate((a.shape[1] for a in factors), initial=0))
        columns = [lax.slice_in_dim(t, lo, hi, axis=1) for lo, hi in itertools.pairwise(starts)]
        for member, part in zip(members, columns[1:], strict=True):
            self._ahead[id(member)] = (part, free_shape)
        return columns[0], free_shape
