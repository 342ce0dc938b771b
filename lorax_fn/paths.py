"""Key paths as `/`-joined strings, and the filters that select them.

A linen ``{"params": ...}`` dict and an ``nnx.State`` from ``nnx.split`` read
the same: ``params/Dense_0/kernel`` and ``Dense_0/kernel`` (NNX's trailing
``.value`` attribute is dropped, because it names the Variable box, not a
parameter).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np

from lorax_fn.errors import LoraError


@dataclasses.dataclass(frozen=True, init=False)
class AnyOf:
    """A path filter that matches what any of its alternatives matches.

    Where a list of filters requires each to match something (a filter that matches
    nothing is an error, since it is usually a typo), ``AnyOf`` requires only that
    *some* alternative matches: one target list then serves the variants of a model
    family, e.g. Gemma's fused ``qkv_einsum`` and its grouped-query ``q_einsum`` /
    ``kv_einsum``. If no alternative matches anything, the error names them all.

    Example:
        >>> from lorax_fn import LoraSpec
        >>> targets = [AnyOf("**/qkv_einsum/w", "**/q_einsum/w"), "**/mlp/*/kernel"]
        >>> compile_filter(targets[0])("layer_0/attn/q_einsum/w", None)
        True
        >>> LoraSpec.from_json(LoraSpec(targets=targets).to_json()).targets[0] == targets[0]
        True
    """

    alternatives: tuple[PathFilter, ...]

    def __init__(self, *alternatives: PathFilter) -> None:
        if not alternatives:
            raise LoraError("AnyOf() needs at least one alternative filter")
        object.__setattr__(self, "alternatives", alternatives)
        for f in alternatives:
            compile_filter(f)


PathFilter: TypeAlias = str | re.Pattern[str] | AnyOf | Callable[[str, Any], bool]
"""A glob (``*`` one level, ``**`` any depth), ``re:``-prefixed or compiled
regular expression (full match), an :class:`AnyOf` of filters, or a callable
``(path, leaf) -> bool``."""


def as_filters(value: PathFilter | Sequence[PathFilter]) -> tuple[PathFilter, ...]:
    """One filter or a sequence of filters, as a tuple of filters.

    Example:
        >>> as_filters("**/kernel"), as_filters(["a", "b"])
        (('**/kernel',), ('a', 'b'))
    """
    if isinstance(value, str | re.Pattern | AnyOf) or callable(value):
        return (value,)
    return tuple(value)


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(key_path: Sequence[Any]) -> str:
    """Return the `/`-joined name of a JAX key path.

    Example:
        >>> import jax
        >>> [(k, _)] = jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0]
        >>> path_str(k)
        'a/b'
    """
    keys = list(key_path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """Flatten ``tree`` into ``(path, leaf)`` pairs in JAX's leaf order.

    Example:
        >>> leaves_with_paths({"w": 1.0, "b": {"c": 2.0}})
        [('b/c', 2.0), ('w', 1.0)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(k), leaf) for k, leaf in flat]


def _stored_quantized(x: Any) -> bool:
    # A lorax_fn.QuantizedArray (not imported: quantize builds on this module).
    return hasattr(x, "codes") and hasattr(x, "dequantize") and hasattr(x, "format")


def quantized_weights(tree: Any) -> list[tuple[str, Any]]:
    """The ``(path, QuantizedArray)`` pairs of ``tree``, each named as one weight.

    Example:
        >>> import jax.numpy as jnp
        >>> from lorax_fn import quantize_base
        >>> q = quantize_base({"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}, "w")
        >>> [(p, x.format) for p, x in quantized_weights(q)]
        [('w', 'nf4')]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_stored_quantized)
    return [(path_str(k), leaf) for k, leaf in flat if _stored_quantized(leaf)]


def describe(tree: Any) -> str:
    """A table of every leaf's path, shape and dtype — what filters match against.

    A quantized weight is one row, by its float shape and dtype and its format: the
    path ``split``, ``quantize_base`` and LoRA trees use, not one row per stored array.

    Example:
        >>> import jax.numpy as jnp
        >>> print(describe({"Dense_0": {"kernel": jnp.zeros((2, 3))}}))
        path            shape   dtype
        Dense_0/kernel  (2, 3)  float32
    """
    rows = [("path", "shape", "dtype")]
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_stored_quantized)
    for key, leaf in flat:
        dtype = str(getattr(leaf, "dtype", type(leaf)))
        if _stored_quantized(leaf):
            dtype += f" as {leaf.format}"
        rows.append((path_str(key), str(tuple(np.shape(leaf))), dtype))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _segment_regex(segment: str) -> str:
    out = []
    i = 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in segment[i + 1 :]:
            j = segment.index("]", i + 1)
            body = segment[i + 1 : j]
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    segments = pattern.split("/")
    if segments == ["**"]:
        return re.compile(".*")
    regex = ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**" and last:
            # A trailing `**` matches the prefix itself and anything below it.
            regex = regex.removesuffix("/") + "(?:/[^/]+)*"
        elif segment == "**":
            regex += "(?:[^/]+/)*"
        else:
            regex += _segment_regex(segment) + ("" if last else "/")
    return re.compile(regex)


def compile_filter(pattern: PathFilter) -> Callable[[str, Any], bool]:
    """Turn a glob, regex or callable into a predicate ``(path, leaf) -> bool``.

    A pattern that does not compile raises :class:`LoraError` naming it.

    Example:
        >>> match = compile_filter("**/query/kernel")
        >>> match("params/layer_0/attn/query/kernel", None), match("params/query/bias", None)
        (True, False)
        >>> compile_filter("re:(")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: path filter 're:(' is not a valid pattern: missing ), ...
    """
    if isinstance(pattern, AnyOf):
        alternatives = [compile_filter(f) for f in pattern.alternatives]
        return lambda path, leaf: any(match(path, leaf) for match in alternatives)
    if callable(pattern) and not isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str | re.Pattern):
        raise LoraError(f"a path filter must be a str, re.Pattern or callable, got {pattern!r}")
    try:
        if isinstance(pattern, re.Pattern):
            regex = pattern
        elif pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
        else:
            regex = _glob_to_regex(pattern)
    except re.error as err:
        raise LoraError(f"path filter {pattern!r} is not a valid pattern: {err}") from None
    return lambda path, leaf: regex.fullmatch(path) is not None


def filter_name(pattern: PathFilter) -> str:
    """A readable name for a filter, for error messages and metadata.

    Example:
        >>> filter_name("**/kernel")
        '**/kernel'
    """
    if isinstance(pattern, re.Pattern):
        return f"re:{pattern.pattern}"
    if isinstance(pattern, str):
        return pattern
    if isinstance(pattern, AnyOf):
        return "AnyOf(" + ", ".join(repr(filter_name(f)) for f in pattern.alternatives) + ")"
    return getattr(pattern, "__qualname__", repr(pattern))


def nearest_paths(pattern: PathFilter, paths: Iterable[str], n: int = 5) -> list[str]:
    """The existing paths that look most like ``pattern``, for 'did you mean' errors.

    Example:
        >>> nearest_paths("**/qurey/kernel", ["a/query/kernel", "a/value/kernel", "a/bias"], n=1)
        ['a/query/kernel']
    """
    paths = list(paths)
    if isinstance(pattern, AnyOf):
        # Nearest to each alternative in turn, so every alternative gets its best guesses.
        ranked = [nearest_paths(f, paths, n) for f in pattern.alternatives]
        merged = [p for rank in zip(*ranked, strict=True) for p in rank]
        return list(dict.fromkeys(merged))[:n]
    name = filter_name(pattern).replace("**/", "").replace("re:", "")
    scored = sorted(
        paths,
        key=lambda p: (
            -max(
                difflib.SequenceMatcher(None, name, p[-len(name) - 8 :]).ratio(),
                difflib.SequenceMatcher(None, name, p).ratio(),
            )
        ),
    )
    return scored[:n]


def unmatched_filter(
    pattern: PathFilter, paths: Iterable[str], what: str, noun: str = "leaf", listing: str = ""
) -> LoraError:
    """The error for a filter that matches nothing: it names the filter and the nearest
    existing paths (and, with ``listing``, how to list them all).

    Example:
        >>> print(unmatched_filter("**/qurey", ["a/query", "a/bias"], "target filter"))
        target filter '**/qurey' matches no leaf. Nearest paths:
          a/query
          a/bias
    """
    near = "\n  ".join(nearest_paths(pattern, paths))
    hint = f"\n(lorax_fn.describe({listing}) lists them all)" if listing else ""
    name = filter_name(pattern)
    if isinstance(pattern, AnyOf):
        return LoraError(
            f"{what} {name}: none of its alternatives matches any {noun}. Nearest paths:"
            f"\n  {near}{hint}"
        )
    return LoraError(f"{what} {name!r} matches no {noun}. Nearest paths:\n  {near}{hint}")
