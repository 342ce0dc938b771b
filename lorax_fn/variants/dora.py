"""DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

An adapted weight is ``W = m · V / ‖V‖_c`` with ``V = W0 + scale·A·B``: the direction
``V`` is LoRA's, each column's length is the trainable magnitude ``m``. The column
norm ``‖·‖_c`` is taken over the weight's fan-in axes, separately for every
(batch, out) index, so ``m`` has the shape of B without its rank axis.

As in the paper (§4.3) and PEFT, ``‖V‖_c`` is a constant in the gradient
(``stop_gradient``): A, B get gradient through ``V`` and ``m`` through the scale
``m / ‖V‖_c``. A zero column of ``V`` gives a zero column of ``W``.

Inside ``lora(fn)`` a stacked weight that a ``scan`` slices (``nn.scan`` layers) has its
norms taken in the scan body, one layer at a time (``Dora.per_layer``), so no float32
copy of the stack exists; and the backward pass takes ``m``'s gradient from each
product's output ``y`` (``Σ g·y / m``), not from a float32 pre-scale sum kept per
layer. So a column whose magnitude is exactly 0 while ``V``'s column is not (its output
is 0 whatever ``V``) gets a NaN magnitude gradient there, where merge-then-call gives
``Σ g·(x·V)/‖V‖_c``: set such a magnitude to a tiny non-zero value instead.
"""

from __future__ import annotations

import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, delta
from lorax_fn.merge import unmerge_states
from lorax_fn.quant import lazy
from lorax_fn.quant.lazy import LazyWeight
from lorax_fn.variants.base import Variant, apply_columns, register


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
    if "magnitude" not in factors.extras:
        return v
    scale = magnitude_scale(column_norms(v, factors.layout), factors.magnitude)
    return apply_columns(v, scale, factors)


def _norms(w0: jax.Array | LazyWeight, factors: LoraFactors) -> jax.Array:
    """``‖W0 + scale·A·B‖_c``; a quantized stack one layer at a time.

    Dequantizing a stacked quantized weight whole would put a float copy of every
    layer in memory at once, which QLoRA exists to avoid.
    """
    layout = factors.layout
    parts = None
    if isinstance(w0, LazyWeight) and layout.batch_axes[:1] == (0,):
        parts = lazy.scan_parts(w0)
    if parts is None:
        return weight_norms(w0.value() if isinstance(w0, LazyWeight) else w0, factors)
    stored, rebuild = parts
    inner = Layout(
        tuple(k - 1 for k in layout.in_axes),
        tuple(k - 1 for k in layout.out_axes),
        tuple(k - 1 for k in layout.batch_axes[1:]),
    )

    def layer(_, xs):
        part, a, b, step = xs
        one = LoraFactors(a, b, factors.scale, inner)
        return None, weight_norms(rebuild(part, step).value(), one)

    steps = jnp.arange(factors.a.shape[0])
    return lax.scan(layer, None, (stored, factors.a, factors.b, steps))[1]


class Dora(Variant):
    """DoRA as a :class:`~lorax_fn.variants.base.Variant`: ``c = m / sg(‖V‖_c)``.

    Its one extra array is the magnitude ``m``, labelled ``"lora_magnitude"`` for the
    optimizer and never decayed (it starts at ``‖W0‖_c``: decay would shrink the
    pretrained columns towards a zero layer). Exact unmerge needs ``‖V‖_c`` from before
    merging (:func:`dora_norms`). PEFT writes it as ``lora_magnitude_vector`` with
    ``use_dora: true``.

    Example:
        >>> from lorax_fn.variants.base import get
        >>> get("dora").extras, get("dora").label("magnitude")
        (('magnitude',), 'lora_magnitude')
    """

    name = "dora"
    title = "DoRA"
    extras = ("magnitude",)
    peft_config = {"use_dora": True}  # noqa: RUF012 - a class-level constant
    peft_tensors = {"magnitude": ".lora_magnitude_vector"}  # noqa: RUF012
    per_layer = True  # each column's norm is over its own layer's fan-in
    unmerge_hint = (
        "their column norms: a merged DoRA weight m·V/‖V‖ does not determine the base. Keep "
        "norms = lorax_fn.dora_norms(base, lora) from before merging and call "
        "unmerge(merged, lora, norms=norms)"
    )

    def init(self, w0: jax.Array, factors: LoraFactors) -> dict[str, jax.Array]:
        v = w0.astype(jnp.float32) + delta(factors)
        return {"magnitude": column_norms(v, factors.layout).astype(factors.a.dtype)}

    def weight(self, w0: jax.Array, factors: LoraFactors) -> jax.Array:
        return dora_weight(w0, factors)

    def column_scale(self, w0: Any, factors: LoraFactors) -> jax.Array:
        return magnitude_scale(_norms(w0, factors), factors.magnitude)

    def unmerge_state(self, w0: jax.Array, factors: LoraFactors) -> jax.Array:
        return weight_norms(w0, factors)

    def inverse_column_scale(self, factors: LoraFactors, state: Any) -> jax.Array:
        # W = V·m/‖V‖ ⇒ V = W·‖V‖/m. A zero column of V stays zero; with m = 0 the column
        # is lost (0·∞ = NaN, which safe=True reports).
        m = factors.magnitude.astype(jnp.float32)
        return jnp.where(state > 0, state.astype(jnp.float32) / m, 0.0)


register(Dora())


def _dora_entries(lora: dict[str, Any], who: str) -> dict[str, LoraFactors]:
    dora = {p: f for p, f in lora.items() if isinstance(f, LoraFactors) and f.variant == "dora"}
    if not dora:
        raise LoraError(f"{who}: the LoRA tree has no DoRA entries (LoraSpec(use_dora=True))")
    return dora


def dora_norms(base: Any, lora: dict[str, Any]) -> dict[str, jax.Array]:
    """``{path: ‖W0 + scale·A·B‖_c}`` for every DoRA entry: what an exact unmerge needs.

    A merged DoRA weight ``m·V/‖V‖_c`` does not determine ``W0`` (any column length
    of ``V`` gives the same weight), so keep these small vectors (one per output column)
    when you merge and pass them to ``unmerge(merged, lora, norms=...)``. One weight at
    a time, ``V`` never formed: a quantized base is never in float at once.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, merge, split, unmerge
        >>> w = jax.random.normal(jax.random.key(0), (8, 4))
        >>> base, lt = split({"w": w}, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
        >>> norms = dora_norms(base, lt)
        >>> back = unmerge(merge(base, lt), lt, norms=norms)
        >>> bool(jnp.allclose(back["w"], base["w"], atol=1e-5))
        True
    """
    dora = _dora_entries(lora, "dora_norms")
    return unmerge_states(base, dora)


def init_magnitudes(base: Any, lora: dict[str, Any]) -> dict[str, Any]:
    """``lora`` with each DoRA magnitude reset to ``‖W0 + scale·A·B‖_c`` of this ``base``.

    Then the adapted model equals ``base`` with the plain low-rank update, and at
    :func:`lorax_fn.split`'s init (B = 0) equals ``base`` itself. ``split`` sets the
    magnitudes from the float weights; after :func:`lorax_fn.quantize_base` (QDoRA)
    call this on the quantized base so that training starts from the quantized model
    exactly, not from one whose columns are rescaled by the quantization error. Each
    quantized weight is dequantized alone, inside one compiled call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, merge, quantize_base, split
        >>> w = jax.random.normal(jax.random.key(0), (64, 8))
        >>> base, lt = split({"w": w}, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
        >>> qbase = quantize_base(base, "w")
        >>> lt = init_magnitudes(qbase, lt)
        >>> merged = merge(qbase, lt)["w"]
        >>> bool(jnp.allclose(merged, qbase["w"].dequantize(), atol=1e-5))
        True
    """
    norms = unmerge_states(base, _dora_entries(lora, "init_magnitudes"))
    return {
        p: e.with_extras(magnitude=norms[p].astype(e.magnitude.dtype)) if p in norms else e
        for p, e in lora.items()
    }
