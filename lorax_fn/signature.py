"""What ``lora(fn)`` traces once: an input signature, and what is reported per signature.

Array leaves of the arguments are traced; every other leaf (``train=True``,
``mutable=[...]``) is static and part of the cache key, so it must be hashable, as
``jax.jit`` requires of its static arguments. Each signature keeps its own record of
what was reported (fallbacks, unread weights), and its messages name it, so a second
signature that hits the same problem is reported again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) or hasattr(x, "__jax_array__")


def split_static(tree: Any) -> tuple[list[Any], tuple, Any]:
    """``(array leaves, static key, treedef)`` of ``(args, kwargs)``.

    The static key holds ``(type, value)`` for each non-array leaf and ``None`` in
    place of each array leaf. An unhashable static leaf raises :class:`LoraError`
    naming it (``args[i]…`` or ``kwargs['name']…``, the arguments after
    ``base, lora_tree``).

    Example:
        >>> import jax.numpy as jnp
        >>> arrays, static, _ = split_static(((jnp.ones(2),), {"train": True}))
        >>> len(arrays), static
        (1, (None, (<class 'bool'>, True)))
        >>> split_static(((), {"cfg": {1, 2}}))
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: lora: static argument kwargs['cfg'] (a set) is not hashable: ...
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    dynamic, static = [], []
    for key_path, x in flat:
        if _is_array(x):
            dynamic.append(x)
            static.append(None)
            continue
        try:
            hash(x)
        except TypeError as e:
            raise LoraError(
                f"lora: static argument {_arg_name(key_path)} (a {type(x).__name__}) is not "
                f"hashable: {e}. Non-array arguments key the trace cache, as jax.jit's static "
                "arguments do; pass a hashable value (a tuple, a frozen dataclass) or an array"
            ) from None
        static.append((type(x), x))
    return dynamic, tuple(static), treedef


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

    def __init__(self, used: frozenset[str], signature: str):
        self.used = used
        self.signature = signature
        self.reported: set = set()
        self.checked: set = set()
        self.evaluate: Callable[..., Any] | None = None

    def check_usage(self, adapted: tuple[str, ...]) -> None:
        """Refuse an ``fn`` that reads none of the LoRA tree; warn per unread entry."""
        unused = [p for p in adapted if p not in self.used]
        if not unused:
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
            warnings.warn(
                f"lorax_fn: fn never reads {path} (inputs {self.signature}); its adapter has "
                "no effect and a zero gradient",
                stacklevel=3,
            )
