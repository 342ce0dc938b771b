"""`merge` / `unmerge`: fold ``scale·A·B`` into the base weights and take it out again."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, delta
from lorax_fn.quant.quantized import QuantizedArray, weight_leaves
from lorax_fn.subsets import expand_subsets
from lorax_fn.variants.base import apply_columns, get


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
            variant = get(entry.variant)
            if sorted(entry.extras) != sorted(variant.extras):
                raise LoraError(
                    f"{path}: a {variant.title} adapter holds {sorted(variant.extras)} beside A "
                    f"and B, this one {sorted(entry.extras)}"
                )
            for name, x in entry.extras.items():
                if np.shape(x) != entry.column_shape:
                    raise LoraError(
                        f"{path}: {variant.title} {name} has shape {np.shape(x)}, the factors "
                        f"need {entry.column_shape} (one entry per batch and fan-out index)"
                    )
        elif np.shape(entry) != shape or getattr(entry, "dtype", None) != dtype:
            raise LoraError(
                f"{path}: trainable leaf {np.shape(entry)} {getattr(entry, 'dtype', None)} does "
                f"not match the base leaf {shape} {dtype}"
            )


def _unfold(w: jax.Array, factors: LoraFactors, state: Any) -> jax.Array:
    inverse = get(factors.variant).inverse_column_scale(factors, state)
    return apply_columns(w.astype(jnp.float32), inverse, factors) - delta(factors)


def bias_path(path: str) -> str | None:
    """The path of the bias beside the weight at ``path`` (Flax's ``kernel``), else None.

    Where :func:`merge` folds a variant's output term
    (:meth:`lorax_fn.variants.Variant.output_bias`, PEFT's ``lora_bias``).

    Example:
        >>> bias_path("params/dense/kernel"), bias_path("w")
        ('params/dense/bias', None)
    """
    parent, _, leaf = path.rpartition("/")
    if leaf != "kernel":
        return None
    return f"{parent}/bias" if parent else "bias"


def _output_biases(lora: dict[str, Any], leaves: dict[str, Any], what: str) -> dict[str, str]:
    """``{bias path: weight path}`` for the entries adding a term to their layer's output.

    Refused, naming the path, where the layer has no bias leaf of the output's shape: the
    term would be lost from the merged model (PEFT refuses to merge it too).
    """
    out = {}
    for path, entry in sorted(lora.items()):
        if not isinstance(entry, LoraFactors):
            continue
        variant = get(entry.variant)
        if variant.output_bias(entry) is None:
            continue
        bias = bias_path(path)
        where = bias or "(none: the weight is not a layer's 'kernel')"
        shape = None if bias not in leaves else tuple(np.shape(leaves[bias]))
        if shape != entry.column_shape:
            found = "none" if shape is None else f"one of shape {shape}"
            raise LoraError(
                f"{what}: {path}: a {variant.title} adapter adds scale·bias to its layer's "
                f"output, which {what} folds into the layer's bias {where} "
                f"of shape {entry.column_shape}, but the base has {found}. Serve it "
                "unmerged with lorax_fn.lora(fn), or give the layer a bias (use_bias=True)"
            )
        out[bias] = path
    return out


def _apply(
    weights: dict[str, Any],
    lora: dict[str, Any],
    sign: float,
    dtype: Any,
    norms: dict,
    biases: tuple[tuple[str, str], ...] = (),
) -> dict:
    out = {}
    output_bias = dict(biases)
    for path, w in weights.items():
        entry = lora.get(path)
        if isinstance(w, QuantizedArray):
            out_dtype = w.dtype if dtype is None else dtype
            w = w.dequantize(jnp.float32 if isinstance(entry, LoraFactors) else out_dtype)
        else:
            out_dtype = w.dtype
        if isinstance(entry, LoraFactors):
            if sign > 0:
                folded = get(entry.variant).weight(w, entry)
            else:
                folded = _unfold(w, entry, norms.get(path))
            out[path] = folded.astype(out_dtype)
        elif entry is not None and sign > 0:
            out[path] = entry
        else:
            out[path] = w
        if path in output_bias:  # a trained bias leaf gets the term on top of its value
            factors = lora[output_bias[path]]
            term = sign * get(factors.variant).output_bias(factors)
            out[path] = (out[path].astype(jnp.float32) + term).astype(out[path].dtype)
    return out


@functools.partial(jax.jit, static_argnums=(2, 3, 5))
def _fold(weights: dict, lora: dict, sign: float, dtype: Any, norms: dict, biases: tuple) -> dict:
    return _apply(weights, lora, sign, dtype, norms, biases)


_fold_donated = jax.jit(_apply, static_argnums=(2, 3, 5), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=(2, 3, 5))
def _finite(weights: dict, lora: dict, sign: float, dtype: Any, norms: dict, biases: tuple) -> dict:
    folded = _apply(weights, lora, sign, dtype, norms, biases)
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
    biases = _output_biases(lora, dict(zip(paths, flat, strict=True)), what)
    weights = {
        p: leaf
        for p, leaf in zip(paths, flat, strict=True)
        if p in lora or p in biases or isinstance(leaf, QuantizedArray)
    }
    folding = (weights, lora, sign, dtype, norms, tuple(sorted(biases.items())))
    if safe:
        # Checked before folding so that a donated input is never lost to a bad result.
        bad = [p for p, ok in _finite(*folding).items() if not bool(ok)]
        if bad:
            raise LoraError(f"{what} would produce NaN/Inf at {sorted(bad)}; nothing was changed")
    # A quantized weight's stored arrays cannot hold its float result: never donated.
    fold = _fold_donated if donate and not quantized else _fold
    folded = fold(*folding)
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

    An adapter of another variant folds as that variant says
    (:meth:`lorax_fn.variants.Variant.weight`; DoRA: ``m·V/‖V‖_c`` with
    ``V = W0 + scale·A·B``).

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
    lora = expand_subsets(lora)  # a layer subset (lorax_fn.subsets) folds as its full stack
    return _fold_tree(
        base, lora, 1.0, donate, safe, "merge", None if dtype is None else jnp.dtype(dtype)
    )


def _needing_state(lora: dict[str, Any]) -> dict[str, LoraFactors]:
    """The entries whose variant needs a state for an exact unmerge (DoRA: norms)."""
    return {
        p: f
        for p, f in lora.items()
        if isinstance(f, LoraFactors) and get(f.variant).unmerge_hint is not None
    }


def _check_norms(lora: dict[str, Any], norms: dict[str, jax.Array] | None) -> dict:
    """The states that exact unmerges need (``norms=``), checked against the entries."""
    needy = _needing_state(lora)
    norms = dict(norms or {})
    missing: dict[str, list[str]] = {}
    for p in sorted(set(needy) - set(norms)):
        missing.setdefault(needy[p].variant, []).append(p)
    for name, paths in missing.items():
        variant = get(name)
        raise LoraError(f"unmerge of {variant.title} weights {paths} needs {variant.unmerge_hint}")
    if extra := sorted(set(norms) - set(needy)):
        raise LoraError(
            f"unmerge: norms given for paths whose adapters need none (plain LoRA or not "
            f"adapted): {extra}"
        )
    for p, f in needy.items():
        if np.shape(norms[p]) != f.column_shape:
            raise LoraError(
                f"{p}: norms have shape {np.shape(norms[p])}, "
                f"the {get(f.variant).title} adapter's columns {f.column_shape}"
            )
    return norms


def unmerge_states(base: Any, lora: dict[str, Any]) -> dict[str, jax.Array]:
    """``{path: state}``: what each entry's variant needs for an exact ``unmerge``.

    Taken from ``base`` before merging, one weight at a time (a quantized weight is
    dequantized alone); entries whose variant needs nothing are left out. DoRA's state
    is its column norms (:func:`lorax_fn.dora_norms`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> w = jax.random.normal(jax.random.key(0), (8, 4))
        >>> base, lt = split({"w": w}, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
        >>> state = unmerge_states(base, lt)
        >>> back = unmerge(merge(base, lt), lt, norms=state)
        >>> bool(jnp.allclose(back["w"], base["w"], atol=1e-5))
        True
    """
    lora = expand_subsets(lora)
    check_fits(base, lora)
    needy = _needing_state(lora)
    states = {p: _unmerge_state(w, needy[p]) for p, w in weight_leaves(base) if p in needy}
    return {p: states[p] for p in needy}


@jax.jit
def _unmerge_state(w: Any, factors: LoraFactors) -> jax.Array:
    if isinstance(w, QuantizedArray):
        w = w.dequantize(jnp.float32)
    return get(factors.variant).unmerge_state(w, factors)


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
    has no adapter folded in; ``merge`` of it gives the float model. A variant whose
    merged weight does not determine the base (DoRA) needs ``norms=`` what
    :func:`unmerge_states` (for DoRA, :func:`lorax_fn.dora_norms`) returned before
    merging.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> base, lora = split({"w": jnp.ones((4, 4))}, LoraSpec("w", rank=2),
        ...                    key=jax.random.key(0))
        >>> bool(jnp.allclose(unmerge(merge(base, lora), lora)["w"], base["w"]))
        True
    """
    return _fold_tree(merged, expand_subsets(lora), -1.0, donate, safe, "unmerge", norms=norms)
