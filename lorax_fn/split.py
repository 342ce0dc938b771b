"""`split`: a parameter tree and a spec in, the frozen base and the LoRA tree out."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.conventions import attention_named, default_layout
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, LoraTree
from lorax_fn.inits import get as get_init
from lorax_fn.paths import (
    compile_filter,
    filter_name,
    leaves_with_paths,
    quantized_weights,
    unmatched_filter,
)
from lorax_fn.quant.quantized import QuantizedArray
from lorax_fn.spec import LoraSpec
from lorax_fn.transform.layouts import infer_layouts
from lorax_fn.variants.base import Variant
from lorax_fn.variants.base import get as get_variant


def _no_layout(path: str, shape: tuple[int, ...], inferred: str | None) -> LoraError:
    if inferred is not None:
        # The caller already passed infer_layouts' result: say what it found instead.
        return LoraError(f"{path}: infer_layouts found no layout for shape {shape}: {inferred}")
    why = (
        " Its name is a Flax attention kernel's, but its module's kernels are not "
        "query/key/value (d, heads, head_dim) with out (heads, head_dim, d) (an nn.scan "
        "stack of Dense layers, (layers, in, out), looks the same by name)."
        if attention_named(path.split("/"), shape)
        else ""
    )
    return LoraError(
        f"{path}: cannot tell the fan-in axes of shape {shape} from the shape alone.{why} "
        "Pass layouts=lorax_fn.infer_layouts(apply_fn, params, *example_args) or "
        "LoraSpec(layouts={pattern: lorax_fn.Layout(in_axes=..., out_axes=..., "
        "batch_axes=...)})"
    )


def _matches(filters, paths_leaves, what: str) -> dict[str, set[str]]:
    """For each filter, the set of paths it matches; a filter matching nothing is an error."""
    out = {}
    all_paths = [p for p, _ in paths_leaves]
    for f in filters:
        predicate = compile_filter(f)
        hit = {p for p, leaf in paths_leaves if predicate(p, leaf)}
        if not hit:
            raise unmatched_filter(f, all_paths, f"{what} filter", "parameter", "params")
        out[filter_name(f)] = hit
    return out


def _refuse_quantized(spec: LoraSpec, params: Any) -> None:
    """A quantized base flattens into codes and scales: say so, not 'matches no parameter'."""
    for path, leaf in quantized_weights(params):
        # The weight's own path, or one of its stored arrays (…/kernel/scale).
        named = [(path, leaf)] + [(f"{path}/{p}", x) for p, x in leaves_with_paths(leaf)]
        excluded = any(compile_filter(e)(path, leaf) for e in spec.exclude)
        for f in (*(() if excluded else spec.targets), *spec.trainable):
            if any(compile_filter(f)(p, x) for p, x in named):
                raise LoraError(
                    f"{path} is already quantized ({leaf.format}), and filter "
                    f"{filter_name(f)!r} selects it: split comes before quantize_base. Split "
                    "the float params, then quantize the base: base, lt = lorax_fn.split("
                    "params, spec, key=key); qbase = lorax_fn.quantize_base(base, lt)"
                )


def _check_overrides_match(spec: LoraSpec, targeted: list[tuple[str, Any]]) -> None:
    for name, items in (
        ("rank_pattern", spec.rank_pattern),
        ("alpha_pattern", spec.alpha_pattern),
        ("layouts", spec.layouts),
    ):
        if items and targeted:
            _matches([k for k, _ in items], targeted, f"{name}")


def _path_key(key: jax.Array, path: str) -> jax.Array:
    # Keyed by the path's hash, so adding a target never changes another target's init.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _with_variant(factors: LoraFactors, w0: jax.Array, variant: Variant) -> LoraFactors:
    """``factors`` of ``variant``, its extra arrays initialised from the (residual) base."""
    if variant.name == "lora":
        return factors
    factors = dataclasses.replace(factors, variant=variant.name)
    return factors.with_extras(**variant.init(w0, factors))


def split(
    params: Any,
    spec: LoraSpec,
    *,
    key: jax.Array,
    layouts: Mapping[str, Layout] | None = None,
    fn: Callable[..., Any] | None = None,
    example_args: Sequence[Any] = (),
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any, LoraTree]:
    """Split ``params`` into the frozen base and the trainable LoRA tree.

    ``params`` is exactly what the function you will wrap with :func:`lorax_fn.lora`
    takes as its first argument: for linen that is the whole ``variables`` dict
    (``{"params": ..., "batch_stats": ...}``, so paths start with ``params/``), for NNX
    the ``nnx.State`` from ``nnx.split`` — or the ``nnx.Module`` itself, if the function
    takes the module (``lambda model, x: model(x)``); paths read the same either way, and
    the base is then a module of the same structure. The base holds the same arrays,
    untouched — except with an init that rewrites the base (:mod:`lorax_fn.inits`):
    ``"pissa"`` and ``"olora"`` replace targeted weights by their residual
    ``W0 - scale·A·B``, ``"loftq"`` by a :class:`lorax_fn.QuantizedArray` — in a fresh
    container of the same structure: for NNX, fresh Variables, so
    ``nnx.update(model, merge(base, lora))`` leaves the base as it was.
    (``nnx.merge(graphdef, base)`` itself hands the base's Variables to the new module,
    by NNX's rule: pass ``copy=True`` for a module you will modify.)

    Factor shapes follow how each weight is contracted: from ``layouts``, else the
    spec's ``layouts``, else :func:`lorax_fn.conventions.default_layout`; a weight none
    of them can place is an error, never a silently different factorisation. Give ``fn``
    (the function you will wrap) and example inputs, and ``split`` reads the layouts off
    ``fn(params, *example_args, **example_kwargs)`` itself — exactly
    ``layouts=lorax_fn.infer_layouts(fn, params, *example_args, **example_kwargs)``,
    the form for when you want to inspect or edit them first. That is how einsum
    kernels such as Gemma's ``(heads, d, head_dim)`` attention weights are placed. With
    inferred layouts, the error says what it found: the function never reads the
    weight, or reads it through an op it cannot follow (named).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((16, 32)), "bias": jnp.ones(32)}}}
        >>> base, lora = split(params, LoraSpec(targets="**/kernel", rank=4),
        ...                    key=jax.random.key(0))
        >>> lora["params/Dense_0/kernel"].a.shape, lora["params/Dense_0/kernel"].b.shape
        ((16, 4), (4, 32))

        An einsum kernel's shape does not say which axes are contracted; the function does:

        >>> w = {"attn": {"w": jnp.ones((2, 16, 8))}}   # (heads, d, head_dim): out (0, 2)
        >>> fn = lambda p, x: jnp.einsum("bd,hdk->bhk", x, p["attn"]["w"])
        >>> _, lora = split(w, LoraSpec(targets="**/w", rank=4), key=jax.random.key(0),
        ...                 fn=fn, example_args=(jnp.ones((1, 16)),))
        >>> lora["attn/w"].layout
        Layout(in_axes=(1,), out_axes=(0, 2), batch_axes=())
    """
    variant = get_variant(spec.variant_name)  # unknown names are refused before any work
    init = get_init(spec.init)
    if fn is not None:
        if layouts is not None:
            raise LoraError(
                "split got both layouts= and fn=: give fn= (and example inputs) to infer the "
                "layouts, or layouts= (e.g. edited from lorax_fn.infer_layouts), not both"
            )
        layouts = infer_layouts(fn, params, *example_args, **(example_kwargs or {}))
    elif example_args or example_kwargs:
        raise LoraError(
            "split got example inputs but no fn=: they are only used to infer layouts by "
            "tracing fn(params, *example_args, **example_kwargs)"
        )
    paths_leaves = leaves_with_paths(params)
    shapes = {p: tuple(np.shape(x)) for p, x in paths_leaves}
    unplaced = getattr(layouts, "unplaced", {})
    layouts = dict(layouts or {})
    _refuse_quantized(spec, params)
    excluded = set().union(*_matches(spec.exclude, paths_leaves, "exclude").values())
    targeted = set().union(*_matches(spec.targets, paths_leaves, "target").values()) - excluded
    trainable = set().union(*_matches(spec.trainable, paths_leaves, "trainable").values())
    if both := sorted(targeted & trainable):
        raise LoraError(f"paths both targeted and trainable: {both}")
    if spec.targets and not targeted:
        raise LoraError("every target was excluded; nothing is left to adapt")
    _check_overrides_match(spec, [(p, x) for p, x in paths_leaves if p in targeted])

    lora: LoraTree = {}
    new_leaves = []
    for path, leaf in paths_leaves:
        if path in trainable:
            lora[path] = leaf
        if path not in targeted:
            new_leaves.append(leaf)
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise LoraError(f"{path}: cannot adapt a non-floating leaf (dtype {dtype})")
        shape = tuple(np.shape(leaf))
        layout = (
            layouts.get(path) or spec.layout_for(path, leaf) or default_layout(path, shape, shapes)
        )
        if layout is None:
            raise _no_layout(path, shape, unplaced.get(path))
        layout.check(path, shape)
        rank = spec.rank_for(path, leaf)
        fan_in, fan_out = layout.fan_in(shape), layout.fan_out(shape)
        if rank > min(fan_in, fan_out):
            raise LoraError(
                f"{path}: rank {rank} > min(fan_in, fan_out) = min({fan_in}, {fan_out}) "
                f"for shape {shape} with {layout}"
            )
        factors, base_leaf = init(
            path, leaf, layout, rank, spec.scale_for(path, leaf), spec, _path_key(key, path)
        )
        # A variant's extras start from the weight the model sees (LoftQ's: dequantized).
        w0 = base_leaf.dequantize() if isinstance(base_leaf, QuantizedArray) else base_leaf
        lora[path] = _with_variant(factors, w0, variant)
        new_leaves.append(base_leaf)
    # A fresh container even when no leaf changed: an nnx.State from nnx.split holds the
    # model's own Variables, so returning it would let nnx.update(model, ...) rewrite the
    # frozen base behind the caller's back.
    base = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new_leaves)
    return base, lora
