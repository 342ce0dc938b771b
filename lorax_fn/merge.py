"""`merge` / `unmerge`: fold ``scale·A·B`` into the base weights and take it out again."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, delta
from lorax_fn.quant.quantized import QuantizedArray, weight_leaves
from lorax_fn.variants.dora import dora_weight, to_weight_axes, weight_norms


def check_fits(base: Any, lora: dict[str, Any]) -> None:
    """Raise :class:`LoraError` unless every entry of ``lora`` fits a leaf of ``base``.

    Checks paths, weight shapes implied by the factors, A/B shape agreement and dtypes.
    A :class:`~lorax_fn.QuantizedArray` leaf is checked by its original shape and dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> base, lora = split({"w": jnp.ones((4, 4))}, LoraSpec("w", rank=2),
        ...                    key=jax.random.key(0))
        >>> check_fits({"w": jnp.ones((4, 5))}, lora)
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: w: the adapter was made for a weight of shape (4, 4), ...
    """
    if not isinstance(lora, dict):
        raise LoraError(f"the LoRA tree must be a dict {{path: factors | array}}, got {type(lora)}")
    leaves = dict(weight_leaves(base))
    if missing := sorted(set(lora) - set(leaves)):
        raise LoraError(f"LoRA paths not in the base: {missing}")
    for path, entry in lora.items():
        leaf = leaves[path]
        shape, dtype = tuple(np.shape(leaf)), getattr(leaf, "dtype", None)
        if isinstance(entry, LoraFactors):
            nb = len(entry.layout.batch_axes)
            a, b = np.shape(entry.a), np.shape(entry.b)
            if len(a) < nb + 2 or len(b) < nb + 2 or a[:nb] != b[:nb] or a[-1] != b[nb]:
                raise LoraError(f"{path}: A {a} and B {b} do not fit together for {entry.layout}")
            if entry.weight_shape != shape:
                raise LoraError(
                    f"{path}: the adapter was made for a weight of shape {entry.weight_shape}, "
                    f"the base has {shape}"
                )
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise LoraError(f"{path}: base leaf has non-floating dtype {dtype}")
            if entry.is_dora and np.shape(entry.magnitude) != entry.magnitude_shape:
                raise LoraError(
                    f"{path}: DoRA magnitude has shape {np.shape(entry.magnitude)}, the factors "
                    f"need {entry.magnitude_shape} (one entry per batch and fan-out index)"
                )
        elif np.shape(entry) != shape or getattr(entry, "dtype", None) != dtype:
            raise LoraError(
                f"{path}: trainable leaf {np.shape(entry)} {getattr(entry, 'dtype', None)} does "
                f"not match the base leaf {shape} {dtype}"
            )


def _unfold(w: jax.Array, factors: LoraFactors, norms: jax.Array | None) -> jax.Array:
    w = w.astype(jnp.float32)
    if factors.is_dora:
        # W = V·m/‖V‖ ⇒ V = W·‖V‖/m. A zero column of V stays zero; with m = 0 the column
        # is lost (0·∞ = NaN, which safe=True reports).
        m = factors.magnitude.astype(jnp.float32)
        ratio = jnp.where(norms > 0, norms.astype(jnp.float32) / m, 0.0)
        w = w * to_weight_axes(ratio, factors.layout)
    return w - delta(factors)


def _apply(
    weights: dict[str, Any], lora: dict[str, Any], sign: float, dtype: Any, norms: dict
) -> dict:
    out = {}
    for path, w in weights.items():
        entry = lora.get(path)
        if isinstance(w, QuantizedArray):
            out_dtype = w.dtype if dtype is None else dtype
            w = w.dequantize(jnp.float32 if isinstance(entry, LoraFactors) else out_dtype)
        else:
            out_dtype = w.dtype
        if isinstance(entry, LoraFactors):
            folded = dora_weight(w, entry) if sign > 0 else _unfold(w, entry, norms.get(path))
            out[path] = folded.astype(out_dtype)
        elif entry is not None and sign > 0:
            out[path] = entry
        else:
            out[path] = w
    return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fold(weights: dict, lora: dict, sign: float, dtype: Any, norms: dict) -> dict:
    return _apply(weights, lora, sign, dtype, norms)


_fold_donated = jax.jit(_apply, static_argnums=(2, 3), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _finite(weights: dict, lora: dict, sign: float, dtype: Any, norms: dict) -> dict:
    folded = _apply(weights, lora, sign, dtype, norms)
    return {p: jnp.all(jnp.isfinite(w)) for p, w in folded.items()}


def _fold_tree(
    params: Any,
    lora: dict[str, Any],
    sign: float,
    donate: bool,
    safe: bool,
    what: str,
    dtype: Any = None,
    norms: dict[str, jax.Array] | None = None,
) -> Any:
    check_fits(params, lora)
    flat, treedef = jax.tree_util.tree_flatten(
        params, is_leaf=lambda x: isinstance(x, QuantizedArray)
    )
    paths = [p for p, _ in weight_leaves(params)]
    quantized = [p for p, leaf in zip(paths, flat, strict=True) if isinstance(leaf, QuantizedArray)]
    if quantized and sign < 0:
        raise LoraError(
            f"unmerge of a quantized base ({', '.join(quantized[:3])}"
            f"{', …' if len(quantized) > 3 else ''}) is refused: its weights are the "
            "quantized frozen base itself, with no adapter folded in to take out; keep "
            "the quantized base and the LoRA tree, or merge(base, lora) for a float model"
        )
    norms = _check_norms(lora, norms) if sign < 0 else {}
    weights = {
        p: leaf
        for p, leaf in zip(paths, flat, strict=True)
        if p in lora or isinstance(leaf, QuantizedArray)
    }
    if safe:
        # Checked before folding so that a donated input is never lost to a bad result.
        bad = [p for p, ok in _finite(weights, lora, sign, dtype, norms).items() if not bool(ok)]
        if bad:
            raise LoraError(f"{what} would produce NaN/Inf at {sorted(bad)}; nothing was changed")
    # A quantized weight's stored arrays cannot hold its float result: never donated.
    fold = _fold_donated if donate and not quantized else _fold
    folded = fold(weights, lora, sign, dtype, norms)
    leaves = [folded.get(p, leaf) for p, leaf in zip(paths, flat, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def merge(
    base: Any,
    lora: dict[str, Any],
    *,
    donate: bool = False,
    safe: bool = False,
    dtype: Any = None,
) -> Any:
    """Params with the structure of ``base`` and ``W0 + scale·A·B`` in every adapted leaf.

    A DoRA leaf becomes ``m·V/‖V‖_c`` with ``V = W0 + scale·A·B`` (:mod:`lorax_fn.variants.dora`;
    the norm is a constant in the gradient, as in PEFT).

    Fully trainable leaves are replaced by their trained values. The update is
    accumulated in float32 and cast back to each weight's dtype. ``donate=True`` lets
    XLA reuse the adapted base buffers (the caller must not use them afterwards);
    ``safe=True`` first checks the result is finite and raises naming the paths if not.

    A quantized base (:func:`lorax_fn.quantize_base`, QLoRA) merges into a float model
    for serving: every :class:`~lorax_fn.QuantizedArray` is dequantized (in float32,
    plus its update if adapted) into its original dtype, or ``dtype`` when given
    (``dtype`` applies to quantized weights only; their stored arrays are never donated).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> base, lora = split({"w": jnp.ones((4, 4))}, LoraSpec("w", rank=2),
        ...                    key=jax.random.key(0))
        >>> bool(jnp.array_equal(merge(base, lora)["w"], base["w"]))  # B = 0 at init
        True
        >>> from lorax_fn import quantize_base
        >>> merge(quantize_base({"w": jnp.ones((4, 64))}, "w"), {}, dtype=jnp.bfloat16)["w"].dtype
        dtype(bfloat16)
    """
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise LoraError(f"merge: dtype must be floating, got {dtype}")
    return _fold_tree(
        base, lora, 1.0, donate, safe, "merge", None if dtype is None else jnp.dtype(dtype)
    )


def _check_norms(lora: dict[str, Any], norms: dict[str, jax.Array] | None) -> dict:
    dora = {p: f for p, f in lora.items() if isinstance(f, LoraFactors) and f.is_dora}
    norms = dict(norms or {})
    if missing := sorted(set(dora) - set(norms)):
        raise LoraError(
            f"unmerge of DoRA weights {missing} needs their column norms: a merged DoRA weight "
            "m·V/‖V‖ does not determine the base. Keep "
            "norms = lorax_fn.dora_norms(base, lora) "
            "from before merging and call unmerge(merged, lora, norms=norms)"
        )
    if extra := sorted(set(norms) - set(dora)):
        raise LoraError(f"unmerge: norms given for paths that are not DoRA entries: {extra}")
    for p, f in dora.items():
        if np.shape(norms[p]) != f.magnitude_shape:
            raise LoraError(
                f"{p}: norms have shape {np.shape(norms[p])}, "
                f"the DoRA magnitude {f.magnitude_shape}"
            )
    return norms


def dora_norms(base: Any, lora: dict[str, Any]) -> dict[str, jax.Array]:
    """``{path: ‖W0 + scale·A·B‖_c}`` for every DoRA entry: what an exact unmerge needs.

    A merged DoRA weight ``m·V/‖V‖_c`` does not determine ``W0`` (any column length
    of ``V`` gives the same weight), so keep these small vectors (one per output column)
    when you merge and pass them to ``unmerge(merged, lora, norms=...)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> w = jax.random.normal(jax.random.key(0), (8, 4))
        >>> base, lt = split({"w": w}, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
        >>> norms = dora_norms(base, lt)
        >>> back = unmerge(merge(base, lt), lt, norms=norms)
        >>> bool(jnp.allclose(back["w"], base["w"], atol=1e-5))
        True
    """
    return _dora_norms(base, lora, "dora_norms")


def _dora_norms(base: Any, lora: dict[str, Any], who: str) -> dict[str, jax.Array]:
    check_fits(base, lora)
    dora = {p: f for p, f in lora.items() if isinstance(f, LoraFactors) and f.is_dora}
    if not dora:
        raise LoraError(f"{who}: the LoRA tree has no DoRA entries (LoraSpec(use_dora=True))")
    # One weight at a time, V never formed: a quantized base is never in float at once.
    norms = {p: _weight_norms(w, dora[p]) for p, w in weight_leaves(base) if p in dora}
    return {p: norms[p] for p in dora}


@jax.jit
def _weight_norms(w: Any, factors: LoraFactors) -> jax.Array:
    if isinstance(w, QuantizedArray):
        w = w.dequantize(jnp.float32)
    return weight_norms(w, factors)


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
        >>> from lorax_fn import LoraSpec, quantize_base, split
        >>> w = jax.random.normal(jax.random.key(0), (64, 8))
        >>> base, lt = split({"w": w}, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
        >>> qbase = quantize_base(base, "w")
        >>> lt = init_magnitudes(qbase, lt)
        >>> merged = merge(qbase, lt)["w"]
        >>> bool(jnp.allclose(merged, qbase["w"].dequantize(), atol=1e-5))
        True
    """
    norms = _dora_norms(base, lora, "init_magnitudes")
    return {
        p: dataclasses.replace(e, magnitude=norms[p].astype(e.magnitude.dtype)) if p in norms else e
        for p, e in lora.items()
    }


def unmerge(
    merged: Any,
    lora: dict[str, Any],
    *,
    donate: bool = False,
    safe: bool = False,
    norms: dict[str, jax.Array] | None = None,
) -> Any:
    """Subtract ``scale·A·B`` again: ``unmerge(merge(base, lora), lora) ≈ base``.

    Fully trainable leaves keep their trained values (their originals live in ``base``).
    The round trip is exact up to rounding: ≤ 1e-6 relative in float32; for bfloat16
    weights each of the two casts rounds, so expect ≈ 2⁻⁸ relative to ``|W0| + |ΔW|``.
    A tree holding quantized weights is refused (:class:`LoraError`): the quantized base
    has no adapter folded in; ``merge`` of it gives the float model. DoRA weights need
    ``norms=dora_norms(base, lora)``, kept from before merging (see :func:`dora_norms`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> base, lora = split({"w": jnp.ones((4, 4))}, LoraSpec("w", rank=2),
        ...                    key=jax.random.key(0))
        >>> bool(jnp.allclose(unmerge(merge(base, lora), lora)["w"], base["w"]))
        True
    """
    return _fold_tree(merged, lora, -1.0, donate, safe, "unmerge", norms=norms)
