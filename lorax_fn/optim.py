"""`optimizer`: an optax transformation that trains the factors and keeps nothing for the rest.

Every leaf of the tree being optimised gets one label (:func:`lora_labels`):

- ``"lora_a"`` / ``"lora_b"``: the A and B arrays of each :class:`~lorax_fn.LoraFactors`;
- an adapter variant's extra arrays (:mod:`lorax_fn.variants`): the label its variant
  gives each (``Variant.label``, by default ``"lora_<name>"``);
- ``"trainable"``: any other floating leaf (the leaves ``LoraSpec(trainable=...)`` put in
  the LoRA tree, or whatever else a combined tree holds that is not frozen);
- ``"frozen"``: leaves matched by ``frozen=`` and every non-floating leaf (integer
  counters, PRNG keys). They go to ``optax.set_to_zero()``: zero updates, no state.

:func:`optimizer` is ``optax.partition`` (formerly ``optax.multi_transform``) over those
labels, so each label holds optimizer state for its own leaves only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors
from lorax_fn.paths import (
    PathFilter,
    as_filters,
    compile_filter,
    path_str,
    unmatched_filter,
)
from lorax_fn.variants.base import get, names

LORA_A, LORA_B, TRAINABLE, FROZEN = "lora_a", "lora_b", "trainable", "frozen"

# Biases, norm scales and norm layers: the leaves AdamW recipes (BERT, GPT-2, PEFT
# trainers) leave undecayed. Matched per path component.
_NO_DECAY = re.compile(r"(?i)(?:^|/)(?:bias|scale|[^/]*norm[^/]*|ln(?:_[^/]*|\d*))(?:/|$)")


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def _is_float(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return isinstance(leaf, float | complex)
    return jnp.issubdtype(dtype, jnp.inexact)


def _extra_label(variant: str, extra: str) -> str:
    label = get(variant).label(extra)
    # An extra under A's, B's or a plain leaf's label would silently take their
    # transform (LoRA+'s ratio, trainable_tx, or none at all).
    if label in (LORA_A, LORA_B, TRAINABLE, FROZEN):
        raise LoraError(
            f"adapter variant {variant!r} labels its extra array {extra!r} {label!r}, a "
            "label lorax_fn.optimizer keeps for other leaves; give it a label of its own"
        )
    return label


def _factor_labels(factors: LoraFactors) -> LoraFactors:
    """``factors`` with each array replaced by its label."""
    extras = {name: _extra_label(factors.variant, name) for name in factors.extras}
    # A variant may hold a fixed factor (trainable tokens' row selection P = A).
    frozen = getattr(get(factors.variant), "frozen_factors", ())
    a, b = (FROZEN if n in frozen else label for n, label in (("a", LORA_A), ("b", LORA_B)))
    return dataclasses.replace(factors, a=a, b=b, extras=extras)


def _variant_labels() -> set[str]:
    """Every label an extra array of a registered variant can have.

    A label that :func:`_extra_label` refuses is left out: the refusal belongs to the
    trees that use that variant, not to every optimizer built while it is registered.
    """
    labels = {get(n).label(extra) for n in names() for extra in get(n).extras}
    return labels - {LORA_A, LORA_B, TRAINABLE, FROZEN}


def lora_labels(params: Any, *, frozen: PathFilter | Sequence[PathFilter] = ()) -> Any:
    """The optax label of every leaf of ``params``: a tree of the same structure.

    Use it to build your own ``optax.partition`` with the labels ``"lora_a"``,
    ``"lora_b"``, those of the adapter variants' extra arrays (``Variant.label``),
    ``"trainable"`` and ``"frozen"``.
    ``frozen`` filters (globs, regexes or callables over the ``/``-joined paths of
    ``params``) win over every other label; a filter that matches no leaf is an error
    listing the nearest paths.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
        >>> base, lt = split(params, LoraSpec("w", rank=2, trainable="b"), key=jax.random.key(0))
        >>> labels = lora_labels(lt)
        >>> labels["w"].a, labels["w"].b, labels["b"]
        ('lora_a', 'lora_b', 'trainable')
        >>> lora_labels({"base": base, "lora": lt}, frozen="base/**")["base"]
        {'b': 'frozen', 'w': 'frozen'}
    """
    return _labels(params, as_filters(frozen), strict=True)


def _labels(params: Any, filters: tuple[PathFilter, ...], *, strict: bool) -> Any:
    predicates = [compile_filter(f) for f in filters]
    hits = [0] * len(filters)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    # A factor's leaves are labelled by the field they sit in: label each LoraFactors
    # node as a whole, then key its labels by the full paths of its leaves.
    factor_labels = {
        path_str(k + sub): label
        for k, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_factors)[0]
        if _is_factors(x)
        for sub, label in jax.tree_util.tree_flatten_with_path(_factor_labels(x))[0]
    }
    labels = []
    for key_path, leaf in flat:
        path = path_str(key_path)
        matched = [i for i, match in enumerate(predicates) if match(path, leaf)]
        for i in matched:
            hits[i] += 1
        if matched or not _is_float(leaf):
            labels.append(FROZEN)
        else:
            labels.append(factor_labels.get(path, TRAINABLE))
    for f, n in zip(filters, hits, strict=True):
        if strict and not n:
            raise unmatched_filter(f, [path_str(k) for k, _ in flat], "frozen filter")
    return jax.tree_util.tree_unflatten(treedef, labels)


def optimizer(
    tx: optax.GradientTransformation,
    params: Any = None,
    *,
    frozen: PathFilter | Sequence[PathFilter] = (),
    trainable_tx: optax.GradientTransformation | None = None,
    lora_plus_ratio: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` on the LoRA factors and trainable leaves; zero updates and no state elsewhere.

    Args:
      tx: the optimizer for A and B (and for trainable leaves unless ``trainable_tx``).
      params: optional: the tree you will differentiate and update — normally the LoRA
        tree from :func:`lorax_fn.split`. Labels are computed from whatever tree
        ``init``/``update`` receive, so the optimizer needs no tree to be built and
        composes with optax utilities such as ``optax.tree_map_params``. Given a tree,
        it keeps state only for the labels that tree has (without one, each trained
        label keeps its ``count`` scalar even when empty), and ``init``/``update``
        refuse a tree of other paths or structure with a :class:`LoraError` naming the
        first differing path. A *combined* tree (say ``{"base": base, "lora": lt}``
        or a full parameter tree) works too: name its frozen part with ``frozen``.
      frozen: path filters whose leaves get zero updates and no optimizer state
        (``optax.set_to_zero``); each must match a leaf of the tree. Non-floating
        leaves are always frozen. ``optax.apply_updates`` then adds ``+0.0``, which
        keeps every value (and bit, save that ``-0.0`` becomes ``+0.0``).
      trainable_tx: a separate optimizer for the fully trainable (non-factor) leaves,
        e.g. a classifier head at another learning rate. Defaults to ``tx``.
      lora_plus_ratio: LoRA+ (Hayou et al., 2024): B learns ``ratio`` times faster than
        A; the paper suggests ``ratio ≈ 16``. A variant's extra arrays are not B (LoRA+'s
        analysis is about the A/B product) and keep the plain rate. Implemented as
        ``optax.scale(ratio)`` after ``tx`` on B's updates. That is exactly B at learning
        rate ``ratio · lr`` whenever ``tx`` ends by multiplying by the learning rate, as
        optax's SGD, momentum, Adam, AdamW (decay included) and their schedules do: the
        moment estimates are kept per label and never see the ratio, only the final step
        does.

    Weight decay belongs inside ``tx`` so it shares the learning-rate schedule: pass
    ``optax.adamw(lr, weight_decay=wd, mask=lorax_fn.weight_decay_mask)``.

    An adapter variant's extra arrays (:mod:`lorax_fn.variants`) each carry the label
    their variant gives them: they are part of the adapter, trained by ``tx`` as PEFT
    does (never by ``trainable_tx``, which is for leaves such as a head, and without
    LoRA+'s ratio), and weight-decayed by :func:`weight_decay_mask` only where the
    variant says so. Without ``params`` the optimizer holds a transform for the labels
    of every variant registered when it is built: register a variant first.

    It is ``optax.partition`` with callable labels (:func:`lora_labels`): each
    non-frozen label keeps its own copy of ``tx``'s state over its own leaves: with
    Adam, two moments per trained element plus one ``count`` scalar per label.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from lorax_fn import LoraSpec, split
        >>> base, lt = split({"w": jnp.ones((8, 8))}, LoraSpec("w", rank=2),
        ...                  key=jax.random.key(0))
        >>> tx = optimizer(optax.adam(1e-3), lt, lora_plus_ratio=16.0)
        >>> state = tx.init(lt)
        >>> grads = jax.tree.map(jnp.ones_like, lt)
        >>> updates, state = tx.update(grads, state, lt)
        >>> lt = optax.apply_updates(lt, updates)
        >>> tx = optimizer(optax.adam(1e-3))  # no tree needed: labels come from init's tree
        >>> moments = optax.tree_map_params(tx, lambda p: p.shape, tx.init(lt))
    """
    if lora_plus_ratio is not None and not (
        isinstance(lora_plus_ratio, int | float)
        and not isinstance(lora_plus_ratio, bool)
        and lora_plus_ratio > 0
    ):
        raise LoraError(f"lora_plus_ratio must be a number > 0, got {lora_plus_ratio!r}")
    filters = as_filters(frozen)
    b_tx = tx if lora_plus_ratio is None else optax.chain(tx, optax.scale(lora_plus_ratio))
    candidates = {
        LORA_A: tx,
        LORA_B: b_tx,
        TRAINABLE: tx if trainable_tx is None else trainable_tx,
        FROZEN: optax.set_to_zero(),
    }
    # Given a tree, only its labels get a transform: an absent one would still keep
    # its own state (e.g. Adam's step count) for nothing. Without one, every label a
    # registered variant can give an extra array needs one.
    if params is None:
        present = [*candidates, *sorted(_variant_labels())]
    else:
        labels = set(jax.tree.leaves(_labels(params, filters, strict=True)))
        present = [*(k for k in candidates if k in labels), *sorted(labels - set(candidates))]
    transforms = {k: candidates.get(k, tx) for k in present}
    inner = optax.partition(transforms, lambda tree: _labels(tree, filters, strict=False))

    def check(tree: Any, where: str) -> None:
        if params is not None:
            problem = _first_difference(params, tree)
            if problem:
                raise LoraError(f"optimizer {where}: {problem}")
        # A leaf whose label has no transform would get no update from optax.partition's
        # update (its init raises): only a variant registered after this call can do that.
        missing = set(jax.tree.leaves(_labels(tree, filters, strict=False))) - set(transforms)
        if missing:
            raise LoraError(
                f"optimizer {where}: the tree has extra arrays labelled {sorted(missing)}, of "
                "an adapter variant registered after the optimizer was built: build it "
                "after registering the variant, or pass params"
            )

    def init(tree: Any) -> Any:
        # A tree without leaves stands for the params in optax.tree_map_params, which
        # inits with a placeholder to find the copies of the params in the state.
        if jax.tree.leaves(tree):
            check(tree, "init")
            _labels(tree, filters, strict=True)  # each frozen filter must match a leaf
        return inner.init(tree)

    def update(updates: Any, state: Any, tree: Any = None, **extra_args: Any) -> Any:
        check(updates, "update (the updates)")
        if tree is not None:
            check(tree, "update (the params)")
        return inner.update(updates, state, tree, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)


def _kind(x: Any) -> str:
    if _is_factors(x):
        return f"LoraFactors(scale={x.scale:g}, layout={x.layout}, dropout={x.dropout:g})"
    return "a plain leaf"


def _first_difference(want: Any, got: Any) -> str | None:
    """Where ``got`` first differs from ``want`` in paths or structure, or None."""
    if jax.tree.structure(want) == jax.tree.structure(got):
        return None

    def entries(tree: Any) -> dict[str, str]:
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_factors)[0]
        return {path_str(k): _kind(x) for k, x in flat}

    w, g = entries(want), entries(got)
    missing, unexpected = [p for p in w if p not in g], [p for p in g if p not in w]
    lists = f" (missing {missing[:5]}, unexpected {unexpected[:5]})"
    intro = "the tree is not the tree the optimizer was built for; first difference at "
    for path, kind in w.items():
        if path not in g:
            return f"{intro}{path!r}: missing{lists}"
        if g[path] != kind:
            return f"{intro}{path!r}: {g[path]}, built for {kind}"
    if unexpected:
        return f"{intro}{unexpected[0]!r}: unexpected{lists}"
    return (
        "the tree has the paths of the tree the optimizer was built for, but other container types"
    )


def weight_decay_mask(params: Any) -> Any:
    """``True`` for the leaves weight decay should shrink: A, B and ≥2-D weights.

    LoRA's A and B are always decayed; an adapter variant's extra arrays are decayed
    where the variant says so (``Variant.is_decayed``; none by default, since an extra
    that scales columns starts away from zero). Other leaves are
    decayed when they have at least two axes and no path component is ``bias`` or
    ``scale`` or contains ``norm`` (or is ``ln``, ``ln_f``, ``ln1``…): biases and
    normalisation parameters are left alone, stacked (``nn.scan``) ones included.
    Works on the masked trees ``optax.partition`` hands to each inner optimizer, so it
    can be given to optax directly.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> weight_decay_mask({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        ...                    "LayerNorm_0": {"scale": jnp.ones(2)}})
        {'LayerNorm_0': {'scale': False}, 'dense': {'bias': False, 'kernel': True}}
        >>> from lorax_fn import Layout
        >>> from lorax_fn.variants.base import Variant, register
        >>> class Gain(Variant):  # a learned per-column gain, not decayed
        ...     name, extras = "doc_decay_gain", ("gain",)
        >>> f = LoraFactors(jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, Layout((0,), (1,)),
        ...                 extras={"gain": jnp.ones(2)}, variant=register(Gain()).name)
        >>> mask = weight_decay_mask({"w": f})["w"]
        >>> mask.a, mask.b, mask.extras
        (True, True, {'gain': False})
        >>> tx = optax.adamw(1e-3, weight_decay=1e-2, mask=weight_decay_mask)
    """

    def decide(key_path: Any, leaf: Any) -> Any:
        if _is_factors(leaf):
            variant = get(leaf.variant)
            extras = {name: variant.is_decayed(name) for name in leaf.extras}
            return dataclasses.replace(leaf, a=True, b=True, extras=extras)
        return np.ndim(leaf) >= 2 and _NO_DECAY.search(path_str(key_path)) is None

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=_is_factors)
