"""`merge` / `unmerge`: fold ``scale·A·B`` into the base weights and take it out again."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, delta
from lorax_fn.quantize import QuantizedArray, weight_leaves


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
        elif np.shape(entry) != shape or getattr(entry, "dtype", None) != dtype:
            raise LoraError(
                f"{path}: trainable leaf {np.shape(entry)} {getattr(entry, 'dtype', None)} does "
                f"not match the base leaf {shape} {dtype}"
            )


def _apply(weights: dict[str, Any], lora: dict[str, Any], sign: float, dtype: Any) -> dict:
    out = {}
    for path, w in weights.items():
        entry = lora.get(path)
        if isinstance(w, QuantizedArray):
            out_dtype = w.dtype if dtype is None else dtype
            w = w.dequantize(jnp.float32 if isinstance(entry, LoraFactors) else out_dtype)
        else:
            out_dtype = w.dtype
        if isinstance(entry, LoraFactors):
            out[path] = (w.astype(jnp.float32) + sign * delta(entry)).astype(out_dtype)
        elif entry is not None and sign > 0:
            out[path] = entry
        else:
            out[path] = w
    return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fold(weights: dict, lora: dict, sign: float, dtype: Any) -> dict:
    return _apply(weights, lora, sign, dtype)


_fold_donated = jax.jit(_apply, static_argnums=(2, 3), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _finite(weights: dict, lora: dict, sign: float, dtype: Any) -> dict:
    return {p: jnp.all(jnp.isfinite(w)) for p, w in _apply(weights, lora, sign, dtype).items()}


def _fold_tree(
    params: Any,
    lora: dict[str, Any],
    sign: float,
    donate: bool,
    safe: bool,
    what: str,
    dtype: Any = None,
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
    weights = {
        p: leaf
        for p, leaf in zip(paths, flat, strict=True)
        if p in lora or isinstance(leaf, QuantizedArray)
    }
    if safe:
        # Checked before folding so that a donated input is never lost to a bad result.
        bad = [p for p, ok in _finite(weights, lora, sign, dtype).items() if not bool(ok)]
        if bad:
            raise LoraError(f"{what} would produce NaN/Inf at {sorted(bad)}; nothing was changed")
    # A quantized weight's stored arrays cannot hold its float result: never donated.
    fold = _fold_donated if donate and not quantized else _fold
    folded = fold(weights, lora, sign, dtype)
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


def unmerge(merged: Any, lora: dict[str, Any], *, donate: bool = False, safe: bool = False) -> Any:
    """Subtract ``scale·A·B`` again: ``unmerge(merge(base, lora), lora) ≈ base``.

    Fully trainable leaves keep their trained values (their originals live in ``base``).
    The round trip is exact up to rounding: ≤ 1e-6 relative in float32; for bfloat16
    weights each of the two casts rounds, so expect ≈ 2⁻⁸ relative to ``|W0| + |ΔW|``.
    A tree holding quantized weights is refused (:class:`LoraError`): the quantized base
    has no adapter folded in; ``merge`` of it gives the float model.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> base, lora = split({"w": jnp.ones((4, 4))}, LoraSpec("w", rank=2),
        ...                    key=jax.random.key(0))
        >>> bool(jnp.allclose(unmerge(merge(base, lora), lora)["w"], base["w"]))
        True
    """
    return _fold_tree(merged, lora, -1.0, donate, safe, "unmerge")
