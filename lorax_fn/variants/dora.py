"""DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

An adapted weight is ``W = m · V / ‖V‖_c`` with ``V = W0 + scale·A·B``: the direction
``V`` is LoRA's, each column's length is the trainable magnitude ``m``. The column
norm ``‖·‖_c`` is taken over the weight's fan-in axes, separately for every
(batch, out) index, so ``m`` has the shape of B without its rank axis.

As in the paper (§4.3) and PEFT, ``‖V‖_c`` is a constant in the gradient
(``stop_gradient``): A, B get gradient through ``V`` and ``m`` through the scale
``m / ‖V‖_c``. A zero column of ``V`` gives a zero column of ``W``.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, delta


def to_weight_axes(x: jax.Array, layout: Layout) -> jax.Array:
    """A ``(*batch, *out)`` array laid out to broadcast against the weight (unit fan-in axes).

    Example:
        >>> import jax.numpy as jnp
        >>> to_weight_axes(jnp.ones((3,)), Layout((1,), (0,))).shape  # weight (out=3, in)
        (3, 1)
    """
    nb = len(layout.batch_axes)
    shape = x.shape[:nb] + (1,) * len(layout.in_axes) + x.shape[nb:]
    order = layout.batch_axes + layout.in_axes + layout.out_axes
    return jnp.transpose(x.reshape(shape), np.argsort(order))


def _from_weight_axes(x: jax.Array, layout: Layout) -> jax.Array:
    # Inverse of to_weight_axes for an array whose fan-in axes have size 1.
    order = layout.batch_axes + layout.out_axes
    return jnp.transpose(jnp.squeeze(x, layout.in_axes), np.argsort(np.argsort(order)))


def column_norms(v: jax.Array, layout: Layout) -> jax.Array:
    """``‖v‖_c``: the norm over ``v``'s fan-in axes, shape ``(*batch, *out)``, float32.

    Example:
        >>> import jax.numpy as jnp
        >>> column_norms(jnp.array([[3.0, 0.0], [4.0, 1.0]]), Layout((0,), (1,)))
        Array([5., 1.], dtype=float32)
    """
    v = v.astype(jnp.float32)
    return _from_weight_axes(jnp.sqrt(jnp.sum(v * v, axis=layout.in_axes, keepdims=True)), layout)


def weight_norms(w0: jax.Array, factors: LoraFactors) -> jax.Array:
    """``‖W0 + scale·A·B‖_c`` without forming ``W0 + scale·A·B``.

    Per column, ``‖W0‖² + 2·scale·⟨W0ᵀA, B⟩ + scale²·Bᵀ(AᵀA)B``: one pass over ``W0``
    and ``O((fan_in + fan_out)·r²)`` more, instead of a full-size temporary. float32,
    shape ``(*batch, *out)``; equal to :func:`column_norms` of the merged weight up to
    rounding.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> w = jax.random.normal(jax.random.key(0), (8, 4))
        >>> _, lt = split({"w": w}, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
        >>> bool(jnp.allclose(weight_norms(w, lt["w"]), column_norms(w, lt["w"].layout)))
        True
    """
    layout = factors.layout
    # Subscripts on the weight's own axes, so that W0 is read in place: no transposed or
    # squared full-size copy.
    letters = string.ascii_letters[: w0.ndim]
    bat = "".join(letters[k] for k in layout.batch_axes)
    fin = "".join(letters[k] for k in layout.in_axes)
    fout = "".join(letters[k] for k in layout.out_axes)
    cols = bat + fout
    w = w0.astype(jnp.float32)
    a = factors.a.astype(jnp.float32)
    b = factors.b.astype(jnp.float32)
    s = factors.scale
    highest = lax.Precision.HIGHEST
    w0_sq = jnp.einsum(f"{letters},{letters}->{cols}", w, w, precision=highest)
    w0t_a = jnp.einsum(f"{letters},{bat}{fin}Z->{cols}Z", w, a, precision=highest)
    gram = jnp.einsum(f"{bat}{fin}Y,{bat}{fin}Z->{bat}YZ", a, a, precision=highest)
    b_cols = jnp.einsum(f"{bat}Z{fout}->{cols}Z", b)
    cross = jnp.sum(w0t_a * b_cols, axis=-1)
    quad = jnp.einsum(f"{cols}Y,{bat}YZ,{cols}Z->{cols}", b_cols, gram, b_cols, precision=highest)
    sq = w0_sq + 2.0 * s * cross + s * s * quad
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def magnitude_scale(norms: jax.Array, magnitude: jax.Array) -> jax.Array:
    """``m / ‖V‖_c`` with the norm held constant in the gradient; 0 where a column is 0.

    Example:
        >>> import jax.numpy as jnp
        >>> magnitude_scale(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]))
        Array([0.5, 0. ], dtype=float32)
    """
    norms = lax.stop_gradient(norms.astype(jnp.float32))
    # A zero column of V stays zero (V·m/‖V‖ → 0), never 0/0.
    safe = jnp.where(norms > 0, norms, 1.0)
    return jnp.where(norms > 0, magnitude.astype(jnp.float32) / safe, 0.0)


def dora_weight(w0: jax.Array, factors: LoraFactors) -> jax.Array:
    """The adapted weight ``m · V / ‖V‖_c`` (``V = W0 + scale·A·B``) in float32.

    The reference formula, used by :func:`lorax_fn.merge`; ``lora(fn)`` computes the
    same products without forming it. Plain LoRA factors (no magnitude) give ``V``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> w = jax.random.normal(jax.random.key(0), (8, 4))
        >>> _, lt = split({"w": w}, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
        >>> bool(jnp.allclose(dora_weight(w, lt["w"]), w, atol=1e-6))  # B = 0 at init
        True
    """
    v = w0.astype(jnp.float32) + delta(factors)
    if factors.magnitude is None:
        return v
    layout = factors.layout
    scale = magnitude_scale(column_norms(v, layout), factors.magnitude)
    return v * to_weight_axes(scale, layout)


def init_magnitude(w0: jax.Array, factors: LoraFactors) -> LoraFactors:
    """``factors`` with DoRA's magnitude set to ``‖W0 + scale·A·B‖_c`` (model unchanged).

    Example:
        >>> import jax.numpy as jnp
        >>> f = LoraFactors(jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, Layout((0,), (1,)))
        >>> init_magnitude(jnp.array([[3.0, 0.0], [4.0, 1.0]]), f).magnitude
        Array([5., 1.], dtype=float32)
    """
    v = w0.astype(jnp.float32) + delta(factors)
    m = column_norms(v, factors.layout).astype(factors.a.dtype)
    return dataclasses.replace(factors, magnitude=m)


def refuse_dora(tree: Any, what: str) -> None:
    """Raise :class:`LoraError` naming the DoRA entries of ``tree``, which ``what`` cannot hold.

    For the parts of the library that would otherwise drop the magnitude and silently
    treat a DoRA adapter as plain LoRA.

    Example:
        >>> import jax.numpy as jnp
        >>> f = LoraFactors(jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, Layout((0,), (1,)))
        >>> refuse_dora({"w": f}, "this")  # plain LoRA passes
    """
    paths = sorted(p for p, f in dict(tree).items() if isinstance(f, LoraFactors) and f.is_dora)
    if paths:
        raise LoraError(
            f"{what} does not support DoRA adapters yet (it would drop the magnitude and "
            f"give plain LoRA): {paths[:5]}{' …' if len(paths) > 5 else ''}. Merge the adapter "
            "(lorax_fn.merge) and save or export the merged weights instead"
        )
