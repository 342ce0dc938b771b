"""What a weight can flow through: one table for :func:`~lorax_fn.lora` and layouts.

:func:`lorax_fn.lora` (evaluation) and :func:`lorax_fn.infer_layouts` (layout
inference) both build their per-primitive dispatch from :data:`PRIMITIVES`, so a
primitive that one follows the other follows too: a name in the table without a
handler in either module fails at import, and a name outside the table is, for both,
a consumer with no factorized rule (``lora`` forms that one weight there and reports
it; layout inference learns nothing from it).

Kinds:

- ``"same"``: the weight passes with its axes unchanged (casts, copies, barriers).
  ``lora`` applies a cast to W0 alone only where :func:`keeps_factors` says that
  this is the cast of the sum up to the cast's own rounding; any other cast forms
  the weight (reported), while layout inference follows every cast.
- ``"layout"``: transposes, grouping reshapes, unit broadcasts and slices of it.
- ``"consumer"``: the products computed factorized, ``x·W0 + scale·(x·A)·B``
  (``ragged_dot_general`` is ``lax.ragged_dot``: grouped, mixture-of-experts products).
- ``"call"``: a sub-jaxpr called once with the same operands (``jit``, ``remat``).
- ``"scan"``, ``"cond"``, ``"while"``: control flow, evaluated recursively.
- ``"custom"``: a function with a custom JVP/VJP rule. The rule is defined on the
  full weight, so ``lora`` forms the weight there (reported) and calls the function
  with its rule intact; layout inference reads the weight's use in its primal body.
"""

from __future__ import annotations

from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

Kind = Literal["same", "layout", "consumer", "call", "scan", "cond", "while", "custom"]

PRIMITIVES: dict[str, Kind] = {
    "convert_element_type": "same",
    "copy": "same",
    "copy_p": "same",
    "reduce_precision": "same",
    "optimization_barrier": "same",
    "transpose": "layout",
    "reshape": "layout",
    "squeeze": "layout",
    "broadcast_in_dim": "layout",
    "slice": "layout",
    "dynamic_slice": "layout",
    "dot_general": "consumer",
    "conv_general_dilated": "consumer",
    "gather": "consumer",
    "ragged_dot_general": "consumer",
    "jit": "call",
    "pjit": "call",
    "closed_call": "call",
    "core_call": "call",
    "remat2": "call",
    "checkpoint": "call",
    "scan": "scan",
    "cond": "cond",
    "while": "while",
    "custom_jvp_call": "custom",
    "custom_vjp_call": "custom",
}

# The parameter holding the sub-jaxpr of each "call" and "custom" primitive.
SUB_JAXPR: dict[str, str] = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}


def dispatch(handlers: dict[str, Any]) -> dict[str, Any]:
    """``{primitive: handler}`` for every table entry: its own handler, else its kind's.

    Raises ``KeyError`` for an entry with neither and for a handler named after no
    entry or kind, so the table and each module's rules cannot drift apart.

    Example:
        >>> kinds = ("same", "layout", "consumer", "call", "scan", "cond", "while", "custom")
        >>> table = dispatch({k: k for k in kinds})
        >>> table["optimization_barrier"], table["remat2"]
        ('same', 'call')
    """
    stray = set(handlers) - set(PRIMITIVES) - set(PRIMITIVES.values())
    if stray:
        raise KeyError(f"handlers for primitives outside the table: {sorted(stray)}")
    table = {}
    for name, kind in PRIMITIVES.items():
        handler = handlers.get(name, handlers.get(kind))
        if handler is None:
            raise KeyError(f"no handler for {name!r} (kind {kind!r})")
        table[name] = handler
    return table


# The coarsest float format a cast of an adapted weight may round to with W0 alone:
# bfloat16's 7 stored mantissa bits (a step of 2^-8 relative).
MIN_MANTISSA_BITS = 7


def keeps_factors(primitive: str, params: dict[str, Any], dtype: Any) -> bool:
    """May this ``"same"`` primitive act on W0 alone, the factors passing unchanged?

    ``dtype`` is W0's. Held as ``cast(W0) + scale·A·B``, a cast to a float format at
    least as fine as bfloat16 (f32→bf16/f16: mixed precision) differs from
    ``cast(W0 + scale·A·B)`` by one rounding step of that format, the error the cast
    makes anyway, and its low-rank term (in the factors' dtype) is rounded less, not
    more. Anything else changes the values by more than rounding, so W0 alone cannot
    stand for the sum and ``lora`` forms the weight: an integer or bool target
    (truncation, a mask; both with a zero gradient), a float8 or float4 target (2-3
    mantissa bits: the rounding is the quantisation, and would miss the update), and a
    ``reduce_precision`` that changes values of W0's format (fake quantisation). One
    that changes none (``jax.checkpoint`` inserts those) is the identity and kept.

    Example:
        >>> import jax.numpy as jnp
        >>> keeps_factors("convert_element_type", {"new_dtype": jnp.bfloat16}, jnp.float32)
        True
        >>> keeps_factors("convert_element_type", {"new_dtype": jnp.int32}, jnp.float32)
        False
        >>> rp = {"exponent_bits": 8, "mantissa_bits": 7}
        >>> keeps_factors("reduce_precision", rp, jnp.float32)
        False
        >>> keeps_factors("reduce_precision", rp, jnp.bfloat16)
        True
    """
    if primitive == "convert_element_type":
        target = np.dtype(params["new_dtype"])
        return jnp.issubdtype(target, jnp.floating) and jnp.finfo(target).nmant >= MIN_MANTISSA_BITS
    if primitive == "reduce_precision":
        own = jnp.finfo(dtype)
        return params["exponent_bits"] >= own.nexp and params["mantissa_bits"] >= own.nmant
    return True


def unit_broadcast(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], broadcast_dimensions: tuple[int, ...]
) -> bool:
    """Does this ``broadcast_in_dim`` only insert unit axes (no data is repeated)?

    Example:
        >>> unit_broadcast((4, 3), (4, 1, 3), (0, 2)), unit_broadcast((4, 3), (2, 4, 3), (1, 2))
        (True, False)
    """
    if [d for d in out_shape if d != 1] != [d for d in in_shape if d != 1]:
        return False
    return [out_shape[d] for d in broadcast_dimensions] == list(in_shape)
