"""LoftQ (Li et al. 2023; PEFT's ``init_lora_weights="loftq"``): a quantized base and factors
chosen together, so that ``Q + scale·A·B ≈ W0`` instead of QLoRA's ``Q + 0``.

Alternate, ``iters`` times: quantize the residual ``W0 - scale·A·B`` to ``Q`` (NF4 or int8,
exactly as :func:`lorax_fn.quantize_base` would store it), then take ``scale·A·B`` as the
best rank-``r`` approximation (top-``r`` SVD) of ``W0 - Q``. ``split`` with
``LoraSpec(init="loftq")`` returns the :class:`lorax_fn.QuantizedArray` ``Q`` as the base
leaf: the quantized base and the factors come out together, so there is no
``quantize_base`` step after it (the other weights stay float; quantize them with
``quantize_base(base, exclude=...)`` if you want them quantized too).

``"loftq"`` is NF4 with QLoRA's defaults (blocks of 64, double quantization) and 5
iterations; register a :class:`LoftQ` under another name for other settings::

    lorax_fn.inits.register(LoftQ(name="loftq_int8", format="int8", iters=3))
    spec = lorax_fn.LoraSpec("**/kernel", rank=16, init="loftq_int8")

Differences from PEFT: PEFT needs bitsandbytes on a GPU and quantizes with its NF4/int8
kernels; here lorax_fn's own quantizer runs anywhere. PEFT ignores ``scale`` (its
``Q + A·B ≈ W0`` is right only for ``lora_alpha = r``); here ``A·B`` is divided by it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, delta
from lorax_fn.inits.base import Init, as_matrix, factors_of, register, svd_factors
from lorax_fn.quant.quantized import FORMATS, QuantizedArray, quantize
from lorax_fn.spec import LoraSpec

Quantizer = Callable[[jax.Array], QuantizedArray]


def loftq_iterates(
    w: jax.Array, layout: Layout, rank: int, scale: float, quantizer: Quantizer
) -> Iterator[tuple[QuantizedArray, jax.Array, jax.Array]]:
    """LoftQ's iterates ``(Q_t, A_t, B_t)``, t = 1, 2, …, as ``(*batch, fan_in, ·)`` matrices.

    ``Q_1 = quantizer(W0)`` (QLoRA's base) and ``scale·A_t·B_t`` is the top-``rank`` SVD part
    of ``W0 - Q_t``; ``Q_{t+1} = quantizer(W0 - scale·A_t·B_t)``. Endless: take as many
    as you need.

    Example:
        >>> import itertools
        >>> w = jax.random.normal(jax.random.key(0), (64, 64))
        >>> layout = Layout((0,), (1,))
        >>> steps = itertools.islice(loftq_iterates(w, layout, 8, 1.0, quantize), 3)
        >>> errors = [float(jnp.linalg.norm(w - q.dequantize() - a @ b)) for q, a, b in steps]
        >>> qlora = float(jnp.linalg.norm(w - quantize(w).dequantize()))
        >>> qlora > errors[0] > errors[2]
        True
    """
    w32 = w.astype(jnp.float32)
    a_shape, b_shape = layout.shapes(tuple(w.shape), rank)
    residual = w
    while True:
        q = quantizer(residual)
        a, b = svd_factors(as_matrix(w32 - q.dequantize(jnp.float32), layout), rank, scale)
        yield q, a, b
        part = delta(LoraFactors(a.reshape(a_shape), b.reshape(b_shape), scale, layout))
        residual = (w32 - part).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class LoftQ(Init):
    """The LoftQ init: the quantizer's settings and the number of alternations.

    Args:
      name: the registry name (``LoraSpec(init=name)``).
      format: ``"nf4"`` or ``"int8"`` (as :func:`lorax_fn.quantize_base`).
      iters: alternations of quantize and SVD (PEFT's ``loftq_iter``); 1 is QLoRA's
        ``Q`` with the best rank-r correction of its error.
      block_size, double_quant, pad: NF4 options of :func:`lorax_fn.quant.quantize`.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> w = jax.random.normal(jax.random.key(0), (64, 128))
        >>> qbase, lt = lorax_fn.split({"w": w}, lorax_fn.LoraSpec("w", rank=8,
        ...                            init="loftq"), key=jax.random.key(1))
        >>> qbase["w"]
        QuantizedArray(nf4, float32[64, 128], block_size=64, double_quant, 4,232 bytes)
        >>> loftq = jnp.linalg.norm(w - lorax_fn.merge(qbase, lt)["w"])
        >>> qlora = jnp.linalg.norm(w - lorax_fn.quant.quantize(w).dequantize())
        >>> bool(loftq < 0.9 * qlora)
        True
    """

    name: str = "loftq"
    format: str = "nf4"
    iters: int = 5
    block_size: int | None = None
    double_quant: bool | None = None
    pad: bool = False
    rewrites_base = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LoraError(f"LoftQ: unknown format {self.format!r}; expected one of {FORMATS}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise LoraError(f"LoftQ: iters must be an int >= 1, got {self.iters!r}")

    def quantizer(self, layout: Layout) -> Quantizer:
        """How a weight of this ``layout`` is quantized: as ``quantize_base`` stores it."""
        if self.format == "int8":
            # quantize_base's int8 channels: one scale per (batch, out) index of the layout.
            channels = layout.batch_axes + layout.out_axes
            return lambda x: quantize(x, "int8", channel_axes=channels)
        return lambda x: quantize(
            x, "nf4", block_size=self.block_size, double_quant=self.double_quant, pad=self.pad
        )

    def __call__(
        self,
        path: str,
        w: jax.Array,
        layout: Layout,
        rank: int,
        scale: float,
        spec: LoraSpec,
        key: jax.Array,
    ) -> tuple[LoraFactors, Any]:
        # Imported here: pissa reads quantized arrays, and the quant wing builds on split.
        from lorax_fn.pissa import record

        finite = jnp.isfinite(w).all()
        if not isinstance(finite, jax.core.Tracer) and not finite:
            raise LoraError(f"{path}: has NaN or Inf values; init='{self.name}' cannot quantize it")
        steps = loftq_iterates(w, layout, rank, scale, self.quantizer(layout))
        try:
            for _ in range(self.iters):
                q, a, b = next(steps)
        except LoraError as e:
            raise LoraError(f"{path}: init={self.name!r} quantizes the weight, and {e}") from None
        factors = factors_of(a, b, tuple(w.shape), layout, scale, spec)
        # The adapter is right on Q only: the record lets restore and the manager refuse
        # the original (float or re-quantized) weights, as for PiSSA.
        return dataclasses.replace(factors, pissa=record(w, q, self.name)), q


register(LoftQ())
