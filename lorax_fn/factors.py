"""The low-rank factors of one adapted weight and how their axes map onto it.

A weight ``W`` has each axis in exactly one role: *batch* (one adapter per
index, e.g. the layer axis of an ``nn.scan`` stack), *in* (contracted with
the input, the fan-in) or *out* (the fan-out). The factors are

    A: (*batch, *in, r)      B: (*batch, r, *out)

with each group in the weight's own axis order, and ``W = W0 + scale·A·B``
transposed back to the weight's layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError

if TYPE_CHECKING:
    from lorax_fn.pissa import PissaRecord


LoraTree = dict[str, Any]
"""``{path: LoraFactors | array}``: factors per adapted weight, arrays for leaves
trained in full. A plain dict, so it is a pytree for optax, orbax and sharding."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a weight are batch (stacked), fan-in and fan-out.

    Example:
        >>> Layout(in_axes=(0,), out_axes=(1, 2))  # MHA query kernel (d, heads, head_dim)
        Layout(in_axes=(0,), out_axes=(1, 2), batch_axes=())
    """

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    batch_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("in_axes", "out_axes", "batch_axes"):
            object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))

    @property
    def ndim(self) -> int:
        return len(self.in_axes) + len(self.out_axes) + len(self.batch_axes)

    def check(self, path: str, shape: Sequence[int]) -> None:
        """Raise :class:`LoraError` unless the axes partition ``range(len(shape))``."""
        axes = sorted(self.batch_axes + self.in_axes + self.out_axes)
        if axes != list(range(len(shape))) or not self.in_axes or not self.out_axes:
            raise LoraError(
                f"{path}: layout {self} does not split the axes of shape {tuple(shape)} into "
                "non-empty in/out groups (and optional batch axes), each axis exactly once"
            )

    def shapes(self, shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B for a weight of ``shape`` at ``rank``.

        Example:
            >>> Layout((1,), (2,), (0,)).shapes((4, 16, 32), 8)
            ((4, 16, 8), (4, 8, 32))
        """
        batch = tuple(shape[a] for a in self.batch_axes)
        fan_in = tuple(shape[a] for a in self.in_axes)
        fan_out = tuple(shape[a] for a in self.out_axes)
        return batch + fan_in + (rank,), batch + (rank,) + fan_out

    def fan_in(self, shape: Sequence[int]) -> int:
        return math.prod(shape[a] for a in self.in_axes)

    def fan_out(self, shape: Sequence[int]) -> int:
        return math.prod(shape[a] for a in self.out_axes)

    def to_json(self) -> dict[str, list[int]]:
        return {
            "in_axes": list(self.in_axes),
            "out_axes": list(self.out_axes),
            "batch_axes": list(self.batch_axes),
        }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """The trainable A and B of one adapted weight; ``scale`` and ``layout`` are static.

    ``variant`` (static) names the adapter kind (:mod:`lorax_fn.variants`: ``"lora"``,
    ``"dora"``, or one registered by the user) and ``extras`` holds its trainable arrays
    beyond A and B, by name — column vectors, one entry per (batch, out) index of the
    weight (:attr:`column_shape`), e.g. DoRA's ``magnitude``. An extra reads as an
    attribute too (``f.magnitude``). ``pissa`` (static) is set by
    ``split(init="pissa")``: the record of the residual base these factors need
    (:mod:`lorax_fn.pissa`); ``None`` otherwise.

    Example:
        >>> import jax.numpy as jnp
        >>> f = LoraFactors(jnp.ones((4, 2)), jnp.zeros((2, 3)), 0.5, Layout((0,), (1,)))
        >>> f.rank, f.weight_shape, delta(f).shape, f.column_shape
        (2, (4, 3), (4, 3), (3,))
    """

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})
    layout: Layout = dataclasses.field(metadata={"static": True})
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})
    extras: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    variant: str = dataclasses.field(default="lora", metadata={"static": True})
    pissa: PissaRecord | None = dataclasses.field(default=None, metadata={"static": True})

    def __getattr__(self, name: str) -> jax.Array:
        # Only reached when normal lookup fails: an extra array by its name.
        extras = self.__dict__.get("extras")
        if extras is not None and name in extras:
            return extras[name]
        raise AttributeError(f"LoraFactors ({self.__dict__.get('variant')}) has no {name!r}")

    def __repr__(self) -> str:
        extra = f", dropout={self.dropout:g}" if self.dropout else ""
        if self.variant != "lora":
            extra += f", variant={self.variant!r}"
        for name, x in self.extras.items():
            extra += f", {name}={_brief(x)}"
        if self.pissa is not None:
            extra += ", pissa"
        return (
            f"LoraFactors(a={_brief(self.a)}, b={_brief(self.b)}, scale={self.scale:g}, "
            f"layout={self.layout}{extra})"
        )

    def plain(self) -> LoraFactors:
        """These factors as plain LoRA: the variant and its extras dropped.

        Example:
            >>> import jax.numpy as jnp
            >>> f = LoraFactors(jnp.ones((4, 2)), jnp.zeros((2, 3)), 1.0, Layout((0,), (1,)),
            ...                 extras={"magnitude": jnp.ones(3)}, variant="dora")
            >>> f.plain().variant, f.plain().extras
            ('lora', {})
        """
        return dataclasses.replace(self, extras={}, variant="lora")

    def with_extras(self, **arrays: jax.Array) -> LoraFactors:
        """These factors with the named extra arrays replaced (or added).

        Example:
            >>> import jax.numpy as jnp
            >>> f = LoraFactors(jnp.ones((4, 2)), jnp.zeros((2, 3)), 1.0, Layout((0,), (1,)),
            ...                 extras={"magnitude": jnp.ones(3)}, variant="dora")
            >>> f.with_extras(magnitude=jnp.zeros(3)).magnitude
            Array([0., 0., 0.], dtype=float32)
        """
        return dataclasses.replace(self, extras={**self.extras, **arrays})

    @property
    def column_shape(self) -> tuple[int, ...]:
        """The shape of a column vector (a variant's extra array): ``(*batch, *out)``."""
        nb = len(self.layout.batch_axes)
        shape = tuple(np.shape(self.b))
        return shape[:nb] + shape[nb + 1 :]

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        nb, ni = len(self.layout.batch_axes), len(self.layout.in_axes)
        by_axis = dict(zip(self.layout.batch_axes, self.a.shape[:nb], strict=True))
        by_axis |= dict(zip(self.layout.in_axes, self.a.shape[nb : nb + ni], strict=True))
        by_axis |= dict(zip(self.layout.out_axes, self.b.shape[nb + 1 :], strict=True))
        return tuple(by_axis[i] for i in range(self.layout.ndim))


def _brief(x: object) -> str:
    return f"{getattr(x, 'dtype', type(x).__name__)}{list(np.shape(x))}"


def delta(factors: LoraFactors, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``scale · A·B`` laid out like the weight, accumulated in float32.

    Example:
        >>> import jax.numpy as jnp
        >>> f = LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 2)), 2.0, Layout((1,), (0,)))
        >>> delta(f).shape  # the weight is (out=2, in=3)
        (2, 3)
    """
    layout = factors.layout
    nb = len(layout.batch_axes)
    batch = factors.a.shape[:nb]
    fan_in = factors.a.shape[nb:-1]
    fan_out = factors.b.shape[nb + 1 :]
    r = factors.rank
    a = factors.a.reshape(batch + (math.prod(fan_in), r)).astype(jnp.float32)
    b = factors.b.reshape(batch + (r, math.prod(fan_out))).astype(jnp.float32)
    d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * factors.scale
    d = d.reshape(batch + fan_in + fan_out)
    order = layout.batch_axes + layout.in_axes + layout.out_axes
    return jnp.transpose(d, np.argsort(order)).astype(dtype)
