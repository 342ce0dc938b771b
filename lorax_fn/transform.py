"""`lora(fn)`: run a function of params with (base, LoRA tree) instead."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

from lorax_fn.merge import merge


def lora(fn: Callable[..., Any], *, factorized: bool = True,
         on_fallback: Literal["warn", "error", "ignore"] = "warn") -> Callable[..., Any]:
    """Turn ``fn(params, *args, **kw)`` into ``g(base, lora_tree, *args, **kw)``.

    ``g`` returns exactly ``fn(merge(base, lora_tree), *args, **kw)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> params = {"w": jnp.ones((4, 3))}
        >>> base, lt = split(params, LoraSpec("w", rank=2), key=jax.random.key(0))
        >>> lora(lambda p, x: x @ p["w"])(base, lt, jnp.ones((2, 4))).shape
        (2, 3)
    """
    del factorized, on_fallback

    @functools.wraps(fn)
    def wrapped(base: Any, lora_tree: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return fn(merge(base, lora_tree), *args, **kwargs)

    return wrapped
