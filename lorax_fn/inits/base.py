"""The init protocol: how ``split`` draws one adapted weight's factors (and its base leaf).

An init is called once per targeted weight with the weight, its :class:`lorax_fn.Layout`,
rank, scale, the spec and a key derived from the path, and returns the
:class:`lorax_fn.LoraFactors` and the leaf the base holds for that weight: the weight
itself (gaussian, kaiming_uniform, orthogonal: ``A·B = 0``, so the model starts equal to
the base), or a rewritten one, flagged by ``rewrites_base`` (PiSSA and OLoRA: the
residual ``W0 - scale·A·B``; LoftQ: the quantized ``Q`` with ``Q + scale·A·B ≈ W0``).
An init that rewrites the base records it (:mod:`lorax_fn.pissa`), so that restore, the
checkpoint manager and ``stack_adapters`` refuse the original weights, and PEFT export
refuses the adapter (PEFT would rewrite the base again on load).

Example:
    >>> import jax, jax.numpy as jnp, lorax_fn
    >>> class Ones(Init):  # A = 1/fan_in, B = 0
    ...     name = "doc_ones"
    ...     def __call__(self, path, w, layout, rank, scale, spec, key):
    ...         a_shape, b_shape = layout.shapes(w.shape, rank)
    ...         a = jnp.full(a_shape, 1.0 / layout.fan_in(w.shape))
    ...         return zero_b(a, b_shape, scale, layout, spec), w
    >>> _ = register(Ones())
    >>> _, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, lorax_fn.LoraSpec("w", rank=2,
    ...                        init="doc_ones"), key=jax.random.key(0))
    >>> float(lt["w"].a[0, 0])
    0.125
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, delta
from lorax_fn.spec import LoraSpec, add_init_name


class Init:
    """An init; subclass, set ``name`` and implement ``__call__``, then :func:`register` it.

    Attributes:
      name: the registry key, given as ``LoraSpec(init=...)``.
      rewrites_base: whether the base leaf returned differs from the weight (and carries
        the record of :mod:`lorax_fn.pissa`): checkpoints and PEFT export then treat the
        adapter as valid on that base only.
    """

    name: str = ""
    rewrites_base: bool = False

    def __call__(
        self,
        path: str,
        w: jax.Array,
        layout: Layout,
        rank: int,
        scale: float,
        spec: LoraSpec,
        key: jax.Array,
    ) -> tuple[LoraFactors, Any]:
        """``(factors, base_leaf)`` for the weight ``w`` at ``path``."""
        raise NotImplementedError


_REGISTRY: dict[str, Init] = {}


def register(init: Init) -> Init:
    """Make ``init`` known by its ``name`` to ``LoraSpec`` and ``split``; returns it.

    Registering a name again replaces the init (e.g. a LoftQ with other settings).
    A spec naming an init is refused until it is registered: register yours before
    restoring a checkpoint whose stored spec names it, too.

    Example:
        >>> from lorax_fn.inits import LoftQ
        >>> register(LoftQ(name="doc_loftq_int8", format="int8", iters=3)).iters
        3
    """
    if not isinstance(init, Init):
        raise LoraError(f"register: expected a lorax_fn.inits.Init, got {init!r}")
    if not isinstance(init.name, str) or not init.name:
        raise LoraError(f"register: an init needs a non-empty name, got {init.name!r}")
    _REGISTRY[init.name] = init
    add_init_name(init.name)
    return init


def get(name: str) -> Init:
    """The registered init called ``name``; :class:`LoraError` listing the known ones.

    Example:
        >>> get("pissa").rewrites_base, get("gaussian").rewrites_base
        (True, False)
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoraError(
            f"unknown init {name!r}; registered: {names()}. An init defined outside "
            "lorax_fn must be registered (lorax_fn.inits.register) before split uses it"
        ) from None


def names() -> list[str]:
    """The registered inits' names.

    Example:
        >>> {"gaussian", "pissa", "olora", "loftq"} <= set(names())
        True
    """
    return sorted(_REGISTRY)


def rewrites_base(name: str) -> bool:
    """Whether ``split`` with ``init=name`` returns a base other than the weights.

    An unknown name (a spec read from a checkpoint whose init is not registered here)
    counts as rewriting: its adapter is then checked against the base it recorded.

    Example:
        >>> rewrites_base("olora"), rewrites_base("kaiming_uniform")
        (True, False)
    """
    init = _REGISTRY.get(name)
    return True if init is None else init.rewrites_base


# --------------------------------------------------------------------------- helpers


def as_matrix(w: jax.Array, layout: Layout) -> jax.Array:
    """``w`` in float32 as ``(*batch, fan_in, fan_out)``: the matrix ``A·B`` approximates.

    Example:
        >>> as_matrix(jnp.ones((4, 2, 3)), Layout((0,), (1, 2))).shape
        (4, 6)
    """
    nb = len(layout.batch_axes)
    order = layout.batch_axes + layout.in_axes + layout.out_axes
    x = jnp.transpose(w.astype(jnp.float32), order)
    return x.reshape(x.shape[:nb] + (layout.fan_in(w.shape), -1))


def factors_of(
    a: jax.Array,
    b: jax.Array,
    w_shape: tuple[int, ...],
    layout: Layout,
    scale: float,
    spec: LoraSpec,
) -> LoraFactors:
    """Factors from ``(*batch, fan_in, r)`` and ``(*batch, r, fan_out)`` matrices.

    Example:
        >>> spec = LoraSpec("w", rank=1)
        >>> f = factors_of(jnp.ones((6, 1)), jnp.ones((1, 4)), (2, 3, 4),
        ...                Layout((0, 1), (2,)), 1.0, spec)
        >>> f.a.shape, f.b.shape
        ((2, 3, 1), (1, 4))
    """
    a_shape, b_shape = layout.shapes(w_shape, a.shape[-1])
    return LoraFactors(
        a.reshape(a_shape).astype(spec.factor_dtype),
        b.reshape(b_shape).astype(spec.factor_dtype),
        scale,
        layout,
        spec.dropout,
    )


def zero_b(
    a: jax.Array, b_shape: tuple[int, ...], scale: float, layout: Layout, spec: LoraSpec
) -> LoraFactors:
    """Factors with A = ``a`` (shaped like A) and B = 0: the model starts at the base.

    Example:
        >>> f = zero_b(jnp.ones((4, 2)), (2, 3), 1.0, Layout((0,), (1,)), LoraSpec("w"))
        >>> float(jnp.abs(f.b).sum())
        0.0
    """
    dtype = spec.factor_dtype
    return LoraFactors(a.astype(dtype), jnp.zeros(b_shape, dtype), scale, layout, spec.dropout)


def with_residual(w: jax.Array, factors: LoraFactors, init: str) -> tuple[LoraFactors, jax.Array]:
    """``factors`` with the record of the residual base ``W0 - scale·A·B``, and that base.

    ``init`` names the init in the record (and in the errors of a wrong base).

    The residual is computed in float32 from the factors as stored (in ``factor_dtype``)
    and cast to the weight's dtype, so ``residual + scale·A·B`` is ``W0`` up to rounding.

    Example:
        >>> f = zero_b(jnp.ones((4, 2)), (2, 3), 1.0, Layout((0,), (1,)), LoraSpec("w"))
        >>> f, r = with_residual(jnp.ones((4, 3)), f, "doc")
        >>> f.pissa.init, r.shape
        ('doc', (4, 3))
    """
    # Imported here: pissa reads quantized arrays, and the quant wing builds on split.
    from lorax_fn.pissa import record

    residual = (w.astype(jnp.float32) - delta(factors)).astype(w.dtype)
    return dataclasses.replace(factors, pissa=record(w, residual, init)), residual


def svd_factors(mat: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """The top-``rank`` SVD of ``mat`` split evenly: ``scale·A·B`` is its best rank-r part.

    Example:
        >>> a, b = svd_factors(jnp.diag(jnp.array([4.0, 1.0])), 1, 2.0)
        >>> (2.0 * a @ b).round(4).tolist()
        [[4.0, 0.0], [0.0, 0.0]]
    """
    u, s, vh = jnp.linalg.svd(mat, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def fan_in_bound(w_shape: tuple[int, ...], layout: Layout) -> float:
    """PEFT's default ``kaiming_uniform(a=√5)`` bound for A: ``1/√fan_in``.

    Example:
        >>> fan_in_bound((16, 4), Layout((0,), (1,)))
        0.25
    """
    return 1.0 / math.sqrt(layout.fan_in(w_shape))
