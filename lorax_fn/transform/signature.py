"""What ``lora(fn)`` traces once: an input signature, and what is reported per signature.

Array leaves of the arguments are traced, and so are Python floats and complex numbers,
as weakly typed scalars (as ``jax.jit`` traces them), so that a new temperature or loss
weight neither retraces nor recompiles. Every other leaf (``train=True``, a decode
length, ``mutable=[...]``) is static and part of the cache key, so it must be hashable,
as ``jax.jit`` requires of its static arguments; so is each whole argument named by
``static_argnums`` / ``static_argnames`` (:class:`StaticArgs`). Each signature keeps its
own record of what was reported (fallbacks, unread weights), and its messages name it,
so a second signature that hits the same problem is reported again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _package_dirs(*names: str) -> tuple[str, ...]:
    dirs = [os.path.dirname(__file__)]
    for name in names:
        spec = importlib.util.find_spec(name)
        dirs += list(spec.submodule_search_locations or []) if spec else []
    return tuple(os.path.join(d, "") for d in dirs)


# Frames a warning never names: lorax_fn's, and those of the transforms (jit, grad,
# scan, nnx.jit) between the user's call and the evaluation that reports.
_INTERNAL = _package_dirs("jax", "jaxlib", "flax")


def warn_at_caller(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first frame outside lorax_fn, JAX
    and Flax: the user's line that called the wrapped function, however deep in a
    ``jit`` trace or a ``scan`` body the report is made.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_at_caller("lorax_fn: w is consumed by `abs`")
        >>> caught[0].filename.startswith(_INTERNAL)
        False
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level if frame is not None else 2)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) or hasattr(x, "__jax_array__")


@dataclasses.dataclass(frozen=True)
class StaticArgs:
    """The arguments of ``fn`` that are static as a whole, by position and by name.

    Positions count ``fn``'s parameters, ``params`` being 0, as ``jax.jit(fn,
    static_argnums=...)`` would; a parameter that can be passed either way is static
    however it is passed. Build it with :meth:`resolve`.

    Example:
        >>> s = StaticArgs.resolve(lambda p, x, n, *, mode="a": x, 2, "mode")
        >>> sorted(s.nums), sorted(s.names)
        ([2], ['mode', 'n'])
    """

    nums: frozenset[int] = frozenset()
    names: frozenset[str] = frozenset()

    @classmethod
    def resolve(
        cls,
        fn: Callable[..., Any],
        static_argnums: int | Iterable[int] | None,
        static_argnames: str | Iterable[str] | None,
    ) -> StaticArgs:
        """Check ``static_argnums`` / ``static_argnames`` against ``fn``'s signature.

        Raises :class:`LoraError` for a position or name ``fn`` has no parameter for, for
        ``params`` itself, and for a positional-only name. A ``fn`` without an inspectable
        signature (a builtin) is not checked, as in ``jax.jit``.

        Example:
            >>> StaticArgs.resolve(lambda p, x: x, None, "y")
            Traceback (most recent call last):
            ...
            lorax_fn.errors.LoraError: lora: static_argnames names 'y', but fn has no such ...
        """
        nums = set(_ensure_tuple(static_argnums, int, "static_argnums"))
        names = set(_ensure_tuple(static_argnames, str, "static_argnames"))
        if bad := sorted(n for n in nums if n < 1):
            raise LoraError(
                f"lora: static_argnums={bad[0]}: positions count fn's parameters from 0, "
                "which is its params argument (never static); the first argument after "
                "base, lora_tree is 1"
            )
        if "lora_key" in names:
            raise LoraError("lora: lora_key is the wrapped function's dropout key, never static")
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return cls(frozenset(nums), frozenset(names))
        positional = [p for p in params if p.kind in _POSITIONAL]
        _check_nums(nums, positional, params)
        _check_names(names, positional, params)
        for i, p in enumerate(positional[1:], start=1):
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                if i in nums:
                    names.add(p.name)
                elif p.name in names:
                    nums.add(i)
        return cls(frozenset(nums), frozenset(names))

    def mark(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` with each static argument wrapped, so it stays one leaf."""
        if not (self.nums or self.names):
            return args, kwargs
        args = tuple(_Static(a) if i in self.nums else a for i, a in enumerate(args, start=1))
        kwargs = {k: _Static(v) if k in self.names else v for k, v in kwargs.items()}
        return args, kwargs


def _ensure_tuple(value: Any, kind: type, what: str) -> tuple:
    items = () if value is None else (value,) if isinstance(value, kind) else value
    try:
        items = tuple(items)
    except TypeError:
        items = (value,)
    if any(isinstance(x, bool) or not isinstance(x, kind) for x in items):
        raise LoraError(f"lora: {what} must be {kind.__name__}s, got {value!r}")
    return items


def _check_nums(nums: set[int], positional: list, params: list) -> None:
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    if bad := sorted(n for n in nums if n >= len(positional)):
        listed = ", ".join(f"{i}: {p.name}" for i, p in enumerate(positional))
        raise LoraError(
            f"lora: static_argnums={bad[0]}, but fn takes {len(positional)} positional "
            f"parameters ({listed})"
        )


def _check_names(names: set[str], positional: list, params: list) -> None:
    by_name = {p.name: p for p in params}
    for name in sorted(names):
        p = by_name.get(name)
        if positional and p is positional[0]:
            raise LoraError(
                f"lora: static_argnames names {name!r}, fn's params argument: it is never static"
            )
        if p is not None and p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise LoraError(
                f"lora: static_argnames names {name!r}, a positional-only parameter of fn: "
                "pass its position in static_argnums"
            )
        takes_any = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params)
        if (p is None or p.kind not in _KEYWORD) and not takes_any:
            listed = ", ".join(q.name for q in params if q.kind in _KEYWORD)
            raise LoraError(
                f"lora: static_argnames names {name!r}, but fn has no such keyword "
                f"parameter (it has: {listed or 'none'})"
            )


class _Static:
    """An argument marked static: one leaf of the argument tree, not flattened."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class Split(NamedTuple):
    """The arguments after ``base, lora_tree``, split for tracing (see :func:`split_static`)."""

    arrays: list[Any]  # the traced leaves
    static: tuple  # per leaf: (type, value) if static, None if traced
    treedef: Any
    scalars: tuple[str, ...]  # the traced leaves that were Python numbers, by name


def split_static(args: tuple, kwargs: dict[str, Any], static: StaticArgs = StaticArgs()) -> Split:
    """Split ``(args, kwargs)`` into traced leaves and a static key.

    Arrays are traced, and Python floats and complex numbers too, as weakly typed
    scalars (as ``jax.jit`` traces them); other leaves (bools, ints, strings) are static,
    and so is each whole argument ``static`` names. The static key holds ``(type,
    value)`` for each static leaf and ``None`` in place of each traced one. An unhashable
    static leaf raises :class:`LoraError` naming it (``args[i]…`` or ``kwargs['name']…``,
    the arguments after ``base, lora_tree``).

    Example:
        >>> import jax.numpy as jnp
        >>> s = split_static((jnp.ones(2), 0.5), {"train": True})
        >>> len(s.arrays), s.static, s.scalars
        (2, (None, None, (<class 'bool'>, True)), ('args[1]',))
        >>> split_static((), {"cfg": {1, 2}})
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: lora: static argument kwargs['cfg'] (a set) is not hashable: ...
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(static.mark(args, kwargs))
    arrays, keys, scalars = [], [], []
    for key_path, x in flat:
        if isinstance(x, _Static):
            keys.append(_static_key(x.value, key_path, marked=True))
        elif _is_array(x):
            arrays.append(x)
            keys.append(None)
        elif isinstance(x, float | complex):
            arrays.append(jnp.asarray(x))  # weakly typed, as under jax.jit
            keys.append(None)
            scalars.append(_arg_name(key_path))
        else:
            keys.append(_static_key(x, key_path, marked=False))
    return Split(arrays, tuple(keys), treedef, tuple(scalars))


def _static_key(x: Any, key_path: tuple, *, marked: bool) -> tuple[type, Any]:
    try:
        hash(x)
    except TypeError as e:
        why = (
            "it is marked static (static_argnums / static_argnames), and static arguments "
            "key the trace cache: pass a hashable value (a tuple, a frozen dataclass) or "
            "leave it unmarked"
            if marked
            else "non-array arguments other than Python floats key the trace cache, as "
            "jax.jit's static arguments do; pass a hashable value (a tuple, a frozen "
            "dataclass) or an array"
        )
        raise LoraError(
            f"lora: static argument {_arg_name(key_path)} (a {type(x).__name__}) is not "
            f"hashable: {e}. {why[0].upper()}{why[1:]}"
        ) from None
    return (type(x), x)


def _arg_name(key_path: tuple) -> str:
    head, entry, *rest = key_path
    name = f"args[{entry.idx}]" if head.idx == 0 else f"kwargs[{entry.key!r}]"
    return name + jax.tree_util.keystr(tuple(rest))


def aval_key(x: Any) -> tuple:
    """The part of an array that a trace depends on: shape, dtype, weak type.

    Example:
        >>> import jax.numpy as jnp
        >>> aval_key(jnp.ones((2, 3)))
        ((2, 3), dtype('float32'), False)
    """
    return (tuple(jnp.shape(x)), jnp.result_type(x), getattr(x, "weak_type", False))


def describe(arg_leaves: Sequence[Any]) -> str:
    """A short text for the array arguments of a signature, for messages.

    Example:
        >>> import jax.numpy as jnp
        >>> describe([jnp.ones((2, 5)), jnp.zeros(3, jnp.int32)])
        '(float32[2,5], int32[3])'
    """
    shapes = [f"{jnp.result_type(x).name}[{','.join(map(str, jnp.shape(x)))}]" for x in arg_leaves]
    return "(" + ", ".join(shapes[:4]) + (", …" if len(shapes) > 4 else "") + ")"


class Trace:
    """One input signature: its evaluator, the params ``fn`` reads, and what was reported.

    Example:
        >>> t = Trace(frozenset({"w"}), "(float32[2,5])")
        >>> t.check_usage(("w",))  # read: nothing to say
        >>> t.check_usage(("v",))
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: lora(fn): fn never reads any weight of the LoRA tree (v) ...
    """

    def __init__(self, used: frozenset[str], signature: str, empty: bool = False):
        self.used = used
        self.signature = signature
        # Every output has size 0 (an empty batch): nothing can depend on any weight, and
        # that says nothing about how fn reads its params.
        self.empty = empty
        self.reported: set = set()
        self.checked: set = set()
        self.evaluate: Callable[..., Any] | None = None

    def check_usage(self, adapted: tuple[str, ...]) -> None:
        """Refuse an ``fn`` that reads none of the LoRA tree; warn per unread entry."""
        unused = [p for p in adapted if p not in self.used]
        if not unused or self.empty:
            return
        if len(unused) == len(adapted):
            listed = ", ".join(unused[:5]) + (", …" if len(unused) > 5 else "")
            raise LoraError(
                f"lora(fn): fn never reads any weight of the LoRA tree ({listed}) from its "
                f"params argument (inputs {self.signature}), so training would see all-zero "
                "gradients. Does fn call a model or variables captured by closure? Build the "
                "model from the params fn receives (model.apply(params, ...), "
                "nnx.merge(graphdef, params))"
            )
        if adapted in self.checked:
            return
        self.checked.add(adapted)
        for path in unused:
            warn_at_caller(
                f"lorax_fn: fn never reads {path} (inputs {self.signature}); its adapter has "
                "no effect and a zero gradient"
            )
