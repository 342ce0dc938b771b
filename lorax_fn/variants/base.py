"""The adapter-variant protocol: what a kind of adapter adds to plain LoRA.

Every wing of the library asks an adapter's variant what it needs and never names one:
``split`` its extra arrays' initial values, ``lora(fn)`` how a factorized consumer
applies it, ``merge``/``unmerge`` the adapted weight and its inverse, the optimizer
each extra array's label and decay rule, ``lora_shardings`` their placement,
checkpoints their names, PEFT export/import its tensors. A wing that cannot serve a
variant refuses it by name: stacks, ``multi_lora`` and ``combine`` hold plain LoRA only.

The shape this protocol fixes: a variant's trainable arrays beyond A and B are
*column vectors* — one entry per (batch, fan-out) index of the weight, the shape of B
without its rank axis — and a variant changes the weight only by scaling the columns of
``V = W0 + scale·A·B``:

    W = V · c,    c = variant.column_scale(W0, factors)    (shape (*batch, *out))

so that every factorized consumer scales its output columns (or, contracting the
fan-out, its input) by ``c``. DoRA (``c = m/‖V‖_c``) and a learned per-column gain
(``c = g``) are two such variants; plain LoRA has no ``c``.

A variant may also add a term to the layer's *output* that no weight expresses
(:meth:`Variant.output_bias`, PEFT's ``lora_bias``: ``x·W + scale·β``). ``lora(fn)`` adds
it to each product contracting the weight's whole fan-in and refuses every other use
of the weight; ``merge`` folds it into the layer's own bias leaf.

Example:
    >>> import jax, jax.numpy as jnp, lorax_fn
    >>> class Gain(Variant):  # a learned per-column gain on top of LoRA
    ...     name, extras = "doc_gain", ("gain",)
    ...     def init(self, w0, factors):
    ...         return {"gain": jnp.ones(factors.column_shape, factors.a.dtype)}
    ...     def column_scale(self, w0, factors):
    ...         return factors.extras["gain"].astype(jnp.float32)
    >>> _ = register(Gain())
    >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))},
    ...                           lorax_fn.LoraSpec("w", rank=2, variant="doc_gain"),
    ...                           key=jax.random.key(0))
    >>> lt["w"].variant, lt["w"].extras["gain"].shape
    ('doc_gain', (4,))
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, delta


class Variant:
    """Plain LoRA; subclass and override to make a variant, then :func:`register` it.

    Attributes:
      name: the registry key, stored in checkpoints and given as ``LoraSpec(variant=...)``.
      title: how messages name it ("DoRA adapters cannot be stacked").
      extras: the names of its trainable arrays beyond A and B (column vectors).
      decayed: the extras that weight decay may shrink (default none: an extra that
        scales columns starts at a non-zero value, so decaying it towards zero pulls
        the model away from the base, unlike A and B).
      peft_config: the keys this variant sets in PEFT's ``adapter_config.json``
        (DoRA: ``{"use_dora": True}``); ``None`` when PEFT has no such adapter.
      peft_tensors: for each extra, the suffix PEFT uses for it after the module name
        (DoRA: ``{"magnitude": ".lora_magnitude_vector"}``).
      per_layer: whether ``column_scale`` of a stacked weight is, layer by layer,
        ``column_scale`` of that layer's slice (W0, factors and extras sliced along the
        stacked axis). Then ``lora(fn)`` computes it inside the loop that slices the
        weight (a ``scan`` over layers), one layer at a time; default False: once,
        for the whole stack.
    """

    name: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"
    extras: ClassVar[tuple[str, ...]] = ()
    decayed: ClassVar[tuple[str, ...]] = ()
    peft_config: ClassVar[dict[str, Any] | None] = {}
    peft_tensors: ClassVar[dict[str, str]] = {}
    per_layer: ClassVar[bool] = False
    # What unmerge needs that the merged weight no longer holds (None: nothing), and how
    # an error tells the user to keep it.
    unmerge_hint: ClassVar[str | None] = None

    def init(self, w0: Any, factors: LoraFactors) -> dict[str, jax.Array]:
        """The extras' values for ``factors`` on the float weight ``w0`` (at ``split``)."""
        return {}

    def weight(self, w0: jax.Array, factors: LoraFactors) -> jax.Array:
        """The adapted weight in float32, as ``merge`` folds it: ``(W0 + scale·A·B)·c``."""
        v = w0.astype(jnp.float32) + delta(factors)
        return apply_columns(v, self.column_scale(w0, factors), factors)

    def column_scale(self, w0: Any, factors: LoraFactors) -> jax.Array | None:
        """``c`` with ``W = (W0 + scale·A·B)·c``, float32 ``(*batch, *out)``; None: no scale.

        ``w0`` is the weight as the caller holds it: an array, or inside ``lora(fn)`` a
        quantized weight's lazy view (:class:`lorax_fn.quant.lazy.LazyWeight`).
        """
        return None

    def output_bias(self, factors: LoraFactors) -> jax.Array | None:
        """The term added to the layer's output, float32 ``(*batch, *out)``; None: none.

        Not a part of the weight: ``lora(fn)`` adds it to each product of an input with
        the weight over its whole fan-in (a dense layer, a conv), and ``merge`` adds it to
        the layer's bias leaf (:func:`lorax_fn.merge.bias_path`).
        """
        return None

    def unmerge_state(self, w0: jax.Array, factors: LoraFactors) -> jax.Array | None:
        """What an exact ``unmerge`` needs that the merged weight no longer holds.

        Taken from the base before merging (DoRA: the column norms ``‖V‖_c``, since a
        merged ``m·V/‖V‖_c`` does not determine them); None when nothing is needed.
        """
        return None

    def inverse_column_scale(self, factors: LoraFactors, state: Any) -> jax.Array | None:
        """``1/c`` for ``unmerge`` (``V = W·(1/c)``), from the extras and ``state``."""
        return None

    def is_decayed(self, extra: str) -> bool:
        """Whether weight decay applies to the extra array ``extra``."""
        return extra in self.decayed

    def label(self, extra: str) -> str:
        """The optimizer label of the extra array ``extra`` (``lorax_fn.optimizer``)."""
        return f"lora_{extra}"


_REGISTRY: dict[str, Variant] = {}
# Variants shipped with lorax_fn, imported when first asked for: the core asks the
# registry, so it never imports a variant's module (which may import the core).
_BUILT_IN = {"dora": "lorax_fn.variants.dora", "lora_bias": "lorax_fn.variants.lora_bias"}


def register(variant: Variant) -> Variant:
    """Make ``variant`` known by its ``name`` to every wing; returns it.

    Registering a name again replaces the variant (e.g. a reloaded notebook cell).

    Example:
        >>> class Named(Variant):
        ...     name = "doc_named"
        >>> get(register(Named()).name).name
        'doc_named'
    """
    if not isinstance(variant, Variant):
        raise LoraError(f"register: expected a lorax_fn.variants.Variant, got {variant!r}")
    bad = [e for e in variant.extras if not e.isidentifier() or e in ("a", "b")]
    if bad:
        raise LoraError(f"variant {variant.name!r}: extra array names {bad} are not allowed")
    _REGISTRY[variant.name] = variant
    return variant


def get(name: str) -> Variant:
    """The registered variant called ``name``; :class:`LoraError` listing the known ones.

    Example:
        >>> get("lora").extras
        ()
    """
    if name not in _REGISTRY and name in _BUILT_IN:
        importlib.import_module(_BUILT_IN[name])  # registers itself
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoraError(
            f"unknown adapter variant {name!r}; registered: {sorted(_REGISTRY)}. A variant "
            "defined outside lorax_fn must be registered (lorax_fn.variants.register) "
            "before it is used, also before restoring a checkpoint that holds it"
        ) from None


def names() -> list[str]:
    """The registered variants' names.

    Example:
        >>> "lora" in names() and "dora" in names()
        True
    """
    return sorted(set(_REGISTRY) | set(_BUILT_IN))


def apply_columns(v: jax.Array, c: jax.Array | None, factors: LoraFactors) -> jax.Array:
    """``v`` (laid out like the weight) with each column times ``c`` (``None``: as is).

    Example:
        >>> from lorax_fn.factors import Layout, LoraFactors
        >>> f = LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 2)), 1.0, Layout((0,), (1,)))
        >>> apply_columns(jnp.ones((3, 2)), jnp.array([2.0, 0.5]), f)[0]
        Array([2. , 0.5], dtype=float32)
    """
    if c is None:
        return v
    return v * to_weight_axes(c, factors.layout)


def to_weight_axes(x: jax.Array, layout: Any) -> jax.Array:
    """A ``(*batch, *out)`` array laid out to broadcast against the weight (unit fan-in axes).

    Example:
        >>> from lorax_fn.factors import Layout
        >>> to_weight_axes(jnp.ones((3,)), Layout((1,), (0,))).shape  # weight (out=3, in)
        (3, 1)
    """
    nb = len(layout.batch_axes)
    shape = x.shape[:nb] + (1,) * len(layout.in_axes) + x.shape[nb:]
    order = layout.batch_axes + layout.in_axes + layout.out_axes
    return jnp.transpose(x.reshape(shape), np.argsort(order))


register(Variant())


def refuse_unstackable(tree: Any, what: str) -> None:
    """Raise :class:`LoraError` naming the entries of ``tree`` that are not plain LoRA.

    Stacks, ``multi_lora`` and ``combine`` (:mod:`lorax_fn.multi`) carry each adapter's A
    and B only: an adapter of any other variant would silently become plain LoRA there.
    ``tree`` maps paths to entries (a LoRA tree or a stack's entries); leaves trained in
    full pass.

    Example:
        >>> from lorax_fn.factors import Layout
        >>> class Gain(Variant):
        ...     name, title, extras = "doc_unstackable", "Gain", ("gain",)
        >>> f = LoraFactors(jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, Layout((0,), (1,)),
        ...                 extras={"gain": jnp.ones(2)}, variant=register(Gain()).name)
        >>> refuse_unstackable({"w": f.plain()}, "the stack")  # plain LoRA passes
        >>> refuse_unstackable({"w": f}, "the stack")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the stack: w: Gain adapters (variant 'doc_unstackable') ...
    """
    refused: dict[str, list[str]] = {}
    for path, entry in dict(tree).items():
        if isinstance(entry, LoraFactors) and (entry.variant != "lora" or entry.extras):
            refused.setdefault(entry.variant, []).append(path)
    for name, paths in sorted(refused.items()):
        shown = ", ".join(sorted(paths)[:5]) + (" …" if len(paths) > 5 else "")
        raise LoraError(
            f"{what}: {shown}: {get(name).title} adapters (variant {name!r}) cannot be stacked "
            "or combined: stacks, multi_lora and combine carry A and B only and would compute "
            "plain LoRA. Merge them (lorax_fn.merge) and serve each merged model, or use plain "
            "LoRA adapters"
        )
