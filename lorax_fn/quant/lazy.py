"""A quantized frozen weight held undequantized while ``lora(fn)`` evaluates a jaxpr.

A :class:`~lorax_fn.quant.quantized.QuantizedArray` leaf of the base enters the evaluation
as a :class:`LazyWeight`: its stored arrays plus the layout operations (casts,
transposes, reshapes, slices) applied to it so far. Only the consumer that reads it
(``dot_general``, ``conv``, anything) dequantizes it, inside a ``jax.checkpoint``
that wraps just that one operation (:func:`bind`): the forward pass forms one
weight at a time in float, and the backward pass recomputes it instead of keeping
it, so autodiff saves the integer codes as the residual, never the float weight.

Stacked layers: ``scan`` slices the stored arrays along their leading (layer)
axis (:func:`scan_parts`). The double-quantization constants of NF4 are grouped
row-major over the whole array, so a slice keeps them whole and remembers the
row-major index of its first absmax constant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from lorax_fn.quant import nf4
from lorax_fn.quant.quantized import QuantizedArray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyWeight:
    """A stored (possibly layer-sliced) quantized weight and the layout ops pending on it.

    Leaves are a :class:`QuantizedArray`'s arrays (``codes``, ``scale`` and the double
    quantization constants) and ``first``: the row-major index of this slice's first
    absmax constant among the whole array's (``None`` before any slicing).
    ``stored_shape`` is the dequantized slice's shape; ``ops`` the layout operations
    applied after dequantizing, ``shape``/``dtype`` the result's.
    """

    codes: jax.Array
    scale: jax.Array
    scale_scale: jax.Array | None
    scale_offset: jax.Array | None
    first: jax.Array | None
    path: str = dataclasses.field(metadata={"static": True})
    format: str = dataclasses.field(metadata={"static": True})
    stored_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    stored_dtype: np.dtype = dataclasses.field(metadata={"static": True})
    block_size: int = dataclasses.field(metadata={"static": True})
    lead_axes: int = dataclasses.field(metadata={"static": True})
    ops: tuple[tuple[Any, ...], ...] = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: np.dtype = dataclasses.field(metadata={"static": True})

    @classmethod
    def of(cls, path: str, q: QuantizedArray) -> LazyWeight:
        return cls(
            q.codes,
            q.scale,
            q.scale_scale,
            q.scale_offset,
            None,
            path,
            q.format,
            tuple(q.shape),
            jnp.dtype(q.dtype),
            q.block_size,
            q.lead_axes,
            (),
            tuple(q.shape),
            jnp.dtype(q.dtype),
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _then(self, op: tuple[Any, ...], shape: Sequence[int], dtype: Any) -> LazyWeight:
        return dataclasses.replace(
            self, ops=(*self.ops, op), shape=tuple(shape), dtype=jnp.dtype(dtype)
        )

    def transpose(self, permutation: Sequence[int]) -> LazyWeight:
        perm = tuple(int(p) for p in permutation)
        return self._then(("transpose", perm), [self.shape[p] for p in perm], self.dtype)

    def reshape(self, new_shape: Sequence[int]) -> LazyWeight:
        return self._then(("reshape", tuple(new_shape)), new_shape, self.dtype)

    def apply(self, eqn: core.JaxprEqn) -> LazyWeight:
        """The unary ``eqn`` (a cast, copy, transpose, reshape, slice …), pending."""
        params = eqn.primitive.get_bind_params(eqn.params)
        aval = eqn.outvars[0].aval
        return self._then(("bind", eqn.primitive, tuple(params.items())), aval.shape, aval.dtype)

    def dynamic_slice(self, starts: Sequence[Any], sizes: Sequence[int]) -> LazyWeight | None:
        """``lax.dynamic_slice`` of one index along leading axes (``w[i]`` of a stack).

        Only a prefix of size-1 slices of axes the stored arrays keep, with every other
        axis whole, is a slice of the stored arrays (and of NF4's absmax constants in
        row-major order); anything else returns ``None``.
        """
        cut = next((k for k, n in enumerate(sizes) if n != 1), len(sizes))
        if (
            self.ops
            or cut == 0
            or cut > self.lead_axes
            or list(sizes[cut:]) != list(self.stored_shape[cut:])
        ):
            return None
        # dynamic_slice clamps each start into range; the constants' offset must agree.
        starts = [
            jnp.clip(s, 0, n - 1) for s, n in zip(starts[:cut], self.stored_shape, strict=False)
        ]

        def take(x: jax.Array) -> jax.Array:
            index = [s if x.shape[k] > 1 else 0 for k, s in enumerate(starts)]
            return lax.dynamic_slice(
                x, [*index, *[0] * (x.ndim - cut)], [1] * cut + list(x.shape[cut:])
            )

        first = None
        if self.scale_scale is not None:
            strides = np.cumprod((*self.scale.shape[1:], 1)[::-1])[::-1][:cut]
            first = sum(s.astype(jnp.int32) * int(n) for s, n in zip(starts, strides, strict=True))
            first = first if self.first is None else first + self.first
        shape = (1,) * cut + tuple(self.stored_shape[cut:])
        return dataclasses.replace(
            self,
            codes=take(self.codes),
            scale=take(self.scale),
            first=first,
            stored_shape=shape,
            shape=shape,
        )

    def value(self) -> jax.Array:
        """The weight in float: dequantized (computed in float32), then the pending ops."""
        if self.format == "int8":
            x = (self.codes.astype(jnp.float32) * self.scale).astype(self.stored_dtype)
        else:
            flat = nf4.nf4_decode(self.codes, self._absmax(), self.block_size)
            n = math.prod(self.stored_shape[self.lead_axes :])
            x = flat[..., :n].reshape(self.stored_shape).astype(self.stored_dtype)
        for op in self.ops:
            if op[0] == "transpose":
                x = jnp.transpose(x, op[1])
            elif op[0] == "reshape":
                x = jnp.reshape(x, op[1])
            else:
                x = op[1].bind(x, **dict(op[2]))
        return x

    def _absmax(self) -> jax.Array:
        if self.scale_scale is None:
            return self.scale
        first = 0 if self.first is None else self.first
        return nf4.fp8_decode(self.scale, self.scale_scale, self.scale_offset, first)


def scan_parts(w: LazyWeight) -> tuple[Any, Callable[[Any, jax.Array], LazyWeight]] | None:
    """``(xs, rebuild)`` to scan ``w`` over its leading axis, or ``None`` when it can't be.

    ``xs`` are the stored arrays holding the layer axis (for ``lax.scan`` to slice);
    ``rebuild(xs_slice, step)`` is the weight of layer ``step``. Pending layout ops or
    a layer axis folded into NF4's blocks (no leading axis kept) cannot be sliced.
    """
    if w.ops or w.lead_axes < 1:
        return None
    layers = w.stored_shape[0]
    slice_scale = w.scale.shape[0] == layers
    xs = (w.codes, w.scale if slice_scale else None)
    per_layer = math.prod(w.scale.shape[1:])

    def rebuild(parts: Any, step: jax.Array) -> LazyWeight:
        codes, scale = parts
        first = None
        if w.scale_scale is not None:
            first = step.astype(jnp.int32) * per_layer
            first = first if w.first is None else first + w.first
        shape = w.stored_shape[1:]
        return dataclasses.replace(
            w,
            codes=codes,
            scale=scale if slice_scale else w.scale[0],
            first=first,
            stored_shape=shape,
            lead_axes=w.lead_axes - 1,
            shape=shape,
        )

    return xs, rebuild


def bind(eqn: core.JaxprEqn, invals: Sequence[Any]) -> Any:
    """``eqn`` on ``invals``, each :class:`LazyWeight` among them dequantized in a checkpoint.

    The checkpoint holds just this operation, so the backward pass recomputes the
    float weight from the stored codes rather than saving it.
    """
    traced = [k for k, x in enumerate(invals) if isinstance(x, LazyWeight | jax.Array)]
    params = eqn.primitive.get_bind_params(eqn.params)

    @jax.checkpoint
    def run(values):
        args = list(invals)
        for k, x in zip(traced, values, strict=True):
            args[k] = x.value() if isinstance(x, LazyWeight) else x
        return eqn.primitive.bind(*args, **params)

    return run([invals[k] for k in traced])
